"""The package token: pruned tokens folded into one token instead of being thrown away.

Its single definition, used in training and at inference alike: the mean of the tokens
pruned at this stage weighted by their keep probability (for EViT: their class-token
attention). Tokens that were nearly kept contribute most. In training the weights carry the
straight-through mask of newly pruned tokens; at inference the weights of kept tokens are
zero — the same formula on the same scores.
"""

from __future__ import annotations

import torch


def fold_package(tokens: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of ``tokens`` (B, n, C) under ``weights`` (B, n) -> ((B, 1, C), total (B, 1))."""
    total = weights.sum(dim=1, keepdim=True)
    package = (weights.unsqueeze(1) @ tokens) / total.clamp_min(1e-12).unsqueeze(-1)
    return package, total
