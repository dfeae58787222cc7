"""spvit-search: latency-aware soft token pruning for timm vision transformers.

import timm, spvit_search as sp
model = timm.create_model("deit_small_patch16_224")
sp.prune(model, sp.PruningPlan(locations=(3, 6, 9), keep=(0.7, 0.49, 0.343)))
model.eval()(images)                      # deterministic, batched, real speedup
sp.export_onnx(model, "m.onnx")           # static token counts from the plan
"""

from . import (
    _compat,  # noqa: F401  (must run before timm is imported)
    zoo,  # noqa: F401  (registers vit_demo_digits with timm)
)
from .errors import SpvitError
from .export import export_onnx, export_onnx_adaptive, export_onnx_switchable
from .flops import count_flops
from .plan import METHODS, PlanError, PruningPlan, kept_count
from .pruning import AdaptiveCount, UnsupportedModelError, prune, pruning_state, set_adaptive, set_keep, unprune
from .pruning.merge import tome_schedule

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "AdaptiveCount",
    "PlanError",
    "PruningPlan",
    "SpvitError",
    "UnsupportedModelError",
    "__version__",
    "count_flops",
    "export_onnx",
    "export_onnx_adaptive",
    "export_onnx_switchable",
    "kept_count",
    "prune",
    "pruning_state",
    "set_adaptive",
    "set_keep",
    "tome_schedule",
    "unprune",
]
