"""Token reduction on timm models: ``prune(model, plan)`` in place, one family per module."""

from __future__ import annotations

from torch import nn

from ..plan import PruningPlan
from ._base import ModelFamily, UnsupportedModelError
from .adaptive import AdaptiveCount
from .pit import PitFamily
from .state import PruneState
from .swin import SwinFamily
from .vit import VitFamily

FAMILIES: list[ModelFamily] = [VitFamily(), PitFamily(), SwinFamily()]


def family_for(model: nn.Module) -> ModelFamily:
    """The family that handles ``model``, or an error that lists the supported ones."""
    for family in FAMILIES:
        if family.supports(model):
            return family
    supported = "; ".join(f"{f.name}: {f.description}" for f in FAMILIES)
    raise UnsupportedModelError(f"{type(model).__name__} is not supported for token pruning. Supported: {supported}")


def prune(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Apply ``plan`` to ``model`` in place and return it.

    Re-pruning with the same method and locations keeps trained selectors and only changes
    the keep ratios (what the search does on a fine-tuned checkpoint); otherwise the old
    selectors are replaced. ``keep=1.0`` everywhere gives the dense model's outputs.
    """
    if not isinstance(plan, PruningPlan):
        raise TypeError(f"plan must be a PruningPlan, got {type(plan).__name__}")
    return family_for(model).patch(model, plan)


def set_keep(model: nn.Module, keep: tuple[float, ...] | list[float]) -> nn.Module:
    """Switch a pruned model to another operating point in place: the same selectors, other counts.

    No retraining and no new modules (a weight-shared checkpoint, ``finetune --densities``, was
    trained for several); ``keep`` of all 1.0 runs the dense path.
    """
    plan = getattr(getattr(model, "module", model), "spvit_plan", None)
    if plan is None:
        raise ValueError("model is not pruned: call spvit_search.prune(model, plan) first")
    return prune(getattr(model, "module", model), plan.replace(keep=tuple(float(k) for k in keep)))


def set_adaptive(model: nn.Module, adaptive: AdaptiveCount | None) -> nn.Module:
    """Per-image token counts at inference (``None``: the plan's fixed counts again); flat ViTs
    with learned selectors. See :mod:`spvit_search.pruning.adaptive`."""
    inner = getattr(model, "module", model)
    plan = getattr(inner, "spvit_plan", None)
    if plan is None:
        raise ValueError("model is not pruned: call spvit_search.prune(model, plan) first")
    # EViT's class attention would also need the padded slots masked out of its softmax: not yet
    if adaptive is not None and (family_for(inner).name != "vit" or not plan.spec.learned_selector):
        raise UnsupportedModelError(f"adaptive counts are for flat ViTs with learned selectors (spvit, hard), not "
                                    f"{family_for(inner).name} pruned by {plan.method}")  # fmt: skip
    pruning_state(inner).adaptive = adaptive
    return model


def unprune(model: nn.Module) -> nn.Module:
    """Remove selectors and restore the model's original classes, in place."""
    if getattr(model, "spvit_plan", None) is None:
        return model
    return family_for(model).unpatch(model)


def pruning_state(model: nn.Module) -> PruneState:
    """What the last forward of a pruned model recorded (decisions, kept fractions, token counts)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    state = getattr(model, "_spvit_state", None)
    if state is None:
        raise ValueError("model is not pruned: call spvit_search.prune(model, plan) first")
    return state


__all__ = [
    "FAMILIES", "AdaptiveCount", "PruneState", "UnsupportedModelError", "family_for", "prune", "pruning_state",
    "set_adaptive", "set_keep", "unprune",
]  # fmt: skip
