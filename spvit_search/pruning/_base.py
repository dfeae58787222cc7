"""What every model family provides, and the class swap that patches installed timm modules.

A family module (``vit.py``, …) knows one timm model family: whether a model belongs to it,
which plans fit it, how to patch it in place and how many tokens each block sees. Patching
swaps an instance's class for a dynamic subclass of *its own* installed class that adds the
pruning behaviour and then calls ``super()``: timm's forwards (LayerScale, qk-norm, fused
attention and whatever timm adds later) keep running unchanged, and the state-dict keys of
the original model stay valid.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import nn

from ..errors import SpvitError
from ..plan import PruningPlan

_SWAPPED: dict[tuple[type, type], type] = {}


class UnsupportedModelError(SpvitError, TypeError):
    """The model (or one of its parts) is outside what a pruning method supports."""


def swap_class(module: nn.Module, mixin: type) -> None:
    """Make ``module`` an instance of ``(mixin, type(module))``; a no-op if it already is."""
    cls = type(module)
    if isinstance(module, mixin):
        return
    key = (mixin, cls)
    if key not in _SWAPPED:
        _SWAPPED[key] = type(f"Pruned{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})
    module.__class__ = _SWAPPED[key]


def unswap_class(module: nn.Module, mixin: type) -> None:
    """Undo :func:`swap_class`."""
    if isinstance(module, mixin):
        module.__class__ = type(module).__bases__[1]


class ModelFamily(ABC):
    """One family of timm models that token pruning can be applied to."""

    name: str
    description: str

    @abstractmethod
    def supports(self, model: nn.Module) -> bool:
        """True if ``model`` belongs to this family."""

    @abstractmethod
    def depth(self, model: nn.Module) -> int:
        """Number of blocks a selector location can index."""

    @abstractmethod
    def check(self, model: nn.Module, plan: PruningPlan) -> None:
        """Raise ``PlanError``/``UnsupportedModelError`` if ``plan`` cannot be applied to ``model``."""

    @abstractmethod
    def patch(self, model: nn.Module, plan: PruningPlan) -> nn.Module:
        """Apply ``plan`` to ``model`` in place (re-applying over an earlier plan)."""

    @abstractmethod
    def unpatch(self, model: nn.Module) -> nn.Module:
        """Restore the dense model in place (selectors are removed)."""

    @abstractmethod
    def tokens_per_block(self, model: nn.Module, plan: PruningPlan) -> tuple[int, ...]:
        """Tokens entering each block at inference under ``plan``."""
