"""Token merging (ToMe, Bolya et al., ICLR 2023): bipartite soft matching down to a token count.

Instead of scoring and dropping tokens, a merging stage pairs similar tokens and averages them,
so nothing is discarded. One round: the patch tokens are split alternately into sets A and B,
each A token finds its most similar B token (cosine similarity of the attention keys), and the
``r`` A tokens with the most similar partners are averaged into them, weighted by how many
original patches each token already stands for (its *size*). A stage that must remove more
than half of its tokens runs several rounds. Prefix tokens (class, distillation, registers)
are never merged.

Why it is written this way rather than as in the reference code:

* The merge is a matrix product with a 0/1 assignment built by comparing indices
  (``dst == arange``), not ``scatter_reduce(mean)``: it exports to ONNX opset 17 and to TFLite,
  and is deterministic on every backend. With the similarities (``|A|·|B|·d``) it costs a
  fraction of a percent of a block's multiply-adds.
* The keys are those the previous block's attention already computed (a forward hook on its
  ``qkv`` projection, as the EViT scorer reads them), so matching costs no extra projection.
  ToMe merges inside a block, between attention and MLP; here the merge runs *before* a block
  like every other stage of this project (one part to profile, one place in the plan), on the
  same keys one MLP later. A stage before block 0 has no previous attention and matches on
  the tokens themselves.
* Proportional attention (``softmax(qkᵀ/√d + log s)``) goes through timm's own ``attn_mask``
  argument, so fused attention, qk-norm and LayerScale keep running in the installed blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..plan import PlanError, PruningPlan, kept_count
from .reducer import gather_tokens
from .selector import PreviousQkv
from .state import PruneState


def tome_schedule(depth: int, num_patches: int, r: int) -> PruningPlan:
    """ToMe's canonical schedule as a plan: ``r`` fewer tokens before every block from block 1 on.

    Locations 1…depth−1 (block 0 has no previous attention to match on), cumulative keep
    ``(N − (i+1)·r) / N``, so the stage before block ``i+1`` leaves exactly ``N − (i+1)·r``
    patch tokens. One matching round removes at most half of the tokens, hence ``r ≤ N/2``.
    """
    left = num_patches - (depth - 1) * r
    if r < 1 or 2 * r > num_patches or left < 1:
        raise PlanError(f"r={r} does not fit {depth} blocks of {num_patches} patches: need 1 <= r <= "
                        f"{num_patches // 2} and at least one patch left ({left})")  # fmt: skip
    keep = tuple((num_patches - (i + 1) * r) / num_patches for i in range(depth - 1))
    return PruningPlan(locations=tuple(range(1, depth)), keep=keep, method="tome")


def merge_rounds(n: int, k: int) -> list[int]:
    """Tokens removed by each bipartite round to go from ``n`` to ``k`` patch tokens (≤ n//2 each)."""
    rounds = []
    while n > k >= 1:  # n ≥ 2 here, so every round removes at least one token
        r = min(n - k, n // 2)
        rounds.append(r)
        n -= r
    return rounds


def bipartite_merge(
    x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of bipartite soft matching over the token axis.

    ``x`` (B, n, C) tokens, ``size`` (B, n, 1) patches each token stands for, ``metric``
    (B, n, D) what similarity is measured on. Returns the merged tokens, sizes and metric,
    each with ``n − r`` tokens: the unmerged A tokens (most similar partner first… last) then
    the B tokens. Deterministic and per image (a batch gives each image's own result).
    """
    metric = F.normalize(metric, dim=-1)
    a_metric, b_metric = metric[:, ::2], metric[:, 1::2]
    n_a, n_b = a_metric.shape[1], b_metric.shape[1]
    scores = a_metric @ b_metric.transpose(1, 2)  # (B, nA, nB)
    best, partner = scores.max(dim=-1)  # each A token's most similar B token
    order = best.topk(n_a, dim=-1, sorted=True).indices  # most similar first
    src, unmerged = order[:, :r], order[:, r:]
    dst = partner.gather(1, src)  # (B, r)
    assign = (dst.unsqueeze(-1) == torch.arange(n_b, device=x.device)).to(x.dtype)  # (B, r, nB)

    def merge(values: torch.Tensor, weighted: bool) -> tuple[torch.Tensor, torch.Tensor]:
        a_vals, b_vals = values[:, ::2], values[:, 1::2]
        if weighted:
            a_vals, b_vals = a_vals * size[:, ::2], b_vals * size[:, 1::2]
        return gather_tokens(a_vals, unmerged), b_vals + assign.transpose(1, 2) @ gather_tokens(a_vals, src)

    keep_size, b_size = merge(size, weighted=False)
    keep_x, b_x = merge(x, weighted=True)
    keep_m, b_m = merge(metric, weighted=True)
    new_x = torch.cat([keep_x / keep_size, b_x / b_size], dim=1)
    new_metric = torch.cat([keep_m / keep_size, b_m / b_size], dim=1)
    return new_x, torch.cat([keep_size, b_size], dim=1), new_metric


class KeyReader(PreviousQkv):
    """The keys the previous block's attention computed, averaged over heads (ToMe's metric)."""

    def forward(self) -> torch.Tensor:
        qkv, attn = self.take_qkv("the merge stage"), self._attn
        b, n, _ = qkv.shape
        h, d = attn.num_heads, attn.head_dim
        k = qkv[:, :, h * d : 2 * h * d].reshape(b, n, h, d)
        return attn.k_norm(k.transpose(1, 2)).mean(dim=1)  # (B, n, d)


class TokenMerger(nn.Module):
    """A ToMe stage: merge the patch tokens down to ``kept_count(keep, N)`` before its block.

    The same computation in training and at inference (merging is differentiable in the
    token values; which tokens merge is not), so a fine-tune trains exactly what is exported.
    """

    def __init__(self, keep: float, keys: KeyReader | None, previous_keep: float = 1.0) -> None:
        super().__init__()
        self.keep = keep
        self.previous_keep = previous_keep
        self.keys = keys

    def extra_repr(self) -> str:
        return f"keep={self.keep}"

    def forward(self, x: torch.Tensor, state: PruneState) -> torch.Tensor:
        metric = self.keys() if self.keys is not None else x  # read (and release) the hook every forward
        p = state.num_prefix
        if state.num_patches is None:
            state.num_patches = x.shape[1] - p
        n = x.shape[1] - p
        rounds = merge_rounds(n, kept_count(self.keep, state.num_patches))
        if not rounds:
            return x
        size = state.token_size
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)
        patches, patch_size, patch_metric = x[:, p:], size[:, p:], metric[:, p:]
        for r in rounds:
            patches, patch_size, patch_metric = bipartite_merge(patches, patch_size, patch_metric, r)
        state.token_size = torch.cat([size[:, :p], patch_size], dim=1)
        return torch.cat([x[:, :p], patches], dim=1)
