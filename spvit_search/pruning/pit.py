"""Token pruning for timm's ``PoolingVisionTransformer`` (PiT, incl. distilled: two class tokens).

PiT runs stages of timm ViT ``Block``s on token grids that shrink by pooling (27² → 14² → 7²
on PiT-S). Pruning works inside a stage like on a flat ViT; before the stage hands its grid to
the next pooling layer (a depthwise convolution) the grid is restored:

* Inference: a pruned token is *parked* with its grid position and skips the stage's
  remaining blocks; at the stage's end the kept and parked tokens are put back in grid order
  (a gather by the inverse permutation, computed with ``topk`` since LiteRT has no sort
  kernel). The convolution sees every position with a real feature, never a zero. A token a
  learned selector folded into a package comes back moved by that package's update (see
  ``_carried``); others come back unchanged.
* Training (masks, the batch keeps one length): a masked patch token passes each later block
  of its stage the same way (``x + mask·(block(x) − x)``, plus its package's update in that
  block), so the grid the pooling sees is the one inference restores, and the mask's
  straight-through gradient still reaches the selector.

Package tokens are appended after the patches and leave the stage with the class tokens: they
ride through the pooling layer's ``fc`` like a class token and are never pruned again. Keep
ratios are fractions of the grid of the location's stage (see ``layout.py``).
"""

from __future__ import annotations

import inspect

import torch
from timm.models.pit import PoolingVisionTransformer
from torch import nn

from ..blocks import HeadPart, InputSpec, ModelPart, Part, block_signature
from ..models import input_shape
from ..plan import PlanError, PruningPlan
from ._base import ModelFamily, UnsupportedModelError
from .layout import ModelLayout, Stage
from .parts import stage_block_parts, stage_selector_parts
from .reducer import gather_tokens
from .state import PruneState
from .vit import _PrunedBlock


class _PrunedPit:
    """Mixin for the model: one fresh state per forward."""

    def forward_features(self, *args, **kwargs):
        self._spvit_state.reset()
        return super().forward_features(*args, **kwargs)


class _PrunedPitBlock(_PrunedBlock):
    """A ViT block whose masked patch tokens (training) skip it as parked ones do: unchanged, or
    moved by their package token's update where they were folded into one."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        x = self._reduce(x)
        out = self._run(x, attn_mask, is_causal)
        state = self._spvit_state
        policy = state.policy
        if policy is None:
            return out
        delta = out - x
        update = policy[..., None].to(out.dtype) * delta
        if state.package_members:
            p, n = state.num_prefix, state.num_patches
            follow = sum(m[..., None].to(out.dtype) * delta[:, p + n + j : p + n + j + 1]
                         for j, m in enumerate(state.package_members))  # fmt: skip
            update = update + torch.nn.functional.pad(follow, (0, 0, p, delta.shape[1] - p - n))
        return x + update


class _PrunedPitStage:
    """Mixin for a stage (timm's ``pit.Transformer``): its forward, with the grid bookkeeping."""

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        grid, cls_tokens = x
        if self.pool is not None:
            grid, cls_tokens = self.pool(grid, cls_tokens)
        shape = grid.shape
        seq = self.norm(torch.cat((cls_tokens, grid.flatten(2).transpose(1, 2)), dim=1))
        begin_stage(self._spvit_state, cls_tokens.shape[1], seq)
        return end_stage(self._spvit_state, self.blocks(seq), cls_tokens.shape[1], shape)


def begin_stage(state: PruneState | None, prefix: int, seq: torch.Tensor) -> None:
    """Start a new token grid: its own prefix, patch count, masks and grid positions."""
    if state is None:
        return
    state.num_prefix, state.num_patches, state.num_packages = prefix, None, 0
    state.patch_policy, state.package_policy = None, []
    n = seq.shape[1] - prefix
    state.positions = torch.arange(n, device=seq.device).unsqueeze(0).expand(seq.shape[0], n)
    state.parked, state.parked_packages, state.package_members = [], [], []


def end_stage(state: PruneState | None, seq: torch.Tensor, prefix: int, shape: torch.Size
              ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The stage's output grid (B, C, H, W) with every position filled, and its class tokens
    followed by the stage's package tokens."""
    packages = state.num_packages if state is not None else 0
    n = seq.shape[1] - prefix - packages
    cls_tokens, patches = seq[:, :prefix], seq[:, prefix : prefix + n]
    if state is not None and state.parked:
        patches = _restore(patches, state.positions, _carried(state, seq[:, prefix + n :]))
    if packages:
        if state.patch_policy is not None:  # training: the packages' masks ride along
            before = state.prefix_policy
            if before is None:
                before = state.patch_policy.new_ones(seq.shape[0], prefix)
            state.prefix_policy = torch.cat([before, *state.package_policy], dim=1)
        cls_tokens = torch.cat([cls_tokens, seq[:, prefix + n :]], dim=1)
    b, c, h, w = shape
    return patches.transpose(1, 2).reshape(b, c, h, w), cls_tokens


def _carried(state: PruneState, packages: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The parked tokens as they re-enter the grid: each moved by what the blocks it skipped added
    to the package token it was folded into (the package's output minus the package as folded).

    Why not unchanged: a parked token then reaches the pooling layer with the features of an
    earlier block, which the convolution never saw there. The package is the weighted mean of
    exactly those tokens, so its update is the first-order estimate of theirs, for one add.
    Measured on ``pit_demo_fashion``, fine-tuned SPViT at keep 0.5 before blocks 1 and 4, seeds
    0-2: 81.48% ± 1.67 unchanged (one seed fell to 79.55%), 82.58% ± 0.29 moved, against an
    83.58% teacher; a plan pruning the second grid harder gave 81.95% and 81.86%
    (``benchmarks/results/pit_carry_ab.json``). Only a learned selector's
    package moves its members (SPViT trains with it): training-free EViT lost more moved than
    unchanged when its first grid was pruned (71.95% against 78.65%, keep 0.4 / 0.12 / 0.65
    before blocks 1, 2, 5), so EViT's fused token keeps its published meaning. Tokens pruned
    without a package re-enter unchanged.
    """
    carried = []
    for (tokens, positions), folded in zip(state.parked, state.parked_packages, strict=True):
        if folded is not None:
            j, package = folded
            tokens = tokens + (packages[:, j : j + 1] - package)
        carried.append((tokens, positions))
    return carried


def _restore(kept: torch.Tensor, positions: torch.Tensor, parked: list[tuple[torch.Tensor, torch.Tensor]]):
    """Kept and parked tokens back in grid order: gather by the inverse of their positions."""
    values = torch.cat([kept, *(tokens for tokens, _ in parked)], dim=1)
    where = torch.cat([positions, *(pos for _, pos in parked)], dim=1)
    inverse = (-where.float()).topk(where.shape[1], dim=1, sorted=True).indices  # argsort, as a TopK
    return gather_tokens(values, inverse)


class PitFamily(ModelFamily):
    name = "pit"
    description = "timm PoolingVisionTransformer (PiT-Ti/XS/S/B, distilled: two class tokens)"

    methods = ("spvit", "hard", "evit")

    def supports(self, model: nn.Module) -> bool:
        return isinstance(model, PoolingVisionTransformer)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [blk for stage in model.transformers for blk in stage.blocks]

    def mixins(self, model: nn.Module) -> list[tuple[nn.Module, type]]:
        stages = [(stage, _PrunedPitStage) for stage in model.transformers]
        return [(model, _PrunedPit), *stages, *((blk, _PrunedPitBlock) for blk in self.blocks(model))]

    def handed_grids(self, model: nn.Module) -> list[nn.Module]:
        """Every stage but the last: its output grid enters the next pooling layer (the last grid is
        dropped by timm's head, which reads the class tokens)."""
        return list(model.transformers[:-1])

    def layout(self, model: nn.Module) -> ModelLayout:
        blocks, stages, start = self.blocks(model), [], 0
        grids = grid_sizes(model)
        for t, (h, w) in zip(model.transformers, grids, strict=True):
            attn = t.blocks[0].attn
            stages.append(Stage(start, start + len(t.blocks), h * w, model.num_tokens, attn.qkv.in_features,
                                attn.num_heads))  # fmt: skip
            start += len(t.blocks)
        pools = [
            (_pool_signature(t.pool, hw, model.num_tokens), model.num_tokens)
            for t, hw in zip(model.transformers[1:], grids[:-1], strict=True)
        ]
        return ModelLayout(
            family=self.name,
            stages=tuple(stages),
            stem=_stem_signature(model),
            stem_tokens=model.num_tokens + stages[0].patches,
            blocks=tuple(block_signature(b) for b in blocks),
            proportional_blocks=tuple(block_signature(b, proportional=True) for b in blocks),
            head=f"head-pit-d{model.embed_dim}-c{model.num_classes}-t{model.num_tokens}",
            head_tokens=model.num_tokens,
            fixed=tuple(pools),
            carry_packages=True,
        )

    def check(self, model: nn.Module, plan: PruningPlan) -> None:
        layout = self.layout(model)
        layout.check(plan)
        if plan.method == "tome":
            raise UnsupportedModelError(
                "method 'tome' is not supported on PiT: a merged token has no single grid position to restore "
                "before the pooling layer; use 'spvit', 'hard' or 'evit'"
            )
        self.check_method(plan)
        for i, blk in enumerate(self.blocks(model)):
            if "attn_mask" not in inspect.signature(type(blk).forward).parameters:
                raise UnsupportedModelError(
                    f"block {i} ({type(blk).__name__}) takes no attn_mask; token pruning needs timm >= 1.0.16 blocks"
                )
        if plan.method == "evit":
            for loc in plan.locations:
                stage = layout.stage_at(loc)
                if loc == stage.start:
                    raise PlanError(
                        f"method 'evit' reads the attention of the block before each location; location {loc} is "
                        f"the first block of the stage on the {stage.patches}-token grid (blocks "
                        f"{stage.start}..{stage.stop - 1}): place it at {stage.start + 1} or later"
                    )

    # -- measured parts and the search's cached prefix ---------------------------------------
    def parts(self, model: nn.Module, methods: tuple[str, ...]) -> list[Part]:
        if "tome" in methods:
            raise UnsupportedModelError("method 'tome' is not supported on PiT; profile without it (--methods)")
        layout, blocks = self.layout(model), self.blocks(model)
        c, h, w = input_shape(model)
        parts = [
            Part("stem", layout.stem, _Stem(model), (InputSpec("image", (c, h, w), image=True),),
                 (layout.stem_tokens,), dynamic=False),
        ]  # fmt: skip
        seen_blocks: set[str] = set()
        seen_selectors: set[str] = set()
        grids = grid_sizes(model)
        for i, (stage, t) in enumerate(zip(layout.stages, model.transformers, strict=True)):
            if i > 0:
                sig, tokens = layout.fixed[i - 1]
                before = layout.stages[i - 1]
                inputs = (InputSpec("grid", (before.dim, *grids[i - 1]), image=True), InputSpec("cls", (before.dim,)))
                parts.append(Part("downsample", sig, _Pool(t), inputs, (tokens,), dynamic=False))
            parts += stage_block_parts(blocks, stage, methods, seen_blocks)
            parts += stage_selector_parts(stage, t.blocks[0].attn, True, methods, seen_selectors)
        head_input = (InputSpec("cls", (model.embed_dim,)),)
        parts.append(Part("head", layout.head, HeadPart(model), head_input, (model.num_tokens,), dynamic=False))
        return parts

    def embed(self, model: nn.Module, images: torch.Tensor, first_block: int) -> torch.Tensor:
        stage, offset = self._stage_of(model, first_block)
        grid = model.pos_drop(model.patch_embed(images) + model.pos_embed)
        cls_tokens = model.cls_token.expand(grid.shape[0], -1, -1)
        for t in model.transformers[:stage]:
            grid, cls_tokens = t((grid, cls_tokens))
        t = model.transformers[stage]
        if t.pool is not None:
            grid, cls_tokens = t.pool(grid, cls_tokens)
        x = t.norm(torch.cat((cls_tokens, grid.flatten(2).transpose(1, 2)), dim=1))
        for blk in list(t.blocks)[:offset]:
            x = blk(x)
        return x

    def forward_from(self, model: nn.Module, x: torch.Tensor, first_block: int) -> torch.Tensor:
        stage, offset = self._stage_of(model, first_block)
        state = getattr(model, "_spvit_state", None)
        if state is not None:
            state.reset()
        prefix = model.num_tokens
        begin_stage(state, prefix, x)
        t = model.transformers[stage]
        for blk in list(t.blocks)[offset:]:
            x = blk(x)
        h, w = grid_sizes(model)[stage]
        grid, cls_tokens = end_stage(state, x, prefix, torch.Size((x.shape[0], x.shape[2], h, w)))
        for t in model.transformers[stage + 1 :]:
            grid, cls_tokens = t((grid, cls_tokens))
        return model.forward_head(model.norm(cls_tokens))

    @staticmethod
    def _stage_of(model: nn.Module, block: int) -> tuple[int, int]:
        for i, t in enumerate(model.transformers):
            if block < len(t.blocks):
                return i, block
            block -= len(t.blocks)
        raise IndexError(f"block {block} is outside the model")


def grid_sizes(model: nn.Module) -> list[tuple[int, int]]:
    """(height, width) of each stage's token grid, from the stem and pooling convolutions."""
    h, w = model.patch_embed.height, model.patch_embed.width
    sizes = []
    for t in model.transformers:
        if t.pool is not None:
            conv = t.pool.conv
            h = (h + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
            w = (w + 2 * conv.padding[1] - conv.kernel_size[1]) // conv.stride[1] + 1
        sizes.append((h, w))
    return sizes


class _Stem(ModelPart):
    """Patch embedding, position embedding, class tokens: the first stage's input sequence."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        m = self.model
        grid = m.pos_drop(m.patch_embed(image) + m.pos_embed)
        cls_tokens = m.cls_token.expand(grid.shape[0], -1, -1)
        return m.transformers[0].norm(torch.cat((cls_tokens, grid.flatten(2).transpose(1, 2)), dim=1))


class _Pool(nn.Module):
    """A stage's pooling layer and the flatten/concatenate into its first block's sequence."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, grid: torch.Tensor, cls_tokens: torch.Tensor) -> torch.Tensor:
        grid, cls_tokens = self.stage.pool(grid, cls_tokens)
        return self.stage.norm(torch.cat((cls_tokens, grid.flatten(2).transpose(1, 2)), dim=1))


def _stem_signature(model: nn.Module) -> str:
    c, h, w = input_shape(model)
    conv = model.patch_embed.conv
    k, s = conv.kernel_size[0], conv.stride[0]
    tokens = model.num_tokens + model.patch_embed.height * model.patch_embed.width
    return f"stem-pit-c{c}-i{h}x{w}-k{k}s{s}-d{conv.out_channels}-t{tokens}"


def _pool_signature(pool: nn.Module, grid: tuple[int, int], prefix: int) -> str:
    conv = pool.conv
    return f"pool-pit-c{conv.in_channels}to{conv.out_channels}-g{grid[0]}x{grid[1]}-k{conv.kernel_size[0]}-t{prefix}"
