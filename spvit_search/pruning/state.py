"""Per-forward bookkeeping shared by the patched modules of one model.

Blocks of a pruned model must agree on where the prefix, patch and package tokens are and,
in training, on which tokens are masked. Like ToMe's ``_tome_info``, one small object is
shared by the model and its blocks and reset at the start of every forward. After a forward
it holds what the training losses need (decisions, kept fractions, the final token policy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_MASK_EPS = 1e-6  # log(policy + eps): masked keys get ~1e-6 of their weight, gradients stay finite


@dataclass
class PruneState:
    num_prefix: int
    train_count: str = "exact"  # how a learned selector picks tokens in training: "exact" top-k or "sampled"
    num_patches: int | None = None  # patch tokens entering the first stage
    num_packages: int = 0  # package tokens appended at the end of the sequence so far
    patch_policy: torch.Tensor | None = None  # train: (B, num_patches) straight-through keep mask
    package_policy: list[torch.Tensor] = field(default_factory=list)  # train: (B, 1) per package
    decisions: list[torch.Tensor] = field(default_factory=list)  # train: cumulative keep mask per stage
    kept_fraction: list[torch.Tensor] = field(default_factory=list)  # train: (B,) per stage
    expected_fraction: list[torch.Tensor] = field(default_factory=list)  # train: (B,) differentiable, per stage
    targets: list[float] = field(default_factory=list)  # keep ratio aimed at, per recorded stage
    keep_logp: list[torch.Tensor] = field(default_factory=list)  # train: (B, num_patches) selector output, per stage
    token_counts: list[int] = field(default_factory=list)  # tokens entering each block
    token_size: torch.Tensor | None = None  # merging: (B, N, 1) original patches per token, None before a merge
    # Grid restoration (families whose grid is needed again after a stage, e.g. PiT's pooling):
    positions: torch.Tensor | None = None  # eval: (B, n) grid position of each current patch token
    parked: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # eval: pruned (tokens, positions)
    #: eval: per parked entry, (index of its package among the stage's, the package as folded), or None
    parked_packages: list[tuple[int, torch.Tensor] | None] = field(default_factory=list)
    #: train: per package of the stage, the 0/1 mask (B, num_patches) of the tokens folded into it
    package_members: list[torch.Tensor] = field(default_factory=list)
    prefix_policy: torch.Tensor | None = None  # train: (B, num_prefix) keep mask of the prefix (carried packages)
    # Window pruning (Swin): the active location's token scores (B, H, W) and its selector
    score_map: tuple[torch.Tensor, object] | None = None
    #: keep ratios given at run time, (S,) — one graph for every density (export.RuntimeCounts);
    #: set around a forward by that wrapper, so reset() leaves it alone
    runtime_keep: torch.Tensor | None = None
    #: per-image counts (pruning.adaptive.AdaptiveCount), set by set_adaptive; reset() leaves it too
    adaptive: object | None = None
    runtime_adaptive: bool = False  # the count computed in the graph (an exported batch-1 adaptive model)
    adaptive_counts: list[torch.Tensor] = field(default_factory=list)  # eval, adaptive: (B,) kept per stage

    def reset(self) -> None:
        self.num_patches = None
        self.num_packages = 0
        self.patch_policy = None
        self.package_policy = []
        self.decisions = []
        self.kept_fraction = []
        self.expected_fraction = []
        self.targets = []
        self.keep_logp = []
        self.token_counts = []
        self.token_size = None
        self.positions = None
        self.parked = []
        self.parked_packages = []
        self.package_members = []
        self.prefix_policy = None
        self.score_map = None
        self.adaptive_counts = []

    @property
    def differentiable_fraction(self) -> list[torch.Tensor]:
        """Per-stage kept fraction that the ratio and latency losses act on.

        Sampled decisions: the straight-through kept fraction (it moves the count). Exact
        top-k: the selector's expected fraction (mean keep probability over the candidates) —
        the count is fixed by the plan, so these losses only keep the probabilities calibrated.
        """
        return self.expected_fraction if self.train_count == "exact" else self.kept_fraction

    @property
    def policy(self) -> torch.Tensor | None:
        """Train mode: keep mask over the whole sequence (prefix, patches, packages), or None."""
        if self.patch_policy is None:
            return None
        p = self.patch_policy
        prefix = self.prefix_policy if self.prefix_policy is not None else p.new_ones(p.shape[0], self.num_prefix)
        parts = [prefix, p, *self.package_policy]
        return torch.cat(parts, dim=1)

    def attn_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive attention bias (B, 1, 1, N); None when no key is masked or merged.

        ``log(policy)`` is the additive form of DynamicViT's masked softmax: keys with policy 0
        get no weight, and the straight-through gradient reaches the selector through the mask.
        ``log(size)`` is ToMe's proportional attention: a key merged from s patches weighs as
        much as its s originals would have together.
        """
        if self.token_size is not None:
            return torch.log(self.token_size.to(dtype))[:, None, None, :, 0]
        policy = self.policy
        if policy is None:
            return None
        return torch.log(policy.to(dtype) + _MASK_EPS)[:, None, None, :]
