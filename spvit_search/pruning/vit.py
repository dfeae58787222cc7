"""Token pruning for timm's ``VisionTransformer`` family (ViT, DeiT, DeiT distilled, DeiT-III, …).

One stage: every block works on the same ``prefix + patches`` sequence. The model keeps its
own forwards. Its class is swapped for a subclass that resets the shared
:class:`PruneState` before ``forward_features`` and pools masked tokens out in training; each
block's class for a subclass that runs the stage's :class:`TokenReducer` (only at selector
locations), records the token count and passes the training mask as timm's ``attn_mask``.
"""

from __future__ import annotations

import inspect

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..blocks import HEAD_FRACTIONS, HeadPart, InputSpec, ModelPart, Part, block_signature, token_grid
from ..models import input_shape
from ..plan import PlanError, PruningPlan
from ._base import ModelFamily, UnsupportedModelError
from .layout import ModelLayout, Stage
from .parts import stage_block_parts, stage_selector_parts
from .state import PruneState


class _PrunedViT:
    """Mixin for the model: one fresh state per forward; masked average pooling in training."""

    def forward_features(self, *args, **kwargs):
        self._spvit_state.reset()
        return super().forward_features(*args, **kwargs)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        """Average pooling counts a masked token for nothing and a merged one for its patches."""
        state: PruneState = self._spvit_state
        weight = state.policy
        if weight is None and state.token_size is not None:
            weight = state.token_size[..., 0]
        if weight is not None and self.attn_pool is None and (pool_type or self.global_pool) == "avg":
            start = 0 if self.pool_include_prefix else self.num_prefix_tokens
            w = weight[:, start:, None].to(x.dtype)
            return (x[:, start:] * w).sum(dim=1) / w.sum(dim=1).clamp_min(1e-6)
        return super().pool(x, pool_type)


class _PrunedBlock:
    """Mixin for a block: optional token reduction first, then timm's own forward with the mask."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        return self._run(self._reduce(x), attn_mask, is_causal)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        reducer = self._modules.get("token_selector")
        return x if reducer is None else reducer(x, self._spvit_state)

    def _run(self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        state: PruneState = self._spvit_state
        state.token_counts.append(x.shape[1])
        bias = state.attn_bias(x.dtype)
        if bias is not None:
            if attn_mask is not None:
                raise ValueError("a caller's attn_mask cannot be combined with training-time token masks")
            attn_mask = bias
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)


class VitFamily(ModelFamily):
    name = "vit"
    description = (
        "timm VisionTransformer and subclasses (ViT, DeiT, DeiT distilled, DeiT-III/LayerScale, "
        "qk-norm, register tokens)"
    )

    methods = ("spvit", "hard", "evit", "tome")

    def supports(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def layout(self, model: nn.Module) -> ModelLayout:
        blocks = self.blocks(model)
        prefix, patches = model.num_prefix_tokens, model.patch_embed.num_patches
        stage = Stage(0, len(blocks), patches, prefix, model.embed_dim, blocks[0].attn.num_heads)
        return ModelLayout(
            family=self.name,
            stages=(stage,),
            stem=_stem_signature(model),
            stem_tokens=prefix + patches,
            blocks=tuple(block_signature(b) for b in blocks),
            proportional_blocks=tuple(block_signature(b, proportional=True) for b in blocks),
            head=_head_signature(model),
            head_tokens=None,
        )

    def check(self, model: nn.Module, plan: PruningPlan) -> None:
        self.layout(model).check(plan)
        self.check_method(plan)
        for i, blk in enumerate(model.blocks):
            if "attn_mask" not in inspect.signature(type(blk).forward).parameters:
                raise UnsupportedModelError(
                    f"block {i} ({type(blk).__name__}) takes no attn_mask; token pruning needs timm >= 1.0.16 blocks"
                )
        if plan.method in ("evit", "tome"):  # both read the previous block's qkv (block 0: tome matches on x)
            for loc in (loc for loc in plan.locations if loc > 0):
                attn = model.blocks[loc - 1].attn
                if not isinstance(getattr(attn, "qkv", None), nn.Linear) or not hasattr(attn, "head_dim"):
                    raise UnsupportedModelError(
                        f"method {plan.method!r} needs a timm Attention with a fused qkv projection in block "
                        f"{loc - 1}, found {type(attn).__name__}"
                    )
        if plan.method == "evit":
            if not getattr(model, "has_class_token", False):
                raise UnsupportedModelError(
                    "method 'evit' scores tokens by class-token attention; this model has no class token"
                )
            if plan.locations[0] < 1:
                raise PlanError(
                    "method 'evit' reads the attention of the block before each location; locations must be >= 1"
                )
        if plan.spec.learned_selector and getattr(model, "attn_pool", None) is not None:
            raise UnsupportedModelError(
                f"method {plan.method!r} trains with token masks, which attention pooling ('map') would ignore; "
                "supported pools: 'token', 'avg'"
            )

    def mixins(self, model: nn.Module) -> list[tuple[nn.Module, type]]:
        return [(model, _PrunedViT), *((blk, _PrunedBlock) for blk in model.blocks)]

    # -- measured parts and the search's cached prefix ---------------------------------------
    def parts(self, model: nn.Module, methods: tuple[str, ...]) -> list[Part]:
        layout = self.layout(model)
        stage = layout.stages[0]
        image = (InputSpec("image", input_shape(model), image=True),)
        parts = [Part("stem", layout.stem, _Stem(model), image, (layout.stem_tokens,), dynamic=False)]
        parts += stage_block_parts(self.blocks(model), stage, methods, set())
        has_cls = bool(getattr(model, "has_class_token", False))
        parts += stage_selector_parts(stage, model.blocks[0].attn, has_cls, methods, set())
        head_grid = token_grid(stage.prefix, stage.patches, HEAD_FRACTIONS)
        parts.append(
            Part("head", layout.head, HeadPart(model), (InputSpec("x", (stage.dim,)),), head_grid, dynamic=True)
        )
        return parts

    def embed(self, model: nn.Module, images: torch.Tensor, first_block: int) -> torch.Tensor:
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        for block in list(model.blocks)[:first_block]:
            x = block(x)
        return x

    def forward_from(self, model: nn.Module, x: torch.Tensor, first_block: int) -> torch.Tensor:
        state = getattr(model, "_spvit_state", None)
        if state is not None:
            state.reset()
        for block in list(model.blocks)[first_block:]:
            x = block(x)
        return model.forward_head(model.norm(x))


class _Stem(ModelPart):
    """Patch and position embedding: the sequence entering the first block."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(image))))


def _stem_signature(model: nn.Module) -> str:
    c, h, w = input_shape(model)
    ph, pw = model.patch_embed.patch_size
    tokens = model.num_prefix_tokens + model.patch_embed.num_patches
    return f"stem-vit-c{c}-i{h}x{w}-p{ph}x{pw}-d{model.embed_dim}-t{tokens}"


def _head_signature(model: nn.Module) -> str:
    return f"head-vit-d{model.embed_dim}-c{model.num_classes}-{model.global_pool or 'none'}"
