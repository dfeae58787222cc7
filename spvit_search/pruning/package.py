"""The package token: pruned tokens folded into one token instead of being thrown away.

Its single definition, used in training and at inference alike: the mean of the tokens pruned
at this stage, weighted by their keep probabilities — tokens that were nearly kept contribute
most. ``fold_package`` computes it over a 0/1 membership mask (training, where the batch keeps
one length); ``fold_ranked_tail`` computes the same from tokens already sorted by score
(inference, where the stage has ranked them anyway). Membership (which tokens were pruned) is
the discrete decision; the weights are a softmax of the members' keep log-probabilities, which
is the same normalised weighting computed stably.

Why membership carries no straight-through gradient: dividing by the sum of the pruned
tokens' keep probabilities sends gradients of size p_kept / Σ p_pruned to every kept token,
which explodes once the selector is confident (seen in training: loss spikes, then the first
selector saturated at 77% kept and accuracy fell from 97% to 82%). The selector learns its
decisions through the attention masks and the ratio loss; the package learns its weights.
"""

from __future__ import annotations

import torch


def fold_package(
    tokens: torch.Tensor, keep_logp: torch.Tensor, members: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Package token of ``tokens`` (B, n, C): weights softmax(keep_logp) over ``members`` (B, n) in {0, 1}.

    Returns the package (B, 1, C) and whether each image has any member (B, 1) as 0/1.
    """
    members = members.detach().to(keep_logp.dtype)
    any_member = (members.sum(dim=1, keepdim=True) > 0).to(keep_logp.dtype)
    logits = keep_logp.masked_fill(members <= 0, float("-inf"))
    logits = torch.where(any_member > 0, logits, torch.zeros_like(logits))  # no member: avoid an all -inf softmax
    weights = torch.softmax(logits, dim=1) * members * any_member
    return weights.unsqueeze(1) @ tokens, any_member


def fold_ranked_tail(ranked: torch.Tensor, ranked_logp: torch.Tensor, k: int) -> torch.Tensor:
    """The same package at inference, from tokens already sorted by keep score (B, n, C).

    The first ``k`` are kept, so the members are exactly the tail (never empty: a stage only
    acts when it prunes); their softmax weights need no mask. A handful of graph nodes instead
    of a scatter and masks: on small models a stage's cost is mostly per-node overhead.
    """
    return torch.softmax(ranked_logp[:, k:], dim=1).unsqueeze(1) @ ranked[:, k:]
