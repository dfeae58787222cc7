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

from .plan import PROFILED_BY_DEFAULT, kept_count

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

    kind: str  # "stem" | "block" | "selector" | "downsample" | "head"
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


class PlainBlock(nn.Module):
    """A block called with tokens only (a bare timm ``Block`` traces ``is_causal`` as a tensor)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ProportionalBlock(nn.Module):
    """A block after a merge: ToMe's proportional attention, ``log(size)`` as timm's ``attn_mask``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        return self.block(x, attn_mask=torch.log(size)[:, None, None, :, 0])


class ModelPart(nn.Module):
    """A piece of ``model``'s forward, wrapped for export (the model is held, its weights shared)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


class HeadPart(ModelPart):
    """The final norm and the classifier head, on the tokens the head reads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.norm(x))


def block_signature(block: nn.Module, proportional: bool = False) -> str:
    """What sets a timm ViT ``Block``'s cost; ``proportional``: it runs with ToMe's size bias."""
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


def token_grid(prefix: int, patches: int, fractions: tuple[float, ...]) -> tuple[int, ...]:
    """Token counts to measure: ``prefix`` plus each fraction of ``patches``."""
    return tuple(sorted({prefix + kept_count(f, patches) for f in fractions}))


def dense_copy(module: nn.Module) -> nn.Module:
    """A plain copy of a (possibly pruned) model: timm's own classes, no selector."""
    from .pruning import unprune

    clone = copy.deepcopy(module)
    if getattr(clone, "spvit_plan", None) is not None:
        unprune(clone)
    return clone.eval()


def model_parts(model: nn.Module, methods: tuple[str, ...] = PROFILED_BY_DEFAULT) -> list[Part]:
    """Distinct measurable parts of a model (stem, one per block signature, downsampling layers,
    selectors, head), as its family defines them; unsupported models are refused."""
    from .pruning import family_for

    return family_for(model).parts(dense_copy(model), methods)


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
