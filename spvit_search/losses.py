"""Losses of the soft-pruning fine-tune that read what a pruned model's forward recorded."""

from __future__ import annotations

import torch

from .pruning import PruneState


def ratio_loss(state: PruneState) -> torch.Tensor:
    """Mean squared gap between each stage's kept fraction and its target keep ratio.

    The kept fraction is the mean of the straight-through keep mask, so the gradient reaches
    the selector through the Gumbel-softmax probabilities. Zero when nothing was recorded
    (eval mode, training-free methods, or every keep ratio at 1.0).
    """
    if not state.kept_fraction:
        return torch.zeros(())
    losses = [((frac - target) ** 2).mean() for frac, target in zip(state.kept_fraction, state.targets, strict=True)]
    return torch.stack(losses).mean()
