"""Token pruning for timm's ``SwinTransformer``: window-level pruning with the grid kept whole.

Why windows, not single tokens (what was weighed and measured: the README's Swin section):
window attention needs every window to hold the same number of tokens at fixed positions, and
the next block partitions a *shifted* grid, so a per-token gather breaks both the relative-
position bias and the shifted partition, and per-window top-k of tokens needs its own bias
gather and a restore before every shifted block. Pruning whole windows keeps everything timm
relies on: a kept window is a complete window (its relative-position bias and shift mask
apply unchanged, the mask gathered to the kept windows), and a pruned window is *carried*:
its tokens skip the block unchanged and are put back into the grid, so the roll, the next
partition, ``PatchMerging`` and the average-pooling head all see a whole grid with a real
feature at every position — the pruned content is kept, not lost (SPViT's "soft" pruning;
no separate package token is appended, since nothing is thrown away).

* A selector at location ``L`` scores every token of the block's input grid once; each block
  from ``L`` to the next location (or the stage's end) ranks *its own* partition (the plain or
  the rolled grid) by the mean keep probability of each window's tokens and computes only the
  ``kept_count(keep, windows)`` best windows (attention and MLP), then restores the grid with a
  gather by the inverse ranking (``topk``: LiteRT has no sort kernel).
* Training with a learned selector: every window is computed and a pruned window's output is
  replaced by its input, ``x + m·(block(x) − x)``, with ``m`` the same exact top-k of windows
  (0/1 forward, straight-through gradient into the window's mean keep probability). A window's
  attention never reaches past it, so this equals the inference gather.
* ``norm`` (training-free, for plain checkpoints; Swin has no class token): a token's score is
  its L2 norm, a window's the mean — SparseViT's window importance.

Keep ratios are fractions of the *windows* of the location's stage (Swin-T at 224: 64, 16, 4
and 1 windows of 49 tokens); a stage that is a single window cannot take a selector.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, window_partition
from torch import nn

from ..blocks import InputSpec, ModelPart, Part, selector_signature
from ..models import input_shape
from ..plan import PlanError, PruningPlan, kept_count
from ._base import ModelFamily, UnsupportedModelError
from .layout import ModelLayout, Stage
from .reducer import exact_top_k, gather_tokens
from .selector import MultiHeadTokenSelector
from .state import PruneState

#: windows kept in a measured block part, as fractions of a stage's windows
WINDOW_FRACTIONS = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0)


class TokenNormScorer(nn.Module):
    """Training-free score: a token's L2 norm (as a log, so ``exp`` gives the norm back)."""

    learned = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x.norm(dim=-1).clamp_min(1e-6))


class WindowSelector(nn.Module):
    """The selector of one location: token keep scores on the whole grid, for the blocks of its run.

    A learned scorer reads 2×2 cells (their mean token) where the grid's sides are even, and each
    token takes its cell's score: a window's score is a mean over its 49 tokens anyway, and a
    quarter of the tokens costs a quarter (Swin-T, ORT, 1 thread, three selectors at stages 0-2:
    3.1% of the dense model's latency more than the ``norm`` scorer per token, about 1.5% on
    cells; the goal for all selection is 3%).
    """

    def __init__(self, scorer: nn.Module, keep: float, previous_keep: float = 1.0, cell: int = 2) -> None:
        super().__init__()
        self.scorer = scorer
        self.keep = keep
        self.previous_keep = previous_keep
        self.cell = cell if getattr(scorer, "learned", False) else 1

    def extra_repr(self) -> str:
        return f"keep={self.keep} (of the stage's windows), cell={self.cell}"

    @property
    def acts(self) -> bool:
        """A stage keeping as much as the one before removes no window (training and inference)."""
        return self.keep < self.previous_keep

    def token_logp(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W) keep log-scores of every token of the grid ``x`` (B, H, W, C)."""
        b, h, w, c = x.shape
        cell = self.cell if h % self.cell == 0 and w % self.cell == 0 else 1
        if cell > 1:
            x = x.reshape(b, h // cell, cell, w // cell, cell, c).mean(dim=(2, 4))
        hc, wc = h // cell, w // cell
        tokens = x.reshape(b, hc * wc, c)
        if isinstance(self.scorer, MultiHeadTokenSelector):
            logp = self.scorer(tokens)[..., 1] if self.training else self.scorer.keep_logp(tokens)
        else:
            logp = self.scorer(tokens)
        logp = logp.reshape(b, hc, 1, wc, 1)
        return logp.expand(b, hc, cell, wc, cell).reshape(b, h, w) if cell > 1 else logp.reshape(b, h, w)


class _PrunedSwin:
    """Mixin for the model: one fresh state per forward."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._spvit_state.reset()
        return super().forward_features(x)


class _PrunedSwinStage:
    """Mixin for a stage: window scores never cross a downsampling layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._spvit_state.score_map = None
        return super().forward(x)


class _PrunedSwinBlock:
    """Mixin for a block: timm's forward when no window is pruned, else only the kept windows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state: PruneState = self._spvit_state
        selector = self._modules.get("token_selector")
        if selector is not None:
            state.score_map = (selector.token_logp(x), selector) if selector.acts else None
            if selector.acts and self.training and selector.scorer.learned:
                state.targets.append(selector.keep)
        if state.score_map is None:  # every window, padding included (what the table's block is measured at)
            index: WindowIndex = self.spvit_window_index
            state.token_counts.append(index.windows * index.area)
            return super().forward(x)
        logp, active = state.score_map
        return self._forward_windows(x, logp, active, first=active is selector)

    def _forward_windows(self, x: torch.Tensor, logp: torch.Tensor, selector: WindowSelector, first: bool):
        """Only the kept windows of this block's partition, read and written by one gather each.

        The roll, padding and partition are one static permutation of the grid's tokens
        (``window_index``), so the kept windows' tokens are gathered straight from the grid, and the
        output grid is one gather from [computed windows | input grid]: each position takes its
        window's result if that window was kept, else its own input (carried unchanged).
        """
        state: PruneState = self._spvit_state
        b, h, w, c = x.shape
        index: WindowIndex = self.spvit_window_index
        area, windows = index.area, index.windows
        tokens = torch.cat([x.reshape(b, h * w, c), x.new_zeros(b, 1, c)], dim=1)  # a zero token for padding
        prob = torch.cat([logp.exp().reshape(b, h * w), logp.new_zeros(b, 1)], dim=1)
        window_p = prob[:, index.tokens].reshape(b, windows, area).mean(dim=-1)  # (B, nW) mean keep probability
        k = kept_count(selector.keep, windows)
        mask = self.attn_mask  # (nW, A, A) on shifted blocks, else None
        if self.training and selector.scorer.learned:
            raw = tokens[:, index.tokens].reshape(b * windows, area, c)
            valid = index.valid.reshape(1, windows, area, 1).expand(b, -1, -1, -1).reshape(b * windows, area, 1)
            out = self._compute(raw, valid, mask).reshape(b, windows, area * c)
            hard = exact_top_k(window_p.log(), torch.ones_like(window_p), k)
            if first:
                state.decisions.append(hard)
                state.kept_fraction.append(hard.mean(dim=1))
                state.expected_fraction.append(window_p.clamp(0, 1).mean(dim=1))
                state.keep_logp.append(window_p.clamp_min(1e-6).log())
            hard = hard + (window_p - window_p.detach())
            raw = raw.reshape(b, windows, area * c)
            out = (raw + hard[..., None].to(out.dtype) * (out - raw)).reshape(b, windows * area, c)
            state.token_counts.append(k * area)
            return out[:, index.inverse].reshape(b, h, w, c)
        order = window_p.topk(windows, dim=1, sorted=True).indices  # (B, nW), best first
        kept = order[:, :k]
        offsets = torch.arange(b, device=x.device).unsqueeze(1) * (h * w + 1)
        picked = (index.tokens.reshape(windows, area)[kept] + offsets[..., None]).reshape(-1)  # (B·k·A,)
        raw = tokens.reshape(-1, c)[picked].reshape(b * k, area, c)
        valid = index.valid.reshape(windows, area, 1)[kept.reshape(-1)]
        computed = self._compute(raw, valid, None if mask is None else mask[kept.reshape(-1)])
        # back to the grid: a position whose window was kept reads its result, any other its input
        rank = (-order.float()).topk(windows, dim=1, sorted=True).indices  # inverse permutation, as a TopK
        slot = rank[:, index.window_of]  # (B, H·W): where each position's window was ranked
        source = torch.where(slot < k, slot * area + index.offset_in, k * area + index.position)
        both = torch.cat([computed.reshape(b, k * area, c), x.reshape(b, h * w, c)], dim=1)
        state.token_counts.append(k * area)
        return gather_tokens(both, source).reshape(b, h, w, c)

    def _compute(self, raw: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return window_compute(self, raw, valid, mask)


def window_compute(block: nn.Module, raw: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor | None):
    """Attention and MLP of timm's block on whole windows (B·k, A, C): a pruned block's work.

    ``valid`` (B·k, A, 1) is 0 at padding: timm pads the *normed* grid with zeros."""
    y = raw + block.drop_path1(block.attn(block.norm1(raw) * valid, mask=mask))
    return y + block.drop_path2(block.mlp(block.norm2(y)))


class WindowIndex(nn.Module):
    """A block's partition as static token indices: roll, padding and windows in one permutation.

    Buffers (not saved in checkpoints; moved with the model): ``tokens`` (nW·A,), the grid
    position of each window slot in ``window_partition`` order, ``H·W`` (a zero token) at
    padding; ``valid`` (nW·A, 1), 1 at real positions; per grid position ``window_of`` and
    ``offset_in`` (its window and slot) and ``position`` (itself); ``inverse`` (H·W,), the slot of
    each position, to undo the partition.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        h, w = block.input_resolution
        (wh, ww), (sh, sw) = block.window_size, block.shift_size
        grid = torch.arange(h * w).reshape(1, h, w, 1)
        if sh or sw:
            grid = torch.roll(grid, shifts=(-sh, -sw), dims=(1, 2))
        pad_h, pad_w = (wh - h % wh) % wh, (ww - w % ww) % ww
        grid = F.pad(grid, (0, 0, 0, pad_w, 0, pad_h), value=h * w)
        tokens = window_partition(grid, (wh, ww)).reshape(-1)
        self.area, self.windows = wh * ww, tokens.numel() // (wh * ww)
        real = tokens < h * w
        slot = torch.empty(h * w, dtype=torch.long)
        slot[tokens[real]] = torch.arange(tokens.numel())[real]
        buffers = {"tokens": tokens, "valid": real.float().reshape(-1, 1), "window_of": slot // self.area,
                   "offset_in": slot % self.area, "position": torch.arange(h * w), "inverse": slot}  # fmt: skip
        for name, value in buffers.items():
            self.register_buffer(name, value.to(block.norm1.weight.device), persistent=False)

    def extra_repr(self) -> str:
        return f"windows={self.windows}, area={self.area}"


class SwinFamily(ModelFamily):
    name = "swin"
    description = "timm SwinTransformer (Swin-T/S/B/L, window 7 or 12, 224 or 384): window-level pruning"
    methods = ("spvit", "norm")
    training_free = "norm"

    def supports(self, model: nn.Module) -> bool:
        return isinstance(model, SwinTransformer)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [blk for stage in model.layers for blk in stage.blocks]

    def mixins(self, model: nn.Module) -> list[tuple[nn.Module, type]]:
        stages = [(stage, _PrunedSwinStage) for stage in model.layers]
        return [(model, _PrunedSwin), *stages, *((blk, _PrunedSwinBlock) for blk in self.blocks(model))]

    def layout(self, model: nn.Module) -> ModelLayout:
        stages, start, blocks = [], 0, self.blocks(model)
        for layer in model.layers:
            blk = layer.blocks[0]
            (h, w), (wh, ww) = layer.output_resolution, blk.window_size
            windows = math.ceil(h / wh) * math.ceil(w / ww)
            stages.append(Stage(start, start + len(layer.blocks), windows, 0, blk.dim, blk.attn.num_heads,
                                unit=wh * ww))  # fmt: skip
            start += len(layer.blocks)
        fixed = tuple(
            (_merge_signature(layer), layer.input_resolution[0] * layer.input_resolution[1])
            for layer in model.layers
            if not isinstance(layer.downsample, nn.Identity)
        )
        h, w = model.layers[-1].output_resolution
        return ModelLayout(
            family=self.name,
            stages=tuple(stages),
            stem=_stem_signature(model),
            stem_tokens=model.patch_embed.grid_size[0] * model.patch_embed.grid_size[1],
            blocks=tuple(swin_block_signature(b) for b in blocks),
            proportional_blocks=tuple(swin_block_signature(b) for b in blocks),
            whole_blocks=tuple(swin_block_signature(b, whole=True) for b in blocks),
            head=f"head-swin-d{model.num_features}-c{model.num_classes}-{model.head.global_pool.pool_type or 'none'}",
            head_tokens=h * w,
            fixed=fixed,
            package_tokens=False,
            selector_sees_grid=True,
        )

    def check(self, model: nn.Module, plan: PruningPlan) -> None:
        layout = self.layout(model)
        layout.check(plan)
        if plan.method not in self.methods:
            why = {
                "hard": "a pruned window is always carried unchanged (the grid must stay whole for the shifted "
                "partition and patch merging), so dropping has no meaning here",
                "evit": "Swin has no class token to read attention from",
                "tome": "a merged token has no grid position for the window partition",
            }.get(plan.method, "")
            raise UnsupportedModelError(
                f"method {plan.method!r} is not supported on Swin{': ' + why if why else ''}; use 'spvit' (learned) "
                "or 'norm' (training-free)"
            )
        for loc in plan.locations:
            stage = layout.stage_at(loc)
            if stage.patches < 2:
                raise PlanError(
                    f"location {loc} is in stage {layout.stage_of_block[loc]} (blocks {stage.start}..{stage.stop - 1})"
                    f", whose grid is a single window: window pruning cannot act there"
                )
        if getattr(model.layers[0].blocks[0], "dynamic_mask", False):
            raise UnsupportedModelError("Swin with dynamic_mask=True rebuilds masks per input size; build it without")

    def _install(self, model: nn.Module, plan: PruningPlan) -> None:
        layout, blocks = self.layout(model), self.blocks(model)
        for blk in blocks:
            _exact_zero_mask(blk)
            blk.spvit_window_index = WindowIndex(blk)
        self._swap_in(model, 0)
        ref = next(model.parameters())
        for loc, keep, before in zip(plan.locations, plan.keep, layout.previous_keep(plan), strict=True):
            stage = layout.stage_at(loc)
            if plan.method == "spvit":
                scorer: nn.Module = MultiHeadTokenSelector(stage.dim, stage.heads, prior_keep=keep / before)
            else:
                scorer = TokenNormScorer()
            selector = WindowSelector(scorer, keep, previous_keep=before).to(device=ref.device, dtype=ref.dtype)
            selector.train(model.training)
            blocks[loc].token_selector = selector

    def unpatch(self, model: nn.Module) -> nn.Module:
        for blk in self.blocks(model):
            blk._modules.pop("spvit_window_index", None)
            original = blk._buffers.pop("spvit_timm_mask", None)
            if original is not None:
                blk.attn_mask = original
        return super().unpatch(model)

    # -- measured parts and the search's cached prefix ---------------------------------------
    def parts(self, model: nn.Module, methods: tuple[str, ...]) -> list[Part]:
        layout, blocks = self.layout(model), self.blocks(model)
        parts = [Part("stem", layout.stem, _Stem(model), (InputSpec("image", input_shape(model), image=True),),
                      (layout.stem_tokens,), dynamic=False)]  # fmt: skip
        seen: set[str] = set()
        wanted = [m for m in self.methods if m in methods or m == "norm"]  # the search's proxy is always measured
        for stage, layer in zip(layout.stages, model.layers, strict=True):
            if not isinstance(layer.downsample, nn.Identity):
                h, w = layer.input_resolution
                merge_in = (InputSpec("grid", (h, w, layer.downsample.dim), image=True),)
                parts.append(Part("downsample", _merge_signature(layer), layer.downsample, merge_in, (h * w,),
                                  dynamic=False))  # fmt: skip
            for blk in blocks[stage.start : stage.stop]:
                sig = swin_block_signature(blk)
                if sig not in seen:
                    seen.add(sig)
                    counts = tuple(sorted({kept_count(f, stage.patches) * stage.unit for f in WINDOW_FRACTIONS}))
                    if len(counts) == 1:  # a one-window stage: two windows measured too, for a fit
                        counts = (stage.unit, 2 * stage.unit)
                    parts.append(Part("block", sig, _WindowBlock(blk), (InputSpec("x", (stage.dim,)),), counts,
                                      dynamic=True))  # fmt: skip
                whole = swin_block_signature(blk, whole=True)
                if whole not in seen:
                    seen.add(whole)
                    h, w = blk.input_resolution
                    grid_in = (InputSpec("grid", (h, w, stage.dim), image=True),)
                    parts.append(Part("block", whole, _WholeBlock(blk), grid_in, (stage.patches * stage.unit,),
                                      dynamic=False))  # fmt: skip
            h, w = layer.output_resolution
            for method in wanted:
                sig = selector_signature(method, stage.dim, stage.heads, 0)
                if sig in seen:
                    continue
                seen.add(sig)
                scorer = MultiHeadTokenSelector(stage.dim, stage.heads) if method == "spvit" else TokenNormScorer()
                part = _SelectorPart(WindowSelector(scorer, 0.5).eval(), blocks[stage.start])
                parts.append(Part("selector", sig, part, (InputSpec("grid", (h, w, stage.dim), image=True),),
                                  (h * w,), dynamic=False))  # fmt: skip
        h, w = model.layers[-1].output_resolution
        head_in = (InputSpec("grid", (h, w, model.num_features), image=True),)
        parts.append(Part("head", layout.head, _Head(model), head_in, (h * w,), dynamic=False))
        return parts

    def embed(self, model: nn.Module, images: torch.Tensor, first_block: int) -> torch.Tensor:
        stage, offset = self._stage_of(model, first_block)
        x = model.patch_embed(images)
        for layer in model.layers[:stage]:
            x = layer(x)
        layer = model.layers[stage]
        x = layer.downsample(x)
        for blk in list(layer.blocks)[:offset]:
            x = blk(x)
        return x

    def forward_from(self, model: nn.Module, x: torch.Tensor, first_block: int) -> torch.Tensor:
        stage, offset = self._stage_of(model, first_block)
        state = getattr(model, "_spvit_state", None)
        if state is not None:
            state.reset()
        for blk in list(model.layers[stage].blocks)[offset:]:
            x = blk(x)
        for layer in model.layers[stage + 1 :]:
            x = layer(x)
        return model.forward_head(model.norm(x))

    @staticmethod
    def _stage_of(model: nn.Module, block: int) -> tuple[int, int]:
        for i, layer in enumerate(model.layers):
            if block < len(layer.blocks):
                return i, block
            block -= len(layer.blocks)
        raise IndexError(f"block {block} is outside the model")


def _exact_zero_mask(block: nn.Module) -> None:
    """Give a shifted block's mask −inf where timm's has −100 (the original kept, for ``unprune``).

    timm's −100 makes softmax weights of about e⁻¹⁰⁰ ≈ 4e-44: *denormal* floats, on which x86
    arithmetic is many times slower. Measured on Swin-T's stage-0 shifted block (ORT, 1 thread):
    attention·V took 4.1 ms against 1.1–1.6 ms with denormals flushed, the whole block 13.0 ms
    against 9.5. With −inf the weights are exact zeros (every row keeps its own region, so none is
    all −inf) and the outputs differ from timm's by less than 1e-30 of a value.
    """
    mask = block.attn_mask
    if mask is None or "spvit_timm_mask" in block._buffers:
        return
    block.register_buffer("spvit_timm_mask", mask, persistent=False)
    block.attn_mask = mask.masked_fill(mask < 0, float("-inf"))


def swin_block_signature(block: nn.Module, whole: bool = False) -> str:
    """What sets a Swin block's cost: width, heads, window, MLP width, a shift (its mask); ``whole``:
    the block running timm's own forward on its whole grid (nothing pruned there)."""
    wh, ww = block.window_size
    hidden = block.mlp.fc1.out_features
    sig = f"swin_block-d{block.dim}-h{block.attn.num_heads}-w{wh}x{ww}-mlp{hidden / block.dim:g}"
    sig += "-shift" if any(block.shift_size) else ""
    if whole:
        h, w = block.input_resolution
        sig += f"-whole-g{h}x{w}"
    return sig


def _merge_signature(layer: nn.Module) -> str:
    h, w = layer.input_resolution
    return f"merge-swin-c{layer.downsample.dim}to{layer.downsample.out_dim}-g{h}x{w}"


def _stem_signature(model: nn.Module) -> str:
    c, h, w = input_shape(model)
    ph, pw = model.patch_embed.patch_size
    return f"stem-swin-c{c}-i{h}x{w}-p{ph}x{pw}-d{model.embed_dim}"


class _Stem(ModelPart):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.patch_embed(image)


class _Head(ModelPart):
    """Final norm, average pooling over the whole (restored) grid, classifier."""

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.norm(grid))


class _WindowBlock(nn.Module):
    """A pruned Swin block's path on T tokens = k whole windows (``x``: (B, T, C)): the kept windows
    gathered from the grid (with their shift masks), attention and MLP, and the gather that puts
    them back — static indices, so only the ranking itself is left out (the selector part has it)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        _exact_zero_mask(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blk = self.block
        b, t, c = x.shape
        area = blk.window_size[0] * blk.window_size[1]
        k = t // area
        index = torch.arange(t, device=x.device)
        offsets = torch.arange(b, device=x.device).unsqueeze(1) * (t + 1)
        tokens = torch.cat([x, x.new_zeros(b, 1, c)], dim=1).reshape(-1, c)
        raw = tokens[(index.unsqueeze(0) + offsets).reshape(-1)].reshape(b * k, area, c)
        mask = blk.attn_mask
        if mask is not None:
            mask = mask[torch.arange(k, device=x.device).repeat(b) % mask.shape[0]]
        valid = x.new_ones(b * k, area, 1)
        computed = window_compute(blk, raw, valid, mask).reshape(b, t, c)
        return gather_tokens(torch.cat([computed, x], dim=1), index.unsqueeze(0).expand(b, t))


class _WholeBlock(nn.Module):
    """A block nothing prunes: timm's own forward on the whole grid (exact-zero shift mask)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        _exact_zero_mask(block)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.block(grid)


class _SelectorPart(nn.Module):
    """A location's scoring of the whole grid and one ranking of its windows (the gathers that act
    on the ranking are in each pruned block's part)."""

    def __init__(self, selector: WindowSelector, block: nn.Module) -> None:
        super().__init__()
        self.selector, self.index = selector, WindowIndex(block)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = grid.shape
        prob = torch.cat([self.selector.token_logp(grid).exp().reshape(b, h * w), grid.new_zeros(b, 1)], dim=1)
        window_p = prob[:, self.index.tokens].reshape(b, self.index.windows, self.index.area).mean(dim=-1)
        order = window_p.topk(self.index.windows, dim=1, sorted=True).indices
        return (-order.float()).topk(self.index.windows, dim=1, sorted=True).indices
