"""A model's token layout: which blocks share a token grid, and what each block sees under a plan.

Every step that counts tokens (``prune``'s bookkeeping, the latency predictor, the latency
loss, the search) reads one :class:`ModelLayout` that the model's family builds, so a
family's grid rules are written once. A *stage* is a run of blocks over one token grid: a
flat ViT has one; a pooling or hierarchical model has one per resolution, and pruning inside
a stage ends at the next downsampling layer, which sees the whole grid again.

Plan semantics (the same for every family): a keep ratio is the cumulative fraction of the
patch tokens of the grid its location's stage works on (``kept_count(keep, patches)``), and
must not rise within a stage. At a stage boundary the count starts again from the new grid;
package tokens of earlier stages ride along with the class tokens where the family says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..plan import PlanError, PruningPlan, default_locations


@dataclass(frozen=True)
class Stage:
    """Blocks ``start..stop-1`` working on ``patches`` units of ``unit`` tokens plus ``prefix`` class tokens.

    A unit is what a selector keeps or prunes: one patch token (ViT, PiT) or one window (Swin).
    """

    start: int
    stop: int
    patches: int
    prefix: int
    dim: int  # token width: selectors and blocks of this stage are measured at it
    heads: int
    unit: int = 1  # tokens per pruned unit: 1 (token pruning), a window's area (Swin's window pruning)

    @property
    def blocks(self) -> range:
        return range(self.start, self.stop)


@dataclass(frozen=True)
class ModelLayout:
    """Token grids and the signatures of the measured parts of one model.

    ``fixed`` are parts whose cost no plan changes (a pooling or patch-merging layer always
    sees the restored grid): (signature, tokens). ``head_tokens`` None: the head sees the
    tokens leaving the last block (average pooling); a number: a fixed count (a class-token
    head reading only the class tokens).
    """

    family: str
    stages: tuple[Stage, ...]
    stem: str
    stem_tokens: int
    blocks: tuple[str, ...]
    proportional_blocks: tuple[str, ...]
    head: str
    head_tokens: int | None
    fixed: tuple[tuple[str, int], ...] = ()
    carry_packages: bool = False  # package tokens enter the next stage with the class tokens
    package_tokens: bool = True  # False: the family appends none (Swin carries pruned windows instead)
    #: per block, the part measured when nothing is pruned there, at the stage's whole grid (a
    #: Swin block then runs timm's own forward, whose roll and partition cost differs from the
    #: pruned path's gathers); empty: ``blocks`` covers every count
    whole_blocks: tuple[str, ...] = ()
    selector_sees_grid: bool = False  # True: every selector scores the stage's whole grid (restored per block)
    stage_of_block: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        stage_of = [s for s, stage in enumerate(self.stages) for _ in stage.blocks]
        object.__setattr__(self, "stage_of_block", tuple(stage_of))
        if len(self.blocks) != len(stage_of):
            raise ValueError(f"{len(self.blocks)} block signatures for {len(stage_of)} blocks")
        if self.whole_blocks and len(self.whole_blocks) != len(stage_of):
            raise ValueError(f"{len(self.whole_blocks)} whole-block signatures for {len(stage_of)} blocks")

    def whole_tokens(self) -> np.ndarray:
        """(depth,) tokens entering each block when nothing before it in its stage prunes."""
        return np.array([self.stage_at(b).prefix + self.stage_at(b).patches * self.stage_at(b).unit
                         for b in range(self.depth)])  # fmt: skip

    @property
    def depth(self) -> int:
        return len(self.stage_of_block)

    def stage_at(self, block: int) -> Stage:
        return self.stages[self.stage_of_block[block]]

    def selector_stage(self, location: int) -> Stage:
        return self.stage_at(location)

    def check(self, plan: PruningPlan) -> None:
        """Refuse locations outside the model, and keep ratios that rise within a stage."""
        plan.check_depth(self.depth)
        for (a, ka), (b, kb) in zip(zip(plan.locations, plan.keep, strict=True),
                                    zip(plan.locations[1:], plan.keep[1:], strict=True), strict=False):  # fmt: skip
            if self.stage_of_block[a] == self.stage_of_block[b] and kb > ka:
                where = "" if len(self.stages) == 1 else f" within stage {self.stage_of_block[a]} (blocks "
                where += "" if len(self.stages) == 1 else f"{self.stage_at(a).start}..{self.stage_at(a).stop - 1})"
                raise PlanError(
                    f"keep ratios are cumulative fractions of the patch tokens and must not increase{where} "
                    f"(pruning is monotone), got {list(plan.keep)}"
                )

    def previous_keep(self, plan: PruningPlan) -> tuple[float, ...]:
        """For each location, the keep ratio the tokens entering it already have (1.0 at a stage's first)."""
        out, last_stage, last = [], None, 1.0
        for loc, keep in zip(plan.locations, plan.keep, strict=True):
            stage = self.stage_of_block[loc]
            out.append(last if stage == last_stage else 1.0)
            last_stage, last = stage, keep
        return tuple(out)

    def cumulative_keep(self, locations: Sequence[int], factors: Sequence[float]) -> tuple[float, ...]:
        """Keep ratios from per-location factors: products that start again at each new stage."""
        keep, k, last_stage = [], 1.0, None
        for loc, f in zip(locations, factors, strict=True):
            stage = self.stage_of_block[loc]
            k = (k if stage == last_stage else 1.0) * f
            keep.append(round(k, 4))
            last_stage = stage
        return tuple(keep)

    def tokens(self, keep: np.ndarray, locations: tuple[int, ...], package: bool
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """For P plans (rows of ``keep``): tokens entering each block (P, depth), which stages act
        (P, S) and the tokens entering each stage's selector (P, S).

        A stage acts when it keeps fewer patches than reach it; an acting stage with a package
        token adds one token. Pure numpy, so the search scores thousands of plans at once.
        """
        keep = np.atleast_2d(np.asarray(keep, dtype=float))
        plans = keep.shape[0]
        tokens = np.zeros((plans, self.depth), dtype=np.int64)
        active = np.zeros(keep.shape, dtype=bool)
        entering = np.zeros(keep.shape, dtype=np.int64)
        carried = np.zeros(plans, dtype=np.int64)
        for s_idx, stage in enumerate(self.stages):
            n_prev = np.full(plans, stage.patches, dtype=np.int64)
            packages = np.zeros(plans, dtype=np.int64)
            unit = stage.unit
            tokens[:, stage.start : stage.stop] = (stage.prefix + carried + n_prev * unit)[:, None]
            for s, loc in enumerate(locations):
                if self.stage_of_block[loc] != s_idx:
                    continue
                k = np.maximum(1, np.floor(keep[:, s] * stage.patches + 0.5).astype(np.int64))
                act = (keep[:, s] < 1.0) & (k < n_prev)
                whole = stage.prefix + carried + stage.patches * unit
                entering[:, s] = whole if self.selector_sees_grid else tokens[:, loc]
                n_prev = np.where(act, k, n_prev)
                packages = packages + (act & package & self.package_tokens)
                tokens[:, loc : stage.stop] = (stage.prefix + carried + n_prev * unit + packages)[:, None]
                active[:, s] = act
            if self.carry_packages:
                carried = carried + packages
        return tokens, active, entering

    def prunable(self, block: int) -> bool:
        """Whether a selector before ``block`` can act: its stage has more than one unit to choose from."""
        return self.stage_at(block).patches >= 2

    def can_place(self, block: int, method: str) -> bool:
        """Whether ``method``'s selector can sit before ``block``: the stage can prune, and EViT's
        previous block (whose class attention it reads) works on the same grid."""
        return self.prunable(block) and (method != "evit" or block > self.stage_at(block).start)

    def default_locations(self, stages: int, methods: Sequence[str] = ()) -> tuple[int, ...]:
        """Evenly spaced selector locations (``plan.default_locations``), moved onto blocks that can
        prune when some of those cannot (a Swin stage that is one window) or where one of
        ``methods`` cannot sit (EViT at a PiT grid's first block)."""

        def fits(block: int) -> bool:
            return self.prunable(block) and all(self.can_place(block, m) for m in methods)

        spaced = default_locations(self.depth, stages)
        if all(fits(b) for b in spaced):
            return spaced
        candidates = [b for b in range(1, self.depth) if fits(b)]
        if len(candidates) < stages:
            raise PlanError(f"cannot place {stages} selector stages: only blocks {candidates} can prune")
        return tuple(candidates[len(candidates) * (i + 1) // (stages + 1)] for i in range(stages))

    def plan_tokens(self, plan: PruningPlan) -> tuple[int, ...]:
        """Tokens entering each block at inference under ``plan``."""
        self.check(plan)
        tokens, _, _ = self.tokens(np.array([plan.keep]), plan.locations, plan.package_token)
        return tuple(int(n) for n in tokens[0])
