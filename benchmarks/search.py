"""Cost and quality of the keep-ratio search (`spvit-search optimize`'s study).

1. Demo model: 300 TPE trials (EViT on the dense checkpoint, calibration split, local table),
   wall time of the whole study (model, cached prefix, trials).
2. Quality on the demo model, same evaluator and target: the optimum of an exhaustive coarse
   grid (every feasible plan with keep factors in {1, .85, .7, .55, .4}) vs the best feasible
   accuracy found by TPE and by random sampling (fine grid, step 0.05) after 25/50/100 trials,
   over 3 seeds.
3. DeiT-T at 224 (random weights: agreement with its dense top-1 as the objective), 256
   calibration images (demo digits upscaled), the shipped local table: 300 TPE trials.

    python benchmarks/search.py [--dense runs/demo/dense/model.pt] [--json out.json] [--plot out.png]
    python benchmarks/search.py --replot out.json [--plot out.png]
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna

import spvit_search as sp
from spvit_search.devices import DeviceRegistry
from spvit_search.evaluate import PlanEvaluator
from spvit_search.models import build_model
from spvit_search.optimize import OptimizeSettings, calibration_tensors, run_study
from spvit_search.predictor import PlanLatency
from spvit_search.profile import profile_model
from spvit_search.search import SearchSpace, create_study, make_objective, trial_accuracy

DEMO = "vit_demo_digits"


def best_curve(study: optuna.Study, marks: list[int]) -> list[float]:
    best, curve = 0.0, []
    trials = sorted(study.trials, key=lambda t: t.number)
    for i, t in enumerate(trials, 1):
        if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("evaluated"):
            best = max(best, trial_accuracy(t))
        if i in marks:
            curve.append(best)
    return curve


def plot(out: dict, path: Path) -> None:
    """Best feasible accuracy vs trials for each sampler, against the grid optimum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for sampler, color in (("tpe", "C0"), ("random", "C1")):
        marks = sorted(int(m) for m in out[sampler]["best_after"])
        means = [np.mean(out[sampler]["best_after"][str(m)]) for m in marks]
        ax.plot(marks, means, "o-", color=color, label=f"{sampler} (mean of 3 seeds)")
    ax.axhline(out["grid"]["best_accuracy"], color="k", ls="--", lw=1,
               label=f"exhaustive coarse grid ({out['grid']['plans']} plans)")  # fmt: skip
    ax.set_xlabel("trials")
    ax.set_ylabel("best feasible calibration top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", type=Path, default=Path("runs/demo/dense/model.pt"))
    ap.add_argument("--target-ratio", type=float, default=0.7)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--replot", type=Path, default=None, help="only draw --plot from this earlier --json output")
    args = ap.parse_args(argv)
    if args.replot:
        out = json.loads(args.replot.read_text())
        plot(out, args.plot or args.replot.with_suffix(".png"))
        return out
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not args.dense.exists():
        print(f"training the demo model into {args.dense.parent} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "spvit_search.cli", "train", "--out", str(args.dense.parent)],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    device = DeviceRegistry.load().get("local")
    tables = Path(tempfile.mkdtemp(prefix="spvit-search-bench-"))
    profile_model(device, DEMO, root=tables, progress=False)
    model = build_model(DEMO, args.dense).eval()
    latency = PlanLatency.for_device(device, model, DEMO, root=tables)
    dense_ms = latency.predict(sp.PruningPlan(locations=(2,), keep=(1.0,))).total_ms
    target = dense_ms * args.target_ratio
    out: dict = {"demo_target_ms": round(target, 4), "demo_dense_predicted_ms": round(dense_ms, 4)}

    # 1. 300 trials on the demo model, the whole study timed
    settings = OptimizeSettings(target_ms=target, checkpoint=str(args.dense), trials=300, verify_top=0,
                                tables=str(tables), progress=False)  # fmt: skip
    start = time.perf_counter()
    run_study(DEMO, device, settings)
    out["demo_300_trials_s"] = round(time.perf_counter() - start, 1)
    print(f"demo model: 300 TPE trials in {out['demo_300_trials_s']} s", flush=True)

    # 2. TPE vs random vs an exhaustive coarse grid, same evaluator and target
    images, labels = calibration_tensors("demo", 256, model)
    fine = SearchSpace(((2, 3, 5),), ("evit",), min_factor=0.3, step=0.05)
    evaluator = PlanEvaluator(model, images, labels, fine.first_block)
    grid_best, grid_feasible = 0.0, 0
    for factors in itertools.product([1.0, 0.85, 0.7, 0.55, 0.4], repeat=3):
        keep = tuple(round(float(np.prod(factors[: i + 1])), 4) for i in range(3))
        plan = sp.PruningPlan(locations=(2, 3, 5), keep=keep, method="evit", model=DEMO)
        if latency.predict(plan).total_ms <= target:
            grid_feasible += 1
            grid_best = max(grid_best, evaluator.evaluate(plan))
    out["grid"] = {"plans": 125, "feasible": grid_feasible, "best_accuracy": grid_best}
    marks = [25, 50, 100]
    for sampler in ("tpe", "random"):
        curves = []
        for seed in range(3):
            st = create_study(f"{sampler}-{seed}", None, False, sampler, seed)
            st.optimize(make_objective(fine, latency, evaluator, target, DEMO, False), n_trials=max(marks))
            curves.append(best_curve(st, marks))
        out[sampler] = {"best_after": {str(m): [c[i] for c in curves] for i, m in enumerate(marks)}}
    print(f"coarse grid optimum {grid_best:.2f}% ({grid_feasible} of 125 plans feasible)")
    for sampler in ("tpe", "random"):
        row = "  ".join(f"{m}: {np.mean(v):.2f}% (min {min(v):.2f})" for m, v in out[sampler]["best_after"].items())
        print(f"{sampler:6} best feasible after {row}")

    # 3. DeiT-T at 224, 256 calibration images, 300 trials
    deit = "deit_tiny_patch16_224"
    deit_dense = build_model(deit)
    deit_latency = PlanLatency.for_device(device, deit_dense, deit)
    deit_target = deit_latency.predict(sp.PruningPlan(locations=(6,), keep=(1.0,))).total_ms * args.target_ratio
    deit_settings = OptimizeSettings(target_ms=deit_target, objective="agreement", trials=300, verify_top=0,
                                     calib_images=256, progress=False)  # fmt: skip
    start = time.perf_counter()
    deit_study, *_ = run_study(deit, device, deit_settings)
    out["deit_t_300_trials_s"] = round(time.perf_counter() - start, 1)
    states = [t.user_attrs.get("evaluated") for t in deit_study.trials]
    out["deit_t_trials"] = {
        "evaluated": sum(1 for s in states if s),
        "infeasible": sum(1 for s in states if s is False),
        "pruned": sum(1 for t in deit_study.trials if t.state == optuna.trial.TrialState.PRUNED),
    }
    print(f"DeiT-T @224, 256 images: 300 TPE trials in {out['deit_t_300_trials_s']} s ({out['deit_t_trials']})")

    if args.plot:
        plot(out, args.plot)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
