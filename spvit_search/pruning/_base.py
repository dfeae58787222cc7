"""What every model family provides, and the class swap that patches installed timm modules.

A family module (``vit.py``, ``pit.py``, …) is the one place that knows a timm model family's
structure: whether a model belongs to it, which plans fit it, how to patch it in place, its
token grids (:class:`ModelLayout`), the parts the latency table measures, what the search may
compute once before the first block a plan changes, and how to run the rest. Patching
swaps an instance's class for a dynamic subclass of *its own* installed class that adds the
pruning behaviour and then calls ``super()``: timm's forwards (LayerScale, qk-norm, fused
attention and whatever timm adds later) keep running unchanged, and the state-dict keys of
the original model stay valid.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import SpvitError
from ..plan import PruningPlan
from .layout import ModelLayout
from .merge import KeyReader, TokenMerger
from .reducer import TokenReducer
from .selector import ClsAttentionScorer, MultiHeadTokenSelector, PreviousQkv
from .state import PruneState

if TYPE_CHECKING:
    from ..blocks import Part

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
    methods: tuple[str, ...]  # the pruning methods this family supports
    training_free: str = "evit"  # the training-free method that places a learned one on a plain checkpoint

    def check_method(self, plan: PruningPlan) -> None:
        """Refuse a method this family does not support, naming the ones it does."""
        if plan.method not in self.methods:
            raise UnsupportedModelError(
                f"method {plan.method!r} is not supported on {self.name} models; supported: {', '.join(self.methods)}"
            )

    @abstractmethod
    def supports(self, model: nn.Module) -> bool:
        """True if ``model`` belongs to this family."""

    @abstractmethod
    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """Every block a selector location can index, in order (locations are indices here)."""

    @abstractmethod
    def layout(self, model: nn.Module) -> ModelLayout:
        """Token grids of ``model`` and the signatures of its measured parts."""

    @abstractmethod
    def check(self, model: nn.Module, plan: PruningPlan) -> None:
        """Raise ``PlanError``/``UnsupportedModelError`` if ``plan`` cannot be applied to ``model``."""

    @abstractmethod
    def mixins(self, model: nn.Module) -> list[tuple[nn.Module, type]]:
        """The modules whose class patching swaps (model, stages, blocks), each with its mixin."""

    @abstractmethod
    def parts(self, model: nn.Module, methods: tuple[str, ...]) -> list[Part]:
        """Distinct measurable parts of a dense ``model``, each with its signature and export wrapper."""

    @abstractmethod
    def embed(self, model: nn.Module, images: torch.Tensor, first_block: int) -> torch.Tensor:
        """What enters block ``first_block`` of the dense model (the search caches it)."""

    @abstractmethod
    def forward_from(self, model: nn.Module, x: torch.Tensor, first_block: int) -> torch.Tensor:
        """Logits of ``model`` (pruned or not, in eval mode) from ``embed``'s output onwards."""

    def default_locations(self, model: nn.Module, stages: int, methods: tuple[str, ...] = ()) -> tuple[int, ...]:
        """Evenly spaced selector locations among the blocks where this family (and ``methods``) can prune."""
        return self.layout(model).default_locations(stages, methods)

    def handed_grids(self, model: nn.Module) -> list[nn.Module]:
        """Modules whose output (or its first element) is a whole token grid handed to a layer the
        family restores it for, the same modules in the pruned and the dense model: where the final
        features hold no patch tokens (PiT's class tokens), fine-tuning distils these grids
        instead. None by default: a flat ViT's and a Swin's final features hold every token."""
        return []

    def depth(self, model: nn.Module) -> int:
        """Number of blocks a selector location can index."""
        return len(self.blocks(model))

    def tokens_per_block(self, model: nn.Module, plan: PruningPlan) -> tuple[int, ...]:
        """Tokens entering each block at inference under ``plan``."""
        return self.layout(model).plan_tokens(plan)

    # -- patching: the same for every family, given its mixins, blocks and layout ----------------
    def patch(self, model: nn.Module, plan: PruningPlan) -> nn.Module:
        """Apply ``plan`` to ``model`` in place (re-applying over an earlier plan)."""
        self.check(model, plan)
        current: PruningPlan | None = getattr(model, "spvit_plan", None)
        layout_of = (plan.method, plan.locations, plan.package_token)
        same_layout = current is not None and (current.method, current.locations, current.package_token) == layout_of
        if current is not None and not same_layout:
            self.unpatch(model)
        if same_layout:  # keep trained selectors, change only how many tokens they keep
            blocks = self.blocks(model)
            previous = self.layout(model).previous_keep(plan)
            for loc, keep, before in zip(plan.locations, plan.keep, previous, strict=True):
                reducer = blocks[loc].token_selector
                reducer.keep, reducer.previous_keep = keep, before
        else:
            self._install(model, plan)
        model.spvit_plan = plan
        return model

    def _swap_in(self, model: nn.Module, num_prefix: int) -> None:
        """One shared state for the model and its patched modules, and their classes swapped."""
        state = PruneState(num_prefix=num_prefix)
        for module, mixin in self.mixins(model):
            module._spvit_state = state
            swap_class(module, mixin)

    def _install(self, model: nn.Module, plan: PruningPlan) -> None:
        layout, blocks = self.layout(model), self.blocks(model)
        self._swap_in(model, layout.stages[0].prefix)
        ref = next(model.parameters())
        for index, (loc, keep, before) in enumerate(zip(plan.locations, plan.keep, layout.previous_keep(plan),
                                                        strict=True)):  # fmt: skip
            stage = layout.stage_at(loc)
            if plan.method == "tome":
                keys = KeyReader(blocks[loc - 1].attn) if loc > 0 else None
                reducer: nn.Module = TokenMerger(keep, keys, previous_keep=before)
            else:
                if plan.spec.learned_selector:
                    scorer: nn.Module = MultiHeadTokenSelector(stage.dim, stage.heads, prior_keep=keep / before)
                else:
                    scorer = ClsAttentionScorer(blocks[loc - 1].attn, stage.prefix)
                reducer = TokenReducer(scorer, keep, plan.package_token, previous_keep=before)
            reducer.stage_index = index
            reducer = reducer.to(device=ref.device, dtype=ref.dtype)
            reducer.train(model.training)
            blocks[loc].token_selector = reducer

    def unpatch(self, model: nn.Module) -> nn.Module:
        """Restore the dense model in place (selectors are removed)."""
        for blk in self.blocks(model):
            reducer = blk._modules.pop("token_selector", None)
            for hooked in reducer.modules() if reducer is not None else ():
                if isinstance(hooked, PreviousQkv):
                    hooked.remove()
        for module, mixin in self.mixins(model):
            unswap_class(module, mixin)
            module.__dict__.pop("_spvit_state", None)
        model.__dict__.pop("spvit_plan", None)
        return model
