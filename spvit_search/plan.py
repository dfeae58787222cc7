"""The pruning plan: where token selectors sit, how many patch tokens each stage keeps, and how.

A plan is the one object passed between the steps of the data flow: ``optimize`` writes it,
``prune``/``finetune``/``export``/``measure`` read it. Keep ratios are *cumulative* fractions
of the patch tokens of the grid a location works on (``keep=(0.7, 0.49, 0.343)`` on a ViT keeps
70%, then 49%, then 34.3% of the original patches), so a plan means the same thing whatever
came before each stage. On a model with several grids (PiT, Swin) the fraction is of the grid
of the location's stage and starts again at 1.0 after each downsampling layer; the model's
family checks that ratios do not rise within a grid (see ``pruning/layout.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import SpvitError

if TYPE_CHECKING:
    from torch import nn


class PlanError(SpvitError, ValueError):
    """A plan (or plan file) that cannot be used, with the reason."""


@dataclass(frozen=True)
class MethodSpec:
    """What a pruning method is made of: a learned selector or not, and its package token."""

    name: str
    learned_selector: bool
    package_token_default: bool
    package_token_allowed: bool
    summary: str


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec("spvit", True, True, True, "multi-head token selector + package token (SPViT)"),
        MethodSpec("hard", True, False, False, "multi-head token selector, pruned tokens dropped (DynamicViT-like)"),
        MethodSpec("evit", False, True, True, "training-free: class-token attention top-k + fused token (EViT)"),
        MethodSpec("tome", False, False, False, "training-free: token merging by bipartite matching (ToMe)"),
        MethodSpec("norm", False, False, False, "training-free: mean token L2 norm of each window (SparseViT; Swin)"),
    )
}


#: the methods ``profile`` measures unless told otherwise (``tome`` adds a second set of blocks)
PROFILED_BY_DEFAULT: tuple[str, ...] = ("spvit", "hard", "evit")


def kept_count(keep: float, num_patches: int) -> int:
    """Patch tokens kept at cumulative ratio ``keep``: round half up, at least one."""
    return max(1, math.floor(keep * num_patches + 0.5))


_PLAN_KEYS = (
    "model",
    "locations",
    "keep",
    "method",
    "package_token",
    "device",
    "target_ms",
    "predicted_ms",
    "measured_ms",
    "lut",
    "tokens_per_block",
)
_FIELD_OF_KEY = {"tokens_per_block": "block_tokens"}


@dataclass(frozen=True)
class PruningPlan:
    """Selector locations (block indices, the selector runs *before* the block) and keep ratios.

    ``package_token=None`` takes the method's default (on for ``spvit`` and ``evit``, off for
    ``hard``). The remaining fields are provenance written by ``optimize`` and ``measure``.
    """

    locations: tuple[int, ...] = (3, 6, 9)
    keep: tuple[float, ...] = (0.7, 0.49, 0.343)
    method: str = "spvit"
    package_token: bool | None = None
    model: str | None = None
    device: str | None = None
    target_ms: float | None = None
    predicted_ms: float | None = None
    measured_ms: float | None = None
    lut: dict[str, str] | None = None
    #: tokens per block as written to the plan file (key ``tokens_per_block``); provenance only
    block_tokens: tuple[int, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "locations", _as_ints(self.locations, "locations"))
        object.__setattr__(self, "keep", _as_floats(self.keep, "keep"))
        if self.block_tokens is not None:
            object.__setattr__(self, "block_tokens", _as_ints(self.block_tokens, "tokens_per_block"))
        if self.method not in METHODS:
            raise PlanError(f"unknown method {self.method!r}; supported: {', '.join(METHODS)}")
        spec = METHODS[self.method]
        if self.package_token is None:
            object.__setattr__(self, "package_token", spec.package_token_default)
        elif not isinstance(self.package_token, bool):
            raise PlanError(f"package_token must be true or false, got {self.package_token!r}")
        if self.package_token and not spec.package_token_allowed:
            raise PlanError(f"method {self.method!r} has no package token; use 'spvit' for pruning with one")
        if len(self.locations) != len(self.keep):
            raise PlanError(
                f"{len(self.locations)} locations {list(self.locations)} but {len(self.keep)} keep ratios "
                f"{list(self.keep)}: give one keep ratio per location"
            )
        if not self.locations:
            raise PlanError("a plan needs at least one selector location")
        if any(b <= a for a, b in zip(self.locations, self.locations[1:], strict=False)):
            raise PlanError(f"locations must be strictly increasing, got {list(self.locations)}")
        if self.locations[0] < 0:
            raise PlanError(f"locations are block indices >= 0, got {list(self.locations)}")
        for k in self.keep:
            if not (0.0 < k <= 1.0) or math.isnan(k):
                raise PlanError(f"keep ratios must be in (0, 1], got {list(self.keep)}")

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    @property
    def is_dense(self) -> bool:
        """True when no stage removes a token (every keep ratio is 1.0)."""
        return all(k >= 1.0 for k in self.keep)

    def check_depth(self, depth: int) -> None:
        """Refuse locations outside a model of ``depth`` blocks."""
        if self.locations[-1] >= depth:
            raise PlanError(
                f"location {self.locations[-1]} is outside the model: it has {depth} blocks (0..{depth - 1})"
            )

    def without_idle_stages(self, model: nn.Module | None = None) -> PruningPlan:
        """The same pruning without stages that keep as much as reaches them (they do nothing).

        Fine-tuning drops them so that no selector is saved that was never trained. A plan
        that prunes nothing is returned unchanged. Give ``model`` for a model of several token
        grids (its stages start again from the full grid); without it the plan is read as one
        grid's.
        """
        previous = self.previous_keep(model)
        active = [s for s in range(len(self.keep)) if self.keep[s] < previous[s]]
        if not active or len(active) == len(self.keep):
            return self
        return self.replace(
            locations=tuple(self.locations[s] for s in active), keep=tuple(self.keep[s] for s in active),
            block_tokens=None,
        )  # fmt: skip

    def previous_keep(self, model: nn.Module | None = None) -> tuple[float, ...]:
        """For each location, the keep ratio of the tokens reaching it (1.0 where its grid starts)."""
        if model is None:
            return (1.0, *self.keep[:-1])
        from .pruning import family_for

        return family_for(model).layout(model).previous_keep(self)

    def replace(self, **changes: Any) -> PruningPlan:
        return dataclasses.replace(self, **changes)

    def tokens_per_block(self, model: nn.Module) -> tuple[int, ...]:
        """Tokens each block of ``model`` processes at inference under this plan."""
        from .pruning import family_for

        return family_for(model).tokens_per_block(model, self)

    # -- YAML ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in _PLAN_KEYS:
            value = getattr(self, _FIELD_OF_KEY.get(key, key))
            if isinstance(value, tuple):
                value = list(value)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> PruningPlan:
        if not isinstance(data, dict):
            raise PlanError(f"{source}: a plan is a mapping of keys to values, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_PLAN_KEYS))
        if unknown:
            raise PlanError(f"{source}: unknown keys {unknown}; a plan has {list(_PLAN_KEYS)}")
        try:
            return cls(**{_FIELD_OF_KEY.get(k, k): v for k, v in data.items()})
        except PlanError as err:
            raise PlanError(f"{source}: {err}") from None
        except TypeError as err:
            raise PlanError(f"{source}: {err}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise PlanError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
        return cls.from_dict(data, source=str(path))


def _as_ints(values: Any, name: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise PlanError(f"{name} must be a list of integers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise PlanError(f"{name} must be a list of integers, got {list(values)!r}")
        out.append(int(v))
    return tuple(out)


def _as_floats(values: Any, name: str) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise PlanError(f"{name} must be a list of numbers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise PlanError(f"{name} must be a list of numbers, got {list(values)!r}")
        out.append(float(v))
    return tuple(out)


def default_locations(depth: int, stages: int) -> tuple[int, ...]:
    """Evenly spaced selector locations: DeiT's (3, 6, 9) for 12 blocks and 3 stages."""
    if stages < 1 or stages >= depth:
        raise PlanError(f"cannot place {stages} selector stages in a model of {depth} blocks")
    return tuple(max(1, math.floor(depth * (i + 1) / (stages + 1) + 0.5)) for i in range(stages))
