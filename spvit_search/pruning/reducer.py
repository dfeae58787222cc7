"""One pruning stage: score the patch tokens, keep the best, fold the rest into a package token.

Sequence layout throughout: ``[prefix tokens | patch tokens | package tokens]``. Prefix
tokens (class, distillation, registers) are never scored; package tokens of earlier stages
are never pruned again.

* Inference (and every mode of a training-free scorer): exactly ``kept_count(keep, N)``
  top-scored patches per image are gathered — deterministic, batched, static shapes, real
  compute reduction.
* Training with a learned selector (``train_count="exact"``, the default): the *same* exact
  top-k per image as inference, applied as attention masks so the whole batch keeps one
  length. The selector learns through a straight-through estimator: the mask's forward value
  is the 0/1 top-k membership, its gradient goes to the keep probability ``p`` of every token
  (``hard + (p − p.detach())``). Through timm's ``attn_mask`` (``log(mask + ε)``) that gradient
  is, for a kept token, how the loss changes with its attention weight and, for a pruned one,
  how it would change if the token were let back in — the first-order signal for reordering
  the ranking. The number of tokens kept never depends on the selector, so it cannot drift
  away from the plan (the fault of sampled decisions under a ratio loss).
* ``train_count="sampled"`` (SPViT/DynamicViT as published, kept for the ablation):
  Gumbel-softmax straight-through keep decisions; how many tokens survive is steered only by
  the ratio loss.

In both modes the decisions are multiplied into the previous stage's mask (monotone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..plan import kept_count
from .adaptive import gather_adaptive
from .package import fold_package, fold_ranked_tail
from .state import PruneState


def gather_tokens(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``tokens[b, idx[b]]`` for every image: rows of the flattened batch, one ``Gather`` in ONNX.

    (``torch.gather`` with the index expanded over channels exports as ``GatherElements`` on a
    B×k×C index tensor, several times slower on ORT's CPU provider.)
    """
    b, n, c = tokens.shape
    offsets = torch.arange(b, device=idx.device, dtype=idx.dtype).unsqueeze(1) * n
    return tokens.reshape(b * n, c)[(idx + offsets).reshape(-1)].reshape(b, -1, c)


class TokenReducer(nn.Module):
    def __init__(
        self, scorer: nn.Module, keep: float, package_token: bool, tau: float = 1.0, previous_keep: float = 1.0
    ) -> None:
        super().__init__()
        self.scorer = scorer
        self.keep = keep
        self.previous_keep = previous_keep  # a stage keeping as much as the one before does nothing
        self.package_token = package_token
        self.tau = tau
        self.stage_index = 0  # which entry of a run-time keep vector is this stage's (set when installed)

    def extra_repr(self) -> str:
        return f"keep={self.keep}, package_token={self.package_token}"

    def forward(self, x: torch.Tensor, state: PruneState) -> torch.Tensor:
        if state.num_patches is None:
            state.num_patches = x.shape[1] - state.num_prefix - state.num_packages
        if state.runtime_keep is not None or (state.runtime_adaptive and not self.training):
            return self._gather_runtime(x, state)
        if self.keep >= self.previous_keep:  # in training too: it removes no token at inference
            return x
        if hasattr(self.scorer, "num_prefix"):  # class attention is read past this stage's prefix
            self.scorer.num_prefix = state.num_prefix
        if self.training and self.scorer.learned:
            return self._mask(x, state)
        return self._gather(x, state)

    def _gather(self, x: torch.Tensor, state: PruneState) -> torch.Tensor:
        p, n_pkg = state.num_prefix, state.num_packages
        n = x.shape[1] - p - n_pkg
        k = kept_count(self.keep, state.num_patches)
        patches = x[:, p : p + n]
        if state.adaptive is not None and n > 1:  # per-image counts (bounded by the plan's, not by n)
            padded = state.patch_policy  # padded slots of a batch are left out of the selector's global mean
            keep_logp = self.scorer(patches, padded)[..., 1] if padded is not None else _keep_logp(self.scorer, patches)
            return gather_adaptive(x, keep_logp, self.keep, self.package_token, state)
        if k >= n:
            return x
        keep_logp = _keep_logp(self.scorer, patches)  # (B, n)
        # Kept tokens come in score order: blocks are permutation-equivariant after the position
        # embedding, and LiteRT has no kernel for sorting them back into image order.
        if state.positions is not None:
            return self._gather_and_park(x, keep_logp, k, state)
        if not self.package_token:
            kept = gather_tokens(patches, keep_logp.topk(k, dim=1, sorted=True).indices)
            return torch.cat([x[:, :p], kept, x[:, p + n :]], dim=1)
        # with a package: rank all n tokens once; the first k are kept, the tail is folded
        scores, order = keep_logp.topk(n, dim=1, sorted=True)
        ranked = gather_tokens(patches, order)
        package = fold_ranked_tail(ranked, scores, k)
        state.num_packages += 1
        return torch.cat([x[:, :p], ranked[:, :k], x[:, p + n :], package], dim=1)

    def _gather_runtime(self, x: torch.Tensor, state: PruneState) -> torch.Tensor:
        """``_gather`` with the count computed in the graph from ``state.runtime_keep``: one exported
        file serves every density (the token axis is dynamic after each stage). The count is
        ``kept_count``'s rounding, kept between 1 and n - 1: every stage prunes at least one token,
        so its package token always has members (the dense point is the plain export)."""
        p, n_pkg = state.num_prefix, state.num_packages
        n = x.shape[1] - p - n_pkg
        patches = x[:, p : p + n]
        keep_logp = _keep_logp(self.scorer, patches)
        if state.runtime_keep is not None:
            keep = state.runtime_keep[self.stage_index]
            k = torch.floor(keep * state.num_patches + 0.5).clamp(min=1, max=n - 1).to(torch.int64)
        else:  # the adaptive count of the one image of an exported graph (export_onnx_adaptive)
            k = state.adaptive.counts(keep_logp, torch.ones_like(keep_logp), self.keep, state.num_patches)[0]
        scores, order = keep_logp.topk(n, dim=1, sorted=True)
        ranked = gather_tokens(patches, order)
        if not self.package_token:
            return torch.cat([x[:, :p], ranked[:, :k], x[:, p + n :]], dim=1)
        package = fold_ranked_tail(ranked, scores, k)  # slicing at a tensor k stays dynamic in the graph
        state.num_packages += 1
        return torch.cat([x[:, :p], ranked[:, :k], x[:, p + n :], package], dim=1)

    def _gather_and_park(self, x: torch.Tensor, keep_logp: torch.Tensor, k: int, state: PruneState) -> torch.Tensor:
        """Like ``_gather``, but the pruned tokens are parked with their grid positions, unchanged,
        for the family to put back into the grid at the end of the stage."""
        p, n_pkg = state.num_prefix, state.num_packages
        n = x.shape[1] - p - n_pkg
        patches = x[:, p : p + n]
        scores, order = keep_logp.topk(n, dim=1, sorted=True)
        ranked = gather_tokens(patches, order)
        positions = gather_tokens(state.positions.unsqueeze(-1), order)[..., 0]
        state.parked.append((ranked[:, k:], positions[:, k:]))
        state.positions = positions[:, :k]
        tail = [fold_ranked_tail(ranked, scores, k)] if self.package_token else []
        state.parked_packages.append((state.num_packages, tail[0]) if tail and self.scorer.learned else None)
        state.num_packages += len(tail)
        return torch.cat([x[:, :p], ranked[:, :k], x[:, p + n :], *tail], dim=1)

    def _mask(self, x: torch.Tensor, state: PruneState) -> torch.Tensor:
        p, n = state.num_prefix, state.num_patches
        patches = x[:, p : p + n]
        prev = state.patch_policy
        if prev is None:
            prev = patches.new_ones(patches.shape[:2])
        logp = self.scorer(patches, prev)
        keep_prob = logp[..., 1].exp()
        if state.train_count == "exact":
            hard = exact_top_k(logp[..., 1], prev, kept_count(self.keep, state.num_patches))
            hard = hard + (keep_prob - keep_prob.detach())  # straight-through: exactly 0/1 forward, gradient to p
        else:
            hard = F.gumbel_softmax(logp, tau=self.tau, hard=True)[..., 1]
        policy = prev * hard
        if self.package_token:
            members = (prev * (1.0 - hard)).detach()
            package, any_member = fold_package(patches, logp[..., 1], members)
            x = torch.cat([x, package], dim=1)
            state.num_packages += 1
            state.package_policy.append(any_member)
            if state.positions is not None:  # a grid restored later (PiT): its members follow the package
                state.package_members.append(members)
        state.patch_policy = policy
        state.decisions.append(policy)
        state.kept_fraction.append(policy.mean(dim=1))
        state.expected_fraction.append((prev.detach() * keep_prob).sum(dim=1) / n)
        state.targets.append(self.keep)
        state.keep_logp.append(logp[..., 1])
        return x


def _keep_logp(scorer: nn.Module, patches: torch.Tensor) -> torch.Tensor:
    """The keep log-probabilities (B, n): a scorer's lean inference path where it has one."""
    lean = getattr(scorer, "keep_logp", None)
    return lean(patches) if lean is not None else scorer(patches)[..., 1]


def exact_top_k(keep_logp: torch.Tensor, previous: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask (B, n) of the ``k`` best-scored tokens among those still kept (``previous`` > 0).

    The same choice inference makes by gathering: ``k = kept_count(keep, N)`` per image.
    """
    scores = keep_logp.detach().masked_fill(previous.detach() <= 0, float("-inf"))
    idx = scores.topk(k, dim=1).indices
    return torch.zeros_like(keep_logp).scatter(1, idx, 1.0)
