"""Token pruning for timm's ``VisionTransformer`` family (ViT, DeiT, DeiT distilled, DeiT-III, …).

The model keeps its own forwards. Its class is swapped for a subclass that resets the shared
:class:`PruneState` before ``forward_features`` and pools masked tokens out in training; each
block's class for a subclass that runs the stage's :class:`TokenReducer` (only at selector
locations), records the token count and passes the training mask as timm's ``attn_mask``.
"""

from __future__ import annotations

import inspect

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..plan import PlanError, PruningPlan, kept_count
from ._base import ModelFamily, UnsupportedModelError, swap_class, unswap_class
from .merge import KeyReader, TokenMerger
from .reducer import TokenReducer
from .selector import ClsAttentionScorer, MultiHeadTokenSelector, PreviousQkv
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
        state: PruneState = self._spvit_state
        reducer = self._modules.get("token_selector")
        if reducer is not None:
            x = reducer(x, state)
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

    def supports(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def depth(self, model: nn.Module) -> int:
        return len(model.blocks)

    def check(self, model: nn.Module, plan: PruningPlan) -> None:
        plan.check_depth(len(model.blocks))
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

    def patch(self, model: nn.Module, plan: PruningPlan) -> nn.Module:
        self.check(model, plan)
        current: PruningPlan | None = getattr(model, "spvit_plan", None)
        same_layout = current is not None and (current.method, current.locations, current.package_token) == (
            plan.method,
            plan.locations,
            plan.package_token,
        )
        if current is not None and not same_layout:
            self.unpatch(model)
        if same_layout:  # keep trained selectors, change only how many tokens they keep
            for loc, keep, previous in zip(plan.locations, plan.keep, (1.0, *plan.keep), strict=False):
                reducer = model.blocks[loc].token_selector
                reducer.keep, reducer.previous_keep = keep, previous
        else:
            self._install(model, plan)
        model.spvit_plan = plan
        return model

    def _install(self, model: nn.Module, plan: PruningPlan) -> None:
        state = PruneState(num_prefix=model.num_prefix_tokens)
        model._spvit_state = state
        swap_class(model, _PrunedViT)
        for blk in model.blocks:
            blk._spvit_state = state
            swap_class(blk, _PrunedBlock)
        ref = next(model.parameters())
        for loc, keep, previous_keep in zip(plan.locations, plan.keep, (1.0, *plan.keep), strict=False):
            blk = model.blocks[loc]
            if plan.method == "tome":
                keys = KeyReader(model.blocks[loc - 1].attn) if loc > 0 else None
                blk.token_selector = TokenMerger(keep, keys, previous_keep=previous_keep)
                continue
            if plan.spec.learned_selector:
                scorer = MultiHeadTokenSelector(model.embed_dim, blk.attn.num_heads, prior_keep=keep / previous_keep)
            else:
                scorer = ClsAttentionScorer(model.blocks[loc - 1].attn, model.num_prefix_tokens)
            reducer = TokenReducer(scorer, keep, plan.package_token, previous_keep=previous_keep)
            reducer = reducer.to(device=ref.device, dtype=ref.dtype)
            reducer.train(model.training)
            blk.token_selector = reducer

    def unpatch(self, model: nn.Module) -> nn.Module:
        for blk in model.blocks:
            reducer = blk._modules.pop("token_selector", None)
            for hooked in reducer.modules() if reducer is not None else ():
                if isinstance(hooked, PreviousQkv):
                    hooked.remove()
            unswap_class(blk, _PrunedBlock)
            blk.__dict__.pop("_spvit_state", None)
        unswap_class(model, _PrunedViT)
        model.__dict__.pop("_spvit_state", None)
        model.__dict__.pop("spvit_plan", None)
        return model

    def tokens_per_block(self, model: nn.Module, plan: PruningPlan) -> tuple[int, ...]:
        plan.check_depth(len(model.blocks))
        num_patches = model.patch_embed.num_patches
        stage_keep = dict(zip(plan.locations, plan.keep, strict=True))
        n, packages, counts = num_patches, 0, []
        for i in range(len(model.blocks)):
            keep = stage_keep.get(i, 1.0)
            k = kept_count(keep, num_patches)
            if keep < 1.0 and k < n:
                n = k
                packages += int(plan.package_token)
            counts.append(model.num_prefix_tokens + n + packages)
        return tuple(counts)
