"""Losses of the soft-pruning fine-tune that read what a pruned model's forward recorded."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .pruning import PruneState


def ratio_loss(state: PruneState) -> torch.Tensor:
    """Mean squared gap between each stage's kept fraction and its target keep ratio.

    With sampled decisions the kept fraction is the mean of the straight-through keep mask, so
    the gradient reaches the selector through the Gumbel-softmax probabilities and moves the
    count. With exact top-k (the default) the count is the plan's already; the loss then acts
    on the selector's expected fraction and only calibrates its keep probabilities. Zero when
    nothing was recorded (eval mode, training-free methods, or every keep ratio at 1.0).
    """
    fractions = state.differentiable_fraction
    if not fractions:
        return torch.zeros(())
    losses = [((frac - target) ** 2).mean() for frac, target in zip(fractions, state.targets, strict=True)]
    return torch.stack(losses).mean()


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) of temperature-softened class distributions, scaled by τ²."""
    s = F.log_softmax(student_logits / tau, dim=-1)
    t = F.log_softmax(teacher_logits / tau, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * tau * tau


def kept_token_mse(student: torch.Tensor, teacher: torch.Tensor, state: PruneState) -> torch.Tensor:
    """MSE between student and dense-teacher patch tokens, over the tokens the student kept.

    In training the student's sequence keeps its length ([prefix | patches | packages]), so its
    patch tokens line up with the teacher's; the final keep mask selects the ones to match.
    """
    p, n = state.num_prefix, state.num_patches
    mask = state.patch_policy
    err = (student[:, p : p + n] - teacher[:, p : p + n]).pow(2).mean(dim=-1)
    return (err * mask).sum() / mask.sum().clamp_min(1.0)


def patch_token_mse(student: torch.Tensor, teacher: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """MSE between every patch token of a dense student and the teacher's (a shallower model's
    token distillation: the same tokens, the same width)."""
    return (student[:, num_prefix:] - teacher[:, num_prefix:]).pow(2).mean()


class SelectorHint(nn.Module):
    """Teaches learned selectors the teacher's class-attention ranking (EViT's score) in training.

    A fresh multi-head selector ranks tokens by its initial weights, while EViT's class
    attention ranks them well from the first step; in a short fine-tune the selector spends
    its budget rediscovering that ranking (seen: calibration top-1 after epoch 1, 69% for
    ``spvit`` against 77% for ``evit`` at the same 55% budget). This term gives each stage
    the top-k of the dense teacher's class attention at the block before it — among the
    tokens the student still keeps, with the plan's count — as a binary target for its keep
    probabilities. The selector can still depart from it where the task loss says so.
    """

    def __init__(self, teacher: nn.Module, locations: tuple[int, ...]) -> None:
        super().__init__()
        from .pruning import family_for
        from .pruning.selector import ClsAttentionScorer

        family = family_for(teacher)
        blocks, layout = family.blocks(teacher), family.layout(teacher)
        # The block before the location; at the first block of a grid (PiT), the location's own
        # block: the one before works on another grid. Readers hold the teacher's attention
        # without registering it: no weights of their own.
        self.readers = []
        for loc in locations:
            stage = layout.stage_at(loc)
            reader = blocks[loc - 1] if loc > stage.start else blocks[loc]
            self.readers.append(ClsAttentionScorer(reader.attn, stage.prefix))
        # the teacher's attention of the last teacher forward, per reader: weight-shared training
        # reads it once for each sparse path of the same step
        self._attention: list[torch.Tensor | None] = [None] * len(self.readers)

    def remove(self) -> None:
        for reader in self.readers:
            reader.remove()

    def forward(self, state: PruneState) -> torch.Tensor:
        """Call after the teacher's forward of the same images (its hooks keep the qkv it needs)."""
        from .plan import kept_count

        losses, previous = [], None
        for i, (reader, logp, policy, keep) in enumerate(zip(self.readers, state.keep_logp, state.decisions,
                                                              state.targets, strict=True)):  # fmt: skip
            if reader._qkv is not None:  # the teacher ran since the last read
                self._attention[i] = reader.class_attention(logp.shape[1])
            attention = self._attention[i]
            if attention is None or attention.shape != logp.shape:
                raise RuntimeError("the selector hint ran before the teacher's forward of these images")
            same_grid = previous is not None and previous.shape == logp.shape  # a new grid starts whole
            alive = previous.detach() if same_grid else torch.ones_like(logp)
            ranked = attention.masked_fill(alive <= 0, float("-inf"))
            target = torch.zeros_like(logp).scatter(1, ranked.topk(kept_count(keep, logp.shape[1]), dim=1).indices, 1.0)
            log_drop = torch.log1p(-logp.exp().clamp(max=1 - 1e-6))
            bce = -(target * logp + (1 - target) * log_drop)
            losses.append((bce * alive).sum() / alive.sum().clamp_min(1.0))
            previous = policy
        return torch.stack(losses).mean() if losses else torch.zeros(())


class LatencyPenalty(nn.Module):
    """The paper's latency-aware loss: predicted latency from the *expected* token counts.

    Each stage's expected token count is its mean kept fraction × patches (differentiable
    through the straight-through decisions); the latency table's fitted curves turn them into
    milliseconds (calibrated if the table is), and ``relu(predicted / target − 1)²`` penalises
    only what exceeds the target.
    """

    def __init__(self, latency, plan, target_ms: float) -> None:
        super().__init__()
        if target_ms <= 0:
            raise ValueError("target_ms must be positive")
        self.target_ms = target_ms
        self.latency, self.plan = latency, plan
        coef = latency._block_coef
        self.register_buffer("block_coef", torch.tensor(coef, dtype=torch.float32), persistent=False)
        sels, _ = latency.method_parts(plan.method)
        head = latency._head_fit
        self._sels = [(sel.a, sel.b, sel.c) for sel in sels]
        self._head = (head.a, head.b, head.c)
        previous = latency.layout.previous_keep(plan)
        # the stages that act in training (keep below what reaches them), in the order they record
        self._acting = [loc for s, loc in enumerate(plan.locations) if plan.keep[s] < previous[s]]

    def predicted_ms(self, kept_fraction: list[torch.Tensor]) -> torch.Tensor:
        lat, layout = self.latency, self.latency.layout
        fraction = dict(zip(self._acting, kept_fraction, strict=True))
        tokens: list[torch.Tensor] = []
        selector = torch.zeros(())
        carried = 0
        for s_idx, stage in enumerate(layout.stages):
            kept, packages = torch.tensor(float(stage.patches)), 0
            for block in stage.blocks:
                if block in fraction:
                    entering = stage.prefix + carried + packages
                    entering = entering + (stage.patches if layout.selector_sees_grid else kept) * stage.unit
                    a, b, c = self._sels[s_idx]
                    selector = selector + a + b * entering + c * entering * entering
                    packages += int(self.plan.package_token and layout.package_tokens)
                    kept = fraction[block].mean() * stage.patches
                tokens.append(
                    torch.as_tensor(stage.prefix + carried + kept * stage.unit + packages, dtype=torch.float32)
                )
            if layout.carry_packages:
                carried += packages
        t = torch.stack(tokens)
        c = self.block_coef
        blocks = (c[:, 0] + c[:, 1] * t + c[:, 2] * t * t).sum()
        a, b, cc = self._head
        last = t[-1] if layout.head_tokens is None else torch.tensor(float(layout.head_tokens))
        total = lat._stem_ms + lat._downsample_ms + blocks + selector + a + b * last + cc * last * last
        return lat.calibration.scale * total + lat.calibration.offset_ms

    def forward(self, kept_fraction: list[torch.Tensor]) -> torch.Tensor:
        return F.relu(self.predicted_ms(kept_fraction) / self.target_ms - 1.0).pow(2)


class HandedGridMSE:
    """Token distillation for a family whose final features hold no patch tokens (PiT: the class
    tokens only, so the kept-token MSE has nothing to match): the grid each stage hands to the
    next pooling layer, matched to the dense teacher's at the same point, over every position.

    Every position is filled there (kept tokens, and pruned ones carried: moved by their package
    token's update for a learned selector, in training as at inference), so this is the loss the
    pooling layer's input answers to; without it a pruned stage is steered only by the logits.
    Forward hooks keep the grids of the forward calls made while ``recording``.
    """

    def __init__(self, student: Sequence[nn.Module], teacher: Sequence[nn.Module]) -> None:
        if len(student) != len(teacher) or not student:
            raise ValueError(f"{len(student)} student and {len(teacher)} teacher grids do not pair up")
        self.recording = False
        self._student: list[torch.Tensor] = []
        self._teacher: list[torch.Tensor] = []
        self._hooks = [m.register_forward_hook(self._keeper(self._student)) for m in student]
        self._hooks += [m.register_forward_hook(self._keeper(self._teacher)) for m in teacher]

    def _keeper(self, into: list[torch.Tensor]):
        def keep(module: nn.Module, args: tuple, output) -> None:
            if self.recording:
                into.append(output[0] if isinstance(output, tuple) else output)

        return keep

    def start(self) -> None:
        """Forget the last step's grids and keep those of the next forward calls."""
        self._student.clear()
        self._teacher.clear()
        self.recording = True

    def loss(self) -> torch.Tensor:
        """Mean over the handed grids of the student's MSE to the teacher (call after both forwards)."""
        self.recording = False
        if len(self._student) != len(self._teacher) or not self._student:
            raise RuntimeError(
                f"grid distillation saw {len(self._student)} student and {len(self._teacher)} teacher grids: "
                "run the teacher and the student once each after start()"
            )
        return torch.stack([(s - t).pow(2).mean() for s, t in zip(self._student, self._teacher, strict=True)]).mean()

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._student.clear()
        self._teacher.clear()
