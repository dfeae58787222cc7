"""FLOPs of a model as it really runs (pruned or not), with attention counted.

``torch.utils.flop_counter.FlopCounterMode`` counts matrix products but not the fused
``scaled_dot_product_attention`` kernel on CPU, which would hide exactly the N² term that
token pruning shrinks. Fused attention is switched off on the model's own attention modules
for the count, so q·kᵀ and attn·v are seen as the matmuls they are, then restored. The
pruned model is run in eval mode, so the count reflects the real token counts per block.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .models import input_shape


@dataclass(frozen=True)
class FlopCount:
    macs: int  # multiply-accumulates: the "FLOPs" of the DeiT/SPViT papers (DeiT-S: 4.6 G)

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def gflops(self) -> float:
        return 2 * self.macs / 1e9


@contextmanager
def _unfused_attention(model: nn.Module):
    changed = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for m in changed:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in changed:
            m.fused_attn = True


def count_flops(model: nn.Module, batch_size: int = 1) -> FlopCount:
    """Multiply-accumulates of one forward of ``model`` in eval mode, per batch of ``batch_size``."""
    was_training = model.training
    model.eval()
    ref = next(model.parameters())
    x = torch.zeros(batch_size, *input_shape(model), device=ref.device, dtype=ref.dtype)
    # Parameters frozen rather than ``no_grad``: the counter's module tracker hooks every tensor
    # argument that requires grad, and under ``no_grad`` a view of a parameter passed inside a
    # tuple (PiT's class tokens) requires grad with no grad function, which it refuses.
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        with _unfused_attention(model), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    return FlopCount(macs=counter.get_total_flops() // 2)


class FlopsBudget:
    """A search budget in FLOPs: a share of the unpruned model's MACs, which no device or day moves.

    Why: a paper's claim ("within 1 point at 30% fewer FLOPs") is stated in FLOPs, while a latency
    budget puts the plan where the day's table prices the parts: on a small PiT, a table that
    prices the multi-head selectors high sends the search to prune the first grid harshly. Each
    plan is counted as it runs (:func:`count_flops` of a pruned copy, selectors and package
    tokens included) on an untrained copy of the model (weights do not change a count); counts
    are cached per plan.
    """

    def __init__(self, model_name: str, share: float) -> None:
        from .models import build_model

        if not 0.0 < share < 1.0:
            raise ValueError(f"a FLOPs budget is a share of the unpruned model's, strictly between 0 and 1: {share:g}")
        self.share = share
        self._model = build_model(model_name).eval()
        self.dense_macs = count_flops(self._model).macs
        self._counted: dict[str, float] = {}

    def of(self, plan) -> float:
        """The plan's MACs as a share of the unpruned model's."""
        import copy

        from .evaluate import plan_key
        from .pruning import prune

        key = plan_key(plan)
        if key not in self._counted:
            self._counted[key] = count_flops(prune(copy.deepcopy(self._model), plan)).macs / self.dense_macs
        return self._counted[key]
