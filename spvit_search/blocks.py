"""The parts of a model that are measured on their own, named by what determines their cost.

Latency of a pruned model = stem + every block at its token count + the selectors + head, so
the profiler measures those parts, not whole models. A part's *signature* names everything
that sets its cost (width, heads, MLP width, qk-norm, LayerScale, …) and nothing else, so the
12 identical blocks of DeiT-S are measured once, and DeiT-S and ViT-S share rows.

Parts are wrapped in modules with a plain ``forward(x)`` (exporting a bare timm ``Block``
fails: its ``is_causal`` argument is traced as a tensor) and export to ONNX with a dynamic
token axis, or at one static token count (TFLite has static shapes; selectors keep a token
count that depends on their input, so they are exported per count).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .plan import METHODS, PROFILED_BY_DEFAULT, kept_count
from .pruning.merge import KeyReader, TokenMerger
from .pruning.reducer import TokenReducer
from .pruning.selector import ClsAttentionScorer, MultiHeadTokenSelector, PreviousQkv
from .pruning.state import PruneState

#: token grids as fractions of the patch tokens (the prefix tokens are always added)
BLOCK_FRACTIONS = (0.04, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0)
SELECTOR_FRACTIONS = (0.2, 0.45, 0.7, 1.0)
HEAD_FRACTIONS = (0.04, 0.35, 0.7, 1.0)
#: a standalone selector keeps this share of its input patches (its cost hardly depends on it)
SELECTOR_PART_KEEP = 0.7


@dataclass(frozen=True)
class InputSpec:
    name: str
    tail: tuple[int, ...]  # shape after (batch, tokens)
    image: bool = False  # an image input: (batch, *tail), no token axis
    positive: bool = False  # example values in [1, 2) (token sizes, whose log is taken)

    def shape(self, batch: int, tokens: int) -> tuple[int, ...]:
        return (batch, *self.tail) if self.image else (batch, tokens, *self.tail)


@dataclass
class Part:
    """One measurable piece of a model."""

    kind: str  # "stem" | "block" | "selector" | "head"
    signature: str
    module: nn.Module
    inputs: tuple[InputSpec, ...]
    grid: tuple[int, ...]  # default token counts to measure
    dynamic: bool  # one ONNX file serves every token count

    def example_inputs(self, tokens: int, batch: int = 1) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(tokens)
        return tuple(
            torch.rand(spec.shape(batch, tokens), generator=gen) + 1
            if spec.positive
            else torch.randn(spec.shape(batch, tokens), generator=gen)
            for spec in self.inputs
        )


class _Stem(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(image))))


class _Block(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _ProportionalBlock(nn.Module):
    """A block after a merge: ToMe's proportional attention, ``log(size)`` as timm's ``attn_mask``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        return self.block(x, attn_mask=torch.log(size)[:, None, None, :, 0])


class _Head(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.norm(x))


class _Selector(nn.Module):
    """One pruning or merging stage at inference, on a sequence of prefix + patch tokens."""

    def __init__(self, reducer: TokenReducer | TokenMerger, num_prefix: int) -> None:
        super().__init__()
        self.reducer = reducer.eval()
        self.num_prefix = num_prefix

    def forward(self, x: torch.Tensor, qkv: torch.Tensor | None = None) -> torch.Tensor:
        if qkv is not None:  # EViT and ToMe read the previous block's qkv projection
            next(m for m in self.reducer.modules() if isinstance(m, PreviousQkv))._qkv = qkv
        return self.reducer(x, PruneState(num_prefix=self.num_prefix))


def block_signature(block: nn.Module, proportional: bool = False) -> str:
    """What sets a block's cost; ``proportional``: it runs with ToMe's size bias on its attention."""
    attn = block.attn
    dim = attn.qkv.in_features
    hidden = block.mlp.fc1.out_features
    name = "vit_block" if type(block).__name__ in ("Block", "PrunedBlock") else type(block).__name__.lower()
    sig = f"{name}-d{dim}-h{attn.num_heads}-mlp{hidden / dim:g}"
    if not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity):
        sig += "-qkn"
    if not isinstance(getattr(block, "ls1", nn.Identity()), nn.Identity):
        sig += "-ls"
    if attn.qkv.bias is None:
        sig += "-noqkvb"
    return sig + ("-propattn" if proportional else "")


def selector_signature(method: str, dim: int, heads: int, num_prefix: int) -> str:
    return f"selector-{method}-d{dim}-h{heads}-p{num_prefix}"


def stem_signature(model: nn.Module) -> str:
    c, h, w = _image_shape(model)
    ph, pw = model.patch_embed.patch_size
    return f"stem-vit-c{c}-i{h}x{w}-p{ph}x{pw}-d{model.embed_dim}-t{_total_tokens(model)}"


def head_signature(model: nn.Module) -> str:
    pool = model.global_pool or "none"
    return f"head-vit-d{model.embed_dim}-c{model.num_classes}-{pool}"


def _image_shape(model: nn.Module) -> tuple[int, int, int]:
    h, w = model.patch_embed.img_size
    return (model.patch_embed.proj.in_channels, int(h), int(w))


def _total_tokens(model: nn.Module) -> int:
    return model.num_prefix_tokens + model.patch_embed.num_patches


def _grid(model: nn.Module, fractions: tuple[float, ...]) -> tuple[int, ...]:
    n = model.patch_embed.num_patches
    return tuple(sorted({model.num_prefix_tokens + kept_count(f, n) for f in fractions}))


def _dense(module: nn.Module) -> nn.Module:
    """A plain copy of a (possibly pruned) module: timm's own classes, no selector."""
    from .pruning import unprune

    clone = copy.deepcopy(module)
    if getattr(clone, "spvit_plan", None) is not None:
        unprune(clone)
    return clone.eval()


def model_parts(model: nn.Module, methods: tuple[str, ...] = PROFILED_BY_DEFAULT) -> list[Part]:
    """Distinct measurable parts of a timm ViT: stem, one per block signature, selectors, head."""
    from .pruning import family_for

    family_for(model)  # refuses unsupported models with the list of supported ones
    model = _dense(model)
    dim, prefix = model.embed_dim, model.num_prefix_tokens
    token_input = (InputSpec("x", (dim,)),)
    parts = [
        Part(
            "stem",
            stem_signature(model),
            _Stem(model),
            (InputSpec("image", _image_shape(model), image=True),),
            (_total_tokens(model),),
            dynamic=False,
        ),
    ]
    seen: set[str] = set()
    block_grid = _grid(model, BLOCK_FRACTIONS)
    for block in model.blocks:
        sig = block_signature(block)
        if sig not in seen:
            seen.add(sig)
            parts.append(Part("block", sig, _Block(block), token_input, block_grid, dynamic=True))
            if "tome" in methods:  # blocks after a merge run with the size bias
                inputs = (*token_input, InputSpec("size", (1,), positive=True))
                biased = block_signature(block, proportional=True)
                parts.append(Part("block", biased, _ProportionalBlock(block), inputs, block_grid, dynamic=True))
    heads = model.blocks[0].attn.num_heads
    for method in methods:
        spec = METHODS[method]
        qkv_input = InputSpec("qkv", (model.blocks[0].attn.qkv.out_features,))
        if method == "tome":
            merger = TokenMerger(SELECTOR_PART_KEEP, KeyReader(copy.deepcopy(model.blocks[0].attn)))
            signature = selector_signature(method, dim, heads, prefix)
            grid = _grid(model, SELECTOR_FRACTIONS)
            parts.append(Part("selector", signature, _Selector(merger, prefix), (*token_input, qkv_input), grid, False))
            continue
        if spec.learned_selector:
            scorer: nn.Module = MultiHeadTokenSelector(dim, heads)
            inputs = token_input
        else:
            if not getattr(model, "has_class_token", False):
                continue
            scorer = ClsAttentionScorer(copy.deepcopy(model.blocks[0].attn), prefix)
            inputs = (*token_input, qkv_input)
        reducer = TokenReducer(scorer, SELECTOR_PART_KEEP, spec.package_token_default)
        parts.append(
            Part(
                "selector",
                selector_signature(method, dim, heads, prefix),
                _Selector(reducer, prefix),
                inputs,
                _grid(model, SELECTOR_FRACTIONS),
                dynamic=False,
            )
        )
    parts.append(
        Part("head", head_signature(model), _Head(model), token_input, _grid(model, HEAD_FRACTIONS), dynamic=True)
    )
    return parts


def export_part_onnx(part: Part, path: str | Path, tokens: int | None = None, batch: int = 1) -> Path:
    """ONNX of ``part``: with a dynamic token axis named ``tokens`` if ``tokens`` is None."""
    if tokens is None and not part.dynamic:
        raise ValueError(f"part {part.signature} has static shapes: give a token count")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = part.example_inputs(tokens or part.grid[-1], batch)
    names = [spec.name for spec in part.inputs]
    axes = None
    if tokens is None:
        axes = {spec.name: {1: "tokens"} for spec in part.inputs if not spec.image}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            part.module.eval(),
            example,
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=names,
            output_names=["y"],
            dynamic_axes=axes,
        )
    return path


def export_part_tflite(part: Part, path: str | Path, tokens: int, batch: int = 1) -> Path:
    """TFLite of ``part`` at one token count (TFLite shapes are static)."""
    from .errors import SpvitError

    try:
        import litert_torch
    except ImportError:
        raise SpvitError("TFLite parts need the optional converter: pip install 'spvit-search[tflite]'") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        litert_torch.convert(part.module.eval(), part.example_inputs(tokens, batch)).export(str(path))
    return path
