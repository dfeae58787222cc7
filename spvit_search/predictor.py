"""Predicted latency of pruning plans on a device, from its latency table.

``latency(plan) = stem + downsampling + Σ blocks(tokens_i) + Σ active selectors(tokens in) + head``
with each part's fitted curve. Token counts follow the pruning mechanism exactly: a stage
keeping everything (keep 1.0, or no fewer tokens than it receives) does nothing and adds no
package token. Everything is numpy over a batch of plans, so the search can score thousands
of candidates per millisecond.

A sum of parts misses what only the whole model shows (fusion across blocks, cache state,
thread-pool hand-offs), so a per-model calibration ``measured ≈ scale · predicted + offset``
can be fitted from a few whole-model measurements (``spvit-search measure --calibrate``); it
is kept in the table's metadata and reported with every prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import nn

from .blocks import selector_signature
from .devices import DeviceConfig
from .latency import Fit, LatencyTable, LatencyTableError, now_iso, table_path
from .plan import METHODS, PruningPlan
from .pruning import family_for


@dataclass(frozen=True)
class Calibration:
    scale: float = 1.0
    offset_ms: float = 0.0
    points: int = 0

    def __call__(self, ms):
        return self.scale * np.asarray(ms) + self.offset_ms

    def describe(self) -> str:
        if not self.points:
            return "uncalibrated"
        return f"calibrated ×{self.scale:.3f} {self.offset_ms:+.2f} ms from {self.points} whole-model measurement(s)"


def fit_calibration(predicted: list[float], measured: list[float]) -> Calibration:
    """Scale and offset with 3+ points; a scale alone with 1–2 (an offset would fit noise).

    A line that does not rise (measured time falling as the model grows: seen when the points
    were measured while other work loaded the cores) or that predicts a negative time anywhere
    in the measured range says nothing about the device, so the scale alone is fitted instead.
    """
    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    if len(p) == 0:
        return Calibration()
    if len(p) >= 3 and np.ptp(p) >= 1e-9:
        scale, offset = np.polyfit(p, m, 1)
        if scale > 0 and scale * p.min() + offset > 0:
            return Calibration(scale=float(scale), offset_ms=float(offset), points=len(p))
    return Calibration(scale=float(np.median(m / p)), points=len(p))


@dataclass(frozen=True)
class Prediction:
    total_ms: float  # calibrated when a calibration exists
    parts_ms: float  # the plain sum of parts
    stem_ms: float
    blocks_ms: tuple[float, ...]
    selectors_ms: tuple[float, ...]  # per stage (0 where the stage does nothing)
    head_ms: float
    tokens_per_block: tuple[int, ...]
    calibration: Calibration = field(default_factory=Calibration)
    drift: float = 1.0  # this session's correction (see PlanLatency.correct_drift), already in total_ms
    downsample_ms: float = 0.0  # pooling / patch-merging layers (no plan changes them)

    def as_dict(self) -> dict:
        return {
            "predicted_ms": round(self.total_ms, 4),
            "sum_of_parts_ms": round(self.parts_ms, 4),
            "calibration": {
                "scale": self.calibration.scale,
                "offset_ms": self.calibration.offset_ms,
                "points": self.calibration.points,
            },
            "breakdown_ms": {
                "stem": round(self.stem_ms, 4),
                "downsample": round(self.downsample_ms, 4),
                "blocks": [round(b, 4) for b in self.blocks_ms],
                "selectors": [round(s, 4) for s in self.selectors_ms],
                "head": round(self.head_ms, 4),
            },
            "tokens_per_block": list(self.tokens_per_block),
        }


class PlanLatency:
    """Latency of plans for one model on one device, from a table that fits them.

    Stem, downsampling layers, head and blocks must be in the table; a method's own parts (its
    selector at each stage width, and for ``tome`` the blocks with proportional attention) are
    required for the ``methods`` named here, and otherwise looked up the first time a plan of
    that method is predicted. The model's family says which parts a model has and how many
    tokens each sees (:class:`~spvit_search.pruning.layout.ModelLayout`).
    """

    def __init__(self, table: LatencyTable, model: nn.Module, model_name: str, methods: tuple[str, ...] | None = None):
        self.layout = layout = family_for(model).layout(model)
        self.table, self.model_name = table, model_name
        self.depth = layout.depth
        self._hint = f"Measure them: spvit-search profile --model {model_name} (with the same device and threads)"
        head = "head" if layout.head_tokens is None else "fixed-count head"
        need = {layout.stem: "stem", layout.head: head, **{s: "blocks" for s in layout.blocks}}
        need.update({sig: "fixed-count downsampling layer" for sig, _ in layout.fixed})
        need.update({sig: "fixed-count whole-grid block" for sig in layout.whole_blocks})
        table.require(need, self._hint)
        self._block_coef = self._coefficients(list(layout.blocks))  # (depth, 3)
        whole = self._whole_tokens = layout.whole_tokens()
        self._whole_ms = (
            np.array([table.fit(s)(n) for s, n in zip(layout.whole_blocks, whole, strict=True)])
            if layout.whole_blocks else None
        )  # fmt: skip
        self._stem_ms = float(table.fit(layout.stem)(layout.stem_tokens))
        self._downsample_ms = float(sum(table.fit(sig)(n) for sig, n in layout.fixed))
        self._head_fit = table.fit(layout.head)
        self._selector_fits: dict[tuple[str, int], Fit] = {}
        self._proportional_coef: np.ndarray | None = None
        for method in methods or ():
            self.method_parts(method)
        cal = table.meta.get("calibration", {}).get(model_name)
        self.calibration = Calibration(cal["scale"], cal["offset_ms"], len(cal["points"])) if cal else Calibration()
        self.drift = 1.0

    def _coefficients(self, signatures: list[str]) -> np.ndarray:
        return np.array([[f.a, f.b, f.c] for f in (self.table.fit(s) for s in signatures)])

    def method_parts(self, method: str) -> tuple[list[Fit], np.ndarray]:
        """The fitted selector of ``method`` per stage and the block coefficients after its first stage."""
        stages = self.layout.stages
        if (method, 0) not in self._selector_fits:
            signatures = [selector_signature(method, st.dim, st.heads, st.prefix) for st in stages]
            # a selector that always scores its stage's whole grid (Swin) is measured at that one count
            what = f"fixed-count {method} selector" if self.layout.selector_sees_grid else f"{method} selector"
            need = {sig: what for sig in signatures}
            if method == "tome":
                need.update({s: "blocks with proportional attention" for s in self.layout.proportional_blocks})
            hint = self._hint.replace("--model", f"--methods {method} --model")
            self.table.require(need, hint)
            for i, sig in enumerate(signatures):
                self._selector_fits[(method, i)] = self.table.fit(sig)
            if method == "tome":
                self._proportional_coef = self._coefficients(list(self.layout.proportional_blocks))
        after = self._proportional_coef if method == "tome" else self._block_coef
        return [self._selector_fits[(method, i)] for i in range(len(stages))], after

    @classmethod
    def for_device(cls, device: DeviceConfig, model: nn.Module, model_name: str, root="latency_tables",
                   methods: tuple[str, ...] | None = None) -> PlanLatency:  # fmt: skip
        path = table_path(root, device.name, device.runtime, device.threads, device.batch)
        if not path.exists():
            raise LatencyTableError(
                f"no latency table {path} for device {device.name!r} ({device.runtime}, {device.threads} thread(s), "
                f"batch {device.batch}): spvit-search profile --device {device.name} --model {model_name}"
                + (f" --threads {device.threads}" if device.threads != 1 else "")
            )
        table = LatencyTable.open(path)
        table.check_setting(device.runtime, device.threads, device.batch)
        return cls(table, model, model_name, methods)

    # -- vectorised core ------------------------------------------------------------------------
    def tokens(self, keep: np.ndarray, locations: tuple[int, ...], package: bool) -> tuple[np.ndarray, np.ndarray]:
        """Tokens entering each block (P, depth) and which stages act (P, S), for P plans."""
        tokens, active, _ = self.layout.tokens(keep, locations, package)
        return tokens, active

    def _stage_ms(self, method: str, sel: Fit, prefix: int, entering: np.ndarray, leaving: np.ndarray) -> np.ndarray:
        """One active stage: a selector runs once; a merge runs one matching round per halving."""
        if method != "tome":
            return sel(entering)
        total, n = np.zeros(len(entering)), entering - prefix
        target = leaving - prefix
        while np.any(n > target):
            r = np.minimum(n - target, n // 2)
            total = total + np.where(r > 0, sel(prefix + n), 0.0)
            n = np.where(r > 0, n - r, target)
        return total

    def _blocks_ms(self, method: str, t: np.ndarray, active: np.ndarray, locations: tuple[int, ...],
                   after: np.ndarray) -> np.ndarray:  # fmt: skip
        """(P, depth) block latencies; blocks after a plan's first merge use the size-biased fit."""
        c = np.broadcast_to(self._block_coef, (len(t), *self._block_coef.shape))
        if method == "tome" and len(locations):
            first = np.full(len(t), self.depth)
            for s in reversed(range(len(locations))):
                first = np.where(active[:, s], locations[s], first)
            biased = np.arange(self.depth)[None, :] >= first[:, None]
            c = np.where(biased[..., None], after[None], c)
        ms = c[..., 0] + c[..., 1] * t + c[..., 2] * t * t
        if self._whole_ms is not None:  # a block nothing prunes runs its own (whole-grid) forward
            ms = np.where(t == self._whole_tokens[None, :], self._whole_ms[None, :], ms)
        return ms

    def _head_ms(self, t: np.ndarray) -> np.ndarray:
        n = self.layout.head_tokens
        return self._head_fit(t[:, -1] if n is None else np.full(len(t), float(n)))

    def _selectors_ms(self, method: str, sels: list[Fit], t: np.ndarray, active: np.ndarray,
                      entering: np.ndarray, locations: tuple[int, ...]) -> np.ndarray:  # fmt: skip
        """(P, S) cost of each stage's selector (0 where the stage does nothing)."""
        out = np.zeros(active.shape)
        for s, loc in enumerate(locations):
            stage = self.layout.stage_of_block[loc]
            prefix = self.layout.stages[stage].prefix
            ms = self._stage_ms(method, sels[stage], prefix, entering[:, s].astype(float), t[:, loc])
            out[:, s] = np.where(active[:, s], ms, 0.0)
        return out

    def predict_many(self, keep: np.ndarray, locations: tuple[int, ...], method: str = "spvit",
                     package: bool | None = None, calibrated: bool = True) -> np.ndarray:  # fmt: skip
        """Predicted ms for each row of ``keep`` (P, stages)."""
        package = METHODS[method].package_token_default if package is None else package
        sels, after = self.method_parts(method)
        tokens, active, entering = self.layout.tokens(keep, locations, package)
        t = tokens.astype(float)
        total = self._stem_ms + self._downsample_ms + self._head_ms(t)
        total = total + self._blocks_ms(method, t, active, locations, after).sum(axis=1)
        total = total + self._selectors_ms(method, sels, t, active, entering, locations).sum(axis=1)
        return self.drift * self.calibration(total) if calibrated else total

    def predict(self, plan: PruningPlan) -> Prediction:
        self.layout.check(plan)
        sels, after = self.method_parts(plan.method)
        tokens, active, entering = self.layout.tokens(np.array([plan.keep]), plan.locations, plan.package_token)
        t = tokens.astype(float)
        blocks = self._blocks_ms(plan.method, t, active, plan.locations, after)[0]
        selectors = self._selectors_ms(plan.method, sels, t, active, entering, plan.locations)[0]
        head = float(self._head_ms(t)[0])
        parts = self._stem_ms + self._downsample_ms + float(blocks.sum()) + float(selectors.sum()) + head
        return Prediction(
            total_ms=float(self.drift * self.calibration(parts)), parts_ms=parts, stem_ms=self._stem_ms,
            blocks_ms=tuple(float(b) for b in blocks), selectors_ms=tuple(float(x) for x in selectors), head_ms=head,
            tokens_per_block=tuple(int(n) for n in tokens[0]), calibration=self.calibration,
            downsample_ms=self._downsample_ms, drift=self.drift,
        )  # fmt: skip

    # -- calibration ----------------------------------------------------------------------------
    def add_calibration_points(self, measured: list[tuple[PruningPlan, float]], replace: bool = False,
                               refit: bool = True) -> Calibration:  # fmt: skip
        """Record whole-model measurements (plan, ms) and, with ``refit``, refit this model's calibration.

        ``optimize`` records its measurements without refitting, and corrects them with the session's
        drift factor (:meth:`correct_drift`) instead. A line fitted to points from two sessions, on
        a device whose speed changed between them, is tilted. Seen: one dense point at 0.8× among five
        points from a slower day lowered the line's dense end only, and after the drift correction
        the pruned plans were predicted 11% fast.
        """
        entry = self.table.meta.setdefault("calibration", {}).setdefault(self.model_name, {"points": []})
        if replace:
            entry["points"] = []
        stamp = now_iso()
        for plan, ms in measured:
            entry["points"].append({
                "method": plan.method, "locations": list(plan.locations), "keep": list(plan.keep),
                "predicted_ms": self.predict(plan).parts_ms, "measured_ms": ms, "measured_at": stamp,
            })  # fmt: skip
        if refit:
            cal = fit_calibration([p["predicted_ms"] for p in entry["points"]],
                                  [p["measured_ms"] for p in entry["points"]])  # fmt: skip
            entry.update(scale=cal.scale, offset_ms=cal.offset_ms)
            self.calibration = cal
        self.table.save_meta()
        return self.calibration

    def predict_counts(self, plan: PruningPlan, counts: np.ndarray) -> np.ndarray:
        """Predicted ms of each image (I,) from the patch tokens it kept at each stage (I, S), e.g.
        the per-image counts of adaptive inference (``PruneState.adaptive_counts``): the latency
        distribution of a plan over a set of images."""
        patches = self.layout.stages[0].patches
        keep = np.asarray(counts, float) / patches  # kept_count(k / N, N) == k
        return self.predict_many(keep, plan.locations, plan.method, plan.package_token)

    def correct_drift(self, measured: list[tuple[PruningPlan, float]]) -> float:
        """Scale every prediction by the median measured/predicted ratio of ``measured``: whole-model
        runs of this session, near the budget being searched. Returns the factor (1: none).

        Why: the calibration line is fitted to every point the table ever recorded, across methods
        and sessions. This host's speed drifts by up to 25% between sessions (and a phone's with its
        thermal state), and one line can sit 10-20% off for one method near one budget (seen: SPViT
        plans of the small demo model); old points then outvote the new, and a search verified on
        the device kept missing while each refit crept closer. The session's own measurements of the
        plans being ranked say how far off the table is here and now; the factor lives on this
        object only (the points themselves are recorded with their date by add_calibration_points).
        """
        self.drift = 1.0
        ratios = [ms / self.predict(plan).total_ms for plan, ms in measured]
        self.drift = float(np.median(ratios)) if ratios else 1.0
        return self.drift

    def set_drift(self, factor: float) -> None:
        """Impose a drift factor measured elsewhere (a shared study's lead, for its workers)."""
        self.drift = float(factor)


def calibration_plans(model: nn.Module, model_name: str, count: int = 5,
                      methods: tuple[str, ...] | None = None) -> list[PruningPlan]:  # fmt: skip
    """The dense model and plans spread evenly down to ~35% of its latency, methods alternating
    (by default every method of the model's family but ``tome``).

    Spread matters: scale and offset fitted to points that sit close together extrapolate badly
    (seen here: 3 clustered points gave 2.5% median error where 5 spread ones give < 1%).
    """
    family = family_for(model)
    methods = methods or tuple(m for m in family.methods if m != "tome")
    locations = family.default_locations(model, 3, methods)
    plans = [PruningPlan(locations=locations, keep=(1.0,) * 3, model=model_name)]
    methods = list(methods)
    for i in range(1, count):
        r = 1.0 - 0.6 * i / max(1, count - 1)  # per-stage ratio from ~0.85 down to 0.4
        keep = (round(r, 3), round(r**2, 3), round(r**3, 3))
        plans.append(PruningPlan(locations=locations, keep=keep, method=methods[i % len(methods)], model=model_name))
    return plans


@dataclass(frozen=True)
class CountsLatency:
    """The latency distribution of per-image (adaptive) counts on one device session.

    The table predicts each image's latency from its counts (:meth:`PlanLatency.predict_counts`),
    but the file that runs them computes the counts in its graph and runs dynamic shapes, and the
    device adds its own jitter: neither is in the table. Both are read off calibration images run
    through the same file in the same session: ``ratios`` holds each one's measured / predicted
    latency. The distribution over other images is then every image's prediction times every
    ratio (their product set), whose percentiles are the prediction.

    Why not a single factor: on the 0.9 ms Fashion-MNIST model the fixed-count file's p95 lies
    8-10% above its p50 with every image keeping the same counts, that is, jitter alone
    (benchmarks/adaptive.py). A single factor would predict the p50 and miss the p95 by about
    that much.
    """

    ratios: np.ndarray

    @classmethod
    def fit(cls, predicted_ms: np.ndarray, measured_ms: np.ndarray) -> CountsLatency:
        predicted_ms, measured_ms = np.asarray(predicted_ms, float), np.asarray(measured_ms, float)
        if predicted_ms.shape != measured_ms.shape or predicted_ms.size == 0:
            raise ValueError(f"need one measurement per prediction, got {measured_ms.shape} for {predicted_ms.shape}")
        return cls(measured_ms / predicted_ms)

    def samples(self, predicted_ms: np.ndarray) -> np.ndarray:
        return np.outer(np.asarray(predicted_ms, float), self.ratios).ravel()

    def percentiles(self, predicted_ms: np.ndarray, q: tuple[float, ...] = (50, 95)) -> dict[str, float]:
        """``{"mean": …, "p50": …, "p95": …}`` of the predicted distribution (ms)."""
        s = self.samples(predicted_ms)
        return {"mean": float(s.mean()), **{f"p{v:g}": float(np.percentile(s, v)) for v in q}}
