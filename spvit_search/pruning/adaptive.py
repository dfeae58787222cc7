"""Per-image token counts (issue 13, after SaiT's adaptive pruning): each image keeps what its
selector expects to keep, within bounds around the plan's count.

The count of an image at a stage is ``round(scale · Σ keep-probabilities)`` over the tokens
reaching it, clamped to ``[min_factor, max_factor] ×`` the plan's count and to at least one
pruned token (the package token always has members). Why the expected count: training keeps
each selector's mean keep probability at the plan's ratio (the ratio loss acts on it with exact
top-k), so at ``scale`` 1 the counts average near the plan's, an image whose selector is sure
of fewer tokens keeps fewer, and ``scale`` moves the whole distribution along the
accuracy/latency curve. The tokens kept are still the top-scored ones: the ranking is the same
as the fixed-count plan's.

Batches: images keep different counts, so a batch is gathered to its largest count and the
extra slots are masked (the attention-key mask of training, ``PruneState.policy``; later
selectors rank them last and never fold them into a package). Each image's result equals its
batch-1 result up to the mask's 1e-6 weight; batch 1 has no padding and runs at its own count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import kept_count


@dataclass(frozen=True)
class AdaptiveCount:
    scale: float = 1.0
    min_factor: float = 0.5
    max_factor: float = 1.5

    def __post_init__(self) -> None:
        if not (self.scale > 0 and 0 < self.min_factor <= 1.0 <= self.max_factor):
            raise ValueError(f"adaptive counts need scale > 0 and 0 < min_factor <= 1 <= max_factor, got {self}")

    def bounds(self, keep: float, num_patches: int) -> tuple[int, int]:
        """Fewest and most tokens an image may keep at a stage of cumulative ``keep``."""
        most = kept_count(min(1.0, keep * self.max_factor), num_patches)
        return kept_count(keep * self.min_factor, num_patches), most

    def counts(self, keep_logp: torch.Tensor, real: torch.Tensor, keep: float, num_patches: int) -> torch.Tensor:
        """(B,) tokens each image keeps, from its keep log-probabilities (B, n) over ``real`` (B, n) tokens."""
        lo, hi = self.bounds(keep, num_patches)
        expected = self.scale * (keep_logp.exp() * real).sum(dim=1)
        k = torch.floor(expected + 0.5).clamp(min=lo, max=hi)
        return torch.minimum(k, real.sum(dim=1) - 1).clamp(min=1).to(torch.int64)


def gather_adaptive(x: torch.Tensor, keep_logp: torch.Tensor, keep: float, package_token: bool, state) -> torch.Tensor:
    """The stage's gather with a count per image (eval); records the counts in ``state.adaptive_counts``."""
    p, n_pkg = state.num_prefix, state.num_packages
    b, n = keep_logp.shape
    patches = x[:, p : p + n]
    real = state.patch_policy if state.patch_policy is not None else keep_logp.new_ones(b, n)
    keep_logp = keep_logp.masked_fill(real <= 0, float("-inf"))  # padding ranks last, folds into nothing
    k = state.adaptive.counts(keep_logp, real, keep, state.num_patches)
    scores, order = keep_logp.topk(n, dim=1, sorted=True)
    ranked = torch.gather(patches, 1, order.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    top = int(k.max())
    slots = torch.arange(n, device=x.device).unsqueeze(0)
    state.adaptive_counts.append(k)
    kept = ranked[:, :top]
    tail, package_real = [], []
    if package_token:
        members = (slots >= k.unsqueeze(1)) & torch.isfinite(scores)
        has = members.any(dim=1, keepdim=True)  # an image left with one real token prunes none
        weights = torch.softmax(scores.masked_fill(~members, float("-inf")).masked_fill(~has, 0.0), dim=1)
        tail = [(weights * members).unsqueeze(1) @ ranked]
        package_real = [has.to(x.dtype)]
        state.num_packages += 1
    # the key mask of the padded slots and empty packages (None: nothing of the batch is padding)
    old_packages = state.package_policy if len(state.package_policy) == n_pkg else [x.new_ones(b, 1)] * n_pkg
    state.package_policy = [*old_packages, *package_real]
    padded = bool((k < top).any()) or any(bool((q < 1).any()) for q in state.package_policy)
    state.patch_policy = (slots[:, :top] < k.unsqueeze(1)).to(x.dtype) if padded else None
    return torch.cat([x[:, :p], kept, x[:, p + n :], *tail], dim=1)
