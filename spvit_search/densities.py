"""Operating points of one weight-shared model: several keep vectors over one set of selectors.

Design (issue 13, after SaiT's dense/sparse training): one checkpoint, one set of selector
locations, and a list of *densities* — keep vectors over those locations. Each training step
runs the dense path (every stage keeping all tokens) and the sparse paths on the same batch,
the dense path distilled from the original teacher, each sparse path from the dense path of the
same step (its logits and its kept tokens: in-place distillation, as in slimmable networks and
SaiT), the dense path's loss plus the mean of the sparse paths' before one optimizer step.

The selectors are shared, not conditioned on the density: training keeps each plan's exact
top-k of the selector's scores, so a selector learns a *ranking*, and the top-k of one ranking
are nested — the tokens a sparse density keeps are a subset of what a denser one keeps. One
ranking then serves every count, and a density the model was not trained at (between two
trained ones) needs nothing new; conditioning would add inputs the exported graph has to carry
and would break that nesting. Switching is :func:`spvit_search.pruning.set_keep`.

The sparse paths' losses are averaged: the dense path weighs as much as all of them together,
which keeps the dense option where the teacher was (calibration split, seeds 0 / 1, no ratio
loss: dense option 87.80 / 87.20% with the sparse losses summed, 88.00 / 87.65% averaged, the
teacher 87.85%; the densities' mean 86.19 / 85.63 summed, 86.11 / 85.63 averaged). Shares in
proportion to the tokens each path removes (the sparsest 0.37, the densest 0.11) were tried once
for the sparsest density's lag (2026-12-01, code not kept), and did not help it (calibration
split, seeds 0 / 1: 83.95 / 83.45% against 83.90 / 84.15% with equal shares; a separate
fine-tune there: 84.75 / 84.90%). Distilling the sparse paths from the teacher instead of the
dense path (2026-12-02, code not kept) did not help either: sparsest 84.30 / 83.85%, the four
densities' mean 86.21 / 85.64% (86.11 / 85.63 from the dense path), dense option 88.05 / 87.75%.

Three more levers for the sparsest density's lag, tried 2026-12-02 on the calibration split
(seeds 0 / 1, the benchmark's 2 epochs on 3,000 images; code not kept), sparsest / dense option:

- every density each step, as above (lr 2e-4): 83.90 / 84.15%, dense 88.00 / 87.65%;
- a private LayerNorm affine per density (slimmable networks' switchable norms), seed 0: 83.80%,
  dense 87.70%: no gain;
- a higher learning rate, 4e-4: 85.05 / 83.50%, dense 87.70 / 87.70%. But a separate fine-tune
  gains as much from it: 85.70 / 84.95% against 84.75 / 84.90% at 2e-4 (85.75% at 8e-4, seed 0).
  The shared model's lag is the recipe's, not an under-tuned step size;
- the dense path and the sparsest only (``per_step`` 1), the others never trained: at 2e-4
  84.35 / 84.95%, dense 87.60 / 87.75%, and the untrained 0.7 density 86.45 / 86.10% (85.70%
  trained, seed 0), since the top-k of one ranking nest; at 4e-4 85.15 / 84.35%, dense 87.20 /
  88.05%. Against the separate fine-tunes at their better rate (85.33% mean) that is still 0.58
  below.

No ratio loss on the sparse paths: the exact top-k already fixes each path's count, and one
shared selector given four targets for its mean keep probability is pulled four ways, through
its input into the backbone too. Chosen on the calibration split (benchmarks/densities.py
setting, seeds 0 and 1, mean over the four densities and the dense option): 86.38 / 85.16% with
the ratio loss at its default weight 50, 86.51 / 85.94% without.
"""

from __future__ import annotations

import random

from .plan import PlanError, PruningPlan

Keep = tuple[float, ...]


def parse_densities(text: str, plan: PruningPlan) -> tuple[Keep, ...]:
    """``"0.7,0.49,0.343;0.5,0.25,0.125"`` → keep vectors over ``plan``'s locations, checked."""
    vectors = []
    for i, chunk in enumerate(c for c in text.replace(" ", "").split(";") if c):
        try:
            keep = tuple(float(x) for x in chunk.split(","))
        except ValueError:
            raise PlanError(f"density {i + 1} ({chunk!r}) is not a comma-separated list of numbers") from None
        vectors.append(keep)
    return check_densities(tuple(vectors), plan)


def check_densities(densities: tuple[Keep, ...], plan: PruningPlan) -> tuple[Keep, ...]:
    """Each density a valid keep vector of ``plan``'s layout; sorted densest first, duplicates dropped."""
    if not densities:
        raise PlanError("give at least one density (a keep vector over the plan's locations)")
    if not plan.spec.learned_selector:
        raise PlanError(f"weight-shared densities train learned selectors; {plan.method!r} has none (use spvit)")
    out = []
    for i, keep in enumerate(densities):
        if len(keep) != len(plan.locations):
            raise PlanError(f"density {i + 1} {list(keep)} has {len(keep)} keep ratios; the plan has "
                            f"{len(plan.locations)} locations {list(plan.locations)}")  # fmt: skip
        plan.replace(keep=tuple(keep))  # the plan's own checks (ratios in (0, 1])
        if all(k >= 1.0 for k in keep):
            raise PlanError(f"density {i + 1} keeps every token: the dense path is always trained, leave it out")
        out.append(tuple(float(k) for k in keep))
    return tuple(sorted(set(out), key=lambda k: (-sum(k), k)))


def step_paths(densities: tuple[Keep, ...], per_step: int, rng: random.Random) -> list[Keep | None]:
    """The paths one step trains: ``None`` (dense) first, then sparse densities.

    ``per_step`` 0 trains every density each step (each then gets the steps a separate fine-tune
    would); otherwise the sandwich rule of slimmable networks: the sparsest always, plus
    ``per_step - 1`` others drawn at random.
    """
    if per_step <= 0 or per_step >= len(densities):
        return [None, *densities]
    others = rng.sample(list(densities[:-1]), per_step - 1)
    return [None, *sorted(others, key=lambda k: -sum(k)), densities[-1]]
