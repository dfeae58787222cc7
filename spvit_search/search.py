"""The Optuna study behind ``spvit-search optimize``: keep ratios under a latency budget.

Search space: one keep *factor* per stage on a grid (``step``), their running product being
the cumulative keep ratios (non-increasing by construction); optionally the selector
locations and the method (training-free methods only: learned selectors sit where they were
trained). Latency is a constraint, ``predicted − target`` set on the trial *before* anything
is evaluated, so an infeasible trial costs no accuracy evaluation (or, with a FLOPs budget, the
plan's FLOPs share minus the budget's: :class:`~spvit_search.flops.FlopsBudget`). The objective is accuracy
on calibration images (:class:`~spvit_search.evaluate.PlanEvaluator`); plans already scored
are reused (also across workers and machines: :mod:`~spvit_search.sharing`); a first subset of
the images reports an intermediate value and hopeless trials are pruned. Multi-objective mode maximises accuracy and
minimises predicted latency (Pareto front).

With per-image (adaptive) counts the budget is a *percentile* of the latency over the calibration
images: each image's latency is predicted from the counts it kept (``PlanLatency.predict_counts``),
so the constraint is known only once the plan has been scored, and it is set then.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import optuna

from .errors import SpvitError
from .evaluate import PlanEvaluator, plan_key
from .flops import FlopsBudget
from .plan import METHODS, PruningPlan
from .predictor import PlanLatency
from .pruning.layout import ModelLayout
from .sharing import claim


class SearchError(SpvitError):
    """A search that cannot run as asked (infeasible target, bad storage, …)."""


@dataclass(frozen=True)
class SearchSpace:
    location_sets: tuple[tuple[int, ...], ...]  # one entry: fixed locations
    methods: tuple[str, ...]
    min_factor: float = 0.3
    step: float = 0.05
    #: a training-free method that scores the plans of a learned one whose selectors are not
    #: trained yet (a plain checkpoint): it places the budget, the latency stays the method's
    proxy: str | None = None
    #: the model's token grids: keep factors multiply within a grid and start again at the next
    #: (None: one grid, as in a flat ViT)
    layout: ModelLayout | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.location_sets or not self.methods:
            raise SearchError("the search space needs at least one location set and one method")
        if self.proxy is not None and METHODS[self.proxy].learned_selector:
            raise SearchError(f"proxy {self.proxy!r} needs trained selectors itself; use a training-free method")
        learned = [m for m in self.methods if METHODS[m].learned_selector]
        if learned and self.proxy is None and (len(self.location_sets) > 1 or len(self.methods) > 1):
            raise SearchError(
                f"method(s) {learned} use trained selectors: search their keep ratios only, at the locations "
                "they were trained (one method, fixed locations)"
            )
        if not 0 < self.min_factor < 1 or not 0 < self.step < 1:
            raise SearchError(f"min keep factor {self.min_factor} and step {self.step} must be in (0, 1)")

    @property
    def first_block(self) -> int:
        """Earliest block a plan can change (EViT reads the attention of the block before)."""
        first = min(min(locs) for locs in self.location_sets)
        scorers = [self.proxy] if self.proxy else self.methods
        return first - 1 if any(not METHODS[m].learned_selector for m in scorers) else first

    def scored_plan(self, plan: PruningPlan) -> PruningPlan:
        """The plan whose calibration accuracy stands for ``plan``'s: itself, or its proxy's
        (with the method's package token where the proxy has one: EViT fuses or drops alike)."""
        if self.proxy is None or not plan.spec.learned_selector:
            return plan
        keeps_package = plan.package_token and METHODS[self.proxy].package_token_allowed
        return plan.replace(method=self.proxy, package_token=keeps_package)

    def factors(self) -> np.ndarray:
        n = round((1.0 - self.min_factor) / self.step)
        return np.round(1.0 - self.step * np.arange(n + 1), 6)

    def suggest(self, trial: optuna.Trial, model_name: str) -> PruningPlan:
        method = self.methods[0] if len(self.methods) == 1 else trial.suggest_categorical("method", list(self.methods))
        if len(self.location_sets) == 1:
            locations = self.location_sets[0]
        else:
            choice = trial.suggest_categorical("locations", [",".join(map(str, s)) for s in self.location_sets])
            locations = tuple(int(v) for v in choice.split(","))
        factors = [trial.suggest_float(f"r{s}", self.min_factor, 1.0, step=self.step) for s in range(len(locations))]
        return PruningPlan(locations=locations, keep=self.keep_of(locations, factors), method=method, model=model_name)

    def keep_of(self, locations: tuple[int, ...], factors: list[float]) -> tuple[float, ...]:
        """Cumulative keep ratios from per-stage factors (restarting at each new token grid)."""
        if self.layout is not None:
            return self.layout.cumulative_keep(locations, factors)
        keep, k = [], 1.0
        for f in factors:
            k *= f
            keep.append(round(k, 4))
        return tuple(keep)

    def fastest(self, latency: PlanLatency) -> tuple[float, PruningPlan]:
        """The lowest predicted latency in the space (every factor at its minimum)."""
        return self.cheapest(lambda plan: latency.predict(plan).total_ms)

    def cheapest(self, cost: Callable[[PruningPlan], float]) -> tuple[float, PruningPlan]:
        """The lowest ``cost`` (latency, a FLOPs share) in the space: every factor at its minimum."""
        best = None
        for locations in self.location_sets:
            keep = self.keep_of(locations, [self.min_factor] * len(locations))
            for method in self.methods:
                plan = PruningPlan(locations=locations, keep=keep, method=method)
                spent = cost(plan)
                if best is None or spent < best[0]:
                    best = (spent, plan)
        return best


def create_study(name: str, storage, multi_objective: bool, sampler: str = "tpe", seed: int | None = None):
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }
    if sampler not in samplers:
        raise SearchError(f"unknown sampler {sampler!r}; use one of {sorted(samplers)}")
    pruner = optuna.pruners.NopPruner() if multi_objective else optuna.pruners.MedianPruner(n_startup_trials=10)
    kwargs = {"directions": ["maximize", "minimize"]} if multi_objective else {"direction": "maximize"}
    try:
        return optuna.create_study(study_name=name, storage=storage, sampler=samplers[sampler](), pruner=pruner,
                                   load_if_exists=True, **kwargs)  # fmt: skip
    except ValueError as err:  # e.g. a study of this name with other directions
        raise SearchError(f"study {name!r}: {err}") from None


def make_objective(
    space: SearchSpace, latency: PlanLatency, evaluator: PlanEvaluator, target_ms: float | None, model_name: str,
    multi_objective: bool, flops: FlopsBudget | None = None, percentile: float | None = None,
) -> Callable[[optuna.Trial], float | Sequence[float]]:  # fmt: skip
    """The trial's objective. The budget is ``target_ms`` of predicted latency, or with ``flops`` a
    share of the unpruned model's FLOPs (the latency is still predicted and recorded), or with
    ``percentile`` (an evaluator with adaptive counts) ``target_ms`` at that percentile of the
    calibration images' predicted latencies: ``predicted_ms`` is then that percentile."""

    def objective(trial: optuna.Trial):
        trial.set_user_attr("pid", os.getpid())  # first: a dead worker's trial is told by its owner
        trial.set_user_attr("host", socket.gethostname())
        # the lead's drift factor (its device measurements); a worker on another machine has none
        latency.set_drift(trial.study.user_attrs.get("drift", latency.drift))
        # and the lead's budget: a --target-share is milliseconds of the lead's measured unpruned
        # model, which a worker's own table would put elsewhere (by the drift factor)
        target = None if target_ms is None else trial.study.user_attrs.get("target_ms", target_ms)
        plan = space.suggest(trial, model_name)
        predicted = latency.predict(plan).total_ms
        trial.set_user_attr("plan_key", plan_key(plan))
        trial.set_user_attr("keep", list(plan.keep))
        trial.set_user_attr("locations", list(plan.locations))
        trial.set_user_attr("method", plan.method)
        trial.set_user_attr("predicted_ms", predicted)
        over = None
        if flops is not None:
            share = flops.of(plan)
            trial.set_user_attr("flops_share", share)
            trial.set_constraint("flops_share", over := share - flops.share)
        elif target is not None and percentile is None:
            trial.set_constraint("latency_ms", over := predicted - target)
        if over is not None and over > 0:  # infeasible: no accuracy evaluation at all
            trial.set_user_attr("evaluated", False)
            return (0.0, predicted) if multi_objective else 0.0
        earlier = claim(trial, plan_key(plan))
        if earlier is not None:
            trial.set_user_attr("duplicate_of", earlier.number)
            accuracy = trial_accuracy(earlier)
        else:
            report = None if multi_objective else _pruning_report(trial)
            accuracy = evaluator.evaluate(space.scored_plan(plan), report)
        if percentile is not None and target is not None:
            counts = None if earlier is not None else evaluator.counts[plan_key(space.scored_plan(plan))]
            predicted = _percentile_ms(trial, earlier, latency, plan, counts, percentile)
            trial.set_constraint("latency_ms", over := predicted - target)
            if over > 0:  # scored, but over the budget at that percentile
                trial.set_user_attr("evaluated", False)
                return (0.0, predicted) if multi_objective else 0.0
        trial.set_user_attr("evaluated", True)
        trial.set_user_attr("accuracy", accuracy)
        if multi_objective:
            return accuracy, predicted
        # Among equally accurate plans, the one that uses more of the budget: a bonus far below
        # one image's worth of accuracy, so it only orders ties — and once accuracy saturates
        # it still gives TPE a direction (towards the target) instead of none.
        if flops is not None:
            return accuracy + TIE_BONUS * share / flops.share
        return accuracy + TIE_BONUS * predicted / target if target else accuracy

    return objective


def _percentile_ms(trial: optuna.Trial, earlier, latency: PlanLatency, plan: PruningPlan, counts: np.ndarray | None,
                   percentile: float) -> float:  # fmt: skip
    """The adaptive plan's predicted latency at ``percentile`` over the scored images (an earlier
    trial's, for a duplicate), recorded with the fixed-count prediction and the mean beside it."""
    if earlier is not None:
        attrs = earlier.user_attrs
        for name in ("fixed_ms", "predicted_mean_ms", "predicted_p50_ms", "mean_counts"):
            trial.set_user_attr(name, attrs[name])
        ms = attrs["predicted_ms"]
    else:
        per_image = latency.predict_counts(plan, counts)
        trial.set_user_attr("fixed_ms", trial.user_attrs["predicted_ms"])
        trial.set_user_attr("predicted_mean_ms", float(per_image.mean()))
        trial.set_user_attr("predicted_p50_ms", float(np.percentile(per_image, 50)))
        trial.set_user_attr("mean_counts", [round(float(c), 2) for c in counts.mean(axis=0)])
        ms = float(np.percentile(per_image, percentile))
    trial.set_user_attr("predicted_ms", ms)
    return ms


TIE_BONUS = 1e-3  # accuracy points, at the target; calibration sets are far smaller than 10⁵ images


def trial_accuracy(trial: optuna.trial.FrozenTrial) -> float:
    """Calibration accuracy (%) of an evaluated trial (its objective value may hold a tie-break)."""
    return trial.user_attrs.get("accuracy", trial.values[0])


def _pruning_report(trial: optuna.Trial) -> Callable[[float], bool]:
    def report(early_accuracy: float) -> bool:
        trial.report(early_accuracy, step=0)
        if trial.should_prune():
            raise optuna.TrialPruned(f"early accuracy {early_accuracy:.2f}% below the median of earlier trials")
        return False

    return report


def trial_plan(trial: optuna.trial.FrozenTrial, model_name: str) -> PruningPlan:
    a = trial.user_attrs
    return PruningPlan(locations=tuple(a["locations"]), keep=tuple(a["keep"]), method=a["method"], model=model_name)


def tie_band(best_accuracy: float, images: int | None) -> float:
    """Accuracy points within which a plan's calibration score cannot be told from the best's: one
    standard error of the best's binomial estimate, and at least one image."""
    if not images:
        return 0.0
    p = min(max(best_accuracy / 100, 0.0), 1.0)
    return 100 * max(math.sqrt(p * (1 - p) / images), 1 / images)


def rank_within_noise(items: list, accuracy: Callable, latency_ms: Callable, images: int | None) -> list:
    """Best accuracy first; but among the plans within :func:`tie_band` of the best, the slowest
    first. Their scores differ by less than the calibration set can tell, and a plan that uses
    more of the budget keeps more tokens. Seen on DeiT-T (32 images, 1 image = 3 points): the top
    score's plan measured at 0.85 of the target while tied plans sat at 0.98."""
    if not items:
        return []
    best = max(accuracy(i) for i in items)
    band = tie_band(best, images)
    tied = sorted((i for i in items if accuracy(i) >= best - band), key=lambda i: -latency_ms(i))
    rest = sorted((i for i in items if accuracy(i) < best - band), key=lambda i: (-accuracy(i), -latency_ms(i)))
    return tied + rest


def feasible_ranked(study: optuna.Study, target_ms: float | None, latency: PlanLatency, model_name: str,
                    flops: FlopsBudget | None = None, percentile: float | None = None):  # fmt: skip
    """Evaluated feasible trials ranked by :func:`rank_within_noise`, one per plan; predictions
    re-made with the table's current calibration and drift (they may have changed). Under a
    FLOPs budget, feasible by FLOPs, and ties ordered by FLOPs (the plan keeping more first). With
    adaptive counts (``percentile``), by the percentile each trial recorded (its images' counts
    are not kept in the study)."""
    seen, feasible = set(), []
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.user_attrs.get("evaluated")]  # fmt: skip
    for t in done:
        key = t.user_attrs["plan_key"]
        if key in seen:
            continue
        seen.add(key)
        plan = trial_plan(t, model_name)
        if flops is not None:
            if flops.of(plan) <= flops.share:
                feasible.append((t, plan, latency.predict(plan).total_ms))
            continue
        predicted = t.user_attrs["predicted_ms"] if percentile is not None else latency.predict(plan).total_ms
        if target_ms is None or predicted <= target_ms:
            feasible.append((t, plan, predicted))
    spent = (lambda r: flops.of(r[1])) if flops is not None else (lambda r: r[2])
    return rank_within_noise(feasible, lambda r: trial_accuracy(r[0]), spent, study.user_attrs.get("calib_images"))
