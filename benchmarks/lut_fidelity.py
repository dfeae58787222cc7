"""Can the latency table be trusted? Predicted vs measured whole-model latency of random plans.

For each model and thread count on the local device:

1. ``spvit-search profile`` into a fresh table (or ``--tables DIR`` to use existing ones);
2. seeded random plans (method, 3 selector locations, keep ratios not rising within a token
   grid), plus the
   calibration plans of `spvit-search calibrate` (dense + 4 plans spread down to ~35% of its
   latency) — calibration never sees the plans it is judged on;
3. every plan exported to ONNX and measured end to end, all interleaved in one session;
4. predicted/measured - 1 per plan: median and p95 of |error|, without and with calibration;
   the cost of one ``PlanLatency.predict`` call; a predicted-vs-measured plot.

    python benchmarks/lut_fidelity.py [--plans 24] [--models deit_small_patch16_224,deit_tiny_patch16_224]
                                      [--threads 1,2] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import spvit_search as sp
from profilers import MeasureSettings
from spvit_search.devices import DeviceRegistry
from spvit_search.measure import measure_models
from spvit_search.models import create_model
from spvit_search.plan import PROFILED_BY_DEFAULT
from spvit_search.predictor import PlanLatency, calibration_plans, fit_calibration
from spvit_search.profile import profile_model
from spvit_search.pruning import family_for


def random_plan(rng: random.Random, layout, model_name: str) -> sp.PruningPlan:
    """3 locations, a keep factor in [0.45, 1] each, multiplied within each token grid (on Swin:
    among the blocks that can prune, methods spvit and norm)."""
    if layout.family == "swin":
        locations = tuple(sorted(rng.sample([b for b in range(layout.depth) if layout.prunable(b)], 3)))
        keep = layout.cumulative_keep(locations, [rng.uniform(0.45, 1.0) for _ in locations])
        return sp.PruningPlan(locations=locations, keep=tuple(round(k, 3) for k in keep),
                              method=rng.choice(("spvit", "norm")), model=model_name)  # fmt: skip
    locations = tuple(sorted(rng.sample(range(1, layout.depth), 3)))
    keep = layout.cumulative_keep(locations, [rng.uniform(0.45, 1.0) for _ in locations])
    method = rng.choice(PROFILED_BY_DEFAULT)
    if method == "evit" and any(loc == layout.stage_at(loc).start for loc in locations):
        method = rng.choice(("spvit", "hard"))  # EViT reads the block before, which must share the grid
    return sp.PruningPlan(locations=locations, keep=tuple(round(k, 3) for k in keep), method=method,
                          model=model_name)  # fmt: skip


def run_case(model_name: str, threads: int, n_plans: int, tables: Path, seed: int, rounds: int) -> dict:
    device = DeviceRegistry.load().get("local").model_copy(update={"threads": threads})
    profile_model(device, model_name, root=tables, progress=False)
    base = create_model(model_name).eval()
    layout = family_for(base).layout(base)
    rng = random.Random(seed)
    calibration = calibration_plans(base, model_name, 5)
    plans = [random_plan(rng, layout, model_name) for _ in range(n_plans)]
    models = {}
    for i, plan in enumerate(calibration + plans):
        m = create_model(model_name).eval()
        torch_seed = 1000 + i
        import torch

        torch.manual_seed(torch_seed)
        models[f"plan{i}"] = sp.prune(m, plan)  # keep 1 too: Swin's dense runs with exact-zero masks
    print(f"  {model_name} @{threads} thread(s): measuring {len(models)} models ...", file=sys.stderr)
    timings, version = measure_models(device, models, MeasureSettings(rounds=rounds, runs=5))
    measured = [timings[f"plan{i}"].median_ms for i in range(len(models))]
    latency = PlanLatency.for_device(device, base, model_name, root=tables)
    raw = [latency.predict(p).parts_ms for p in calibration + plans]
    k = len(calibration)
    cal = fit_calibration(raw[:k], measured[:k])
    eval_raw, eval_meas = np.array(raw[k:]), np.array(measured[k:])
    err_raw = eval_raw / eval_meas - 1
    err_cal = cal(eval_raw) / eval_meas - 1

    rng_cost = random.Random(1)
    probe = [random_plan(rng_cost, layout, model_name) for _ in range(500)]
    start = time.perf_counter()
    for p in probe:
        latency.predict(p)
    per_plan_ms = (time.perf_counter() - start) / len(probe) * 1e3
    keep = np.array([p.keep for p in probe])
    start = time.perf_counter()
    latency.predict_many(keep, (3, 6, 9), "spvit")
    batch_us = (time.perf_counter() - start) / len(probe) * 1e6

    def stats(err: np.ndarray) -> dict:
        a = np.abs(err) * 100
        return {
            "median_abs_pct": round(float(np.median(a)), 2),
            "p95_abs_pct": round(float(np.percentile(a, 95)), 2),
            "max_abs_pct": round(float(a.max()), 2),
            "mean_signed_pct": round(float(err.mean() * 100), 2),
        }

    return {
        "model": model_name, "threads": threads, "runtime": version, "plans": n_plans,
        "uncalibrated": stats(err_raw), "calibrated": stats(err_cal),
        "calibration": {"scale": round(cal.scale, 4), "offset_ms": round(cal.offset_ms, 3), "points": cal.points},
        "predict_ms_per_plan": round(per_plan_ms, 4), "predict_many_us_per_plan": round(batch_us, 3),
        "points": [{"plan": p.to_dict(), "measured_ms": round(m, 3), "predicted_raw_ms": round(r, 3),
                    "predicted_calibrated_ms": round(float(cal(r)), 3)}
                   for p, m, r in zip(plans, eval_meas, eval_raw, strict=True)],
    }  # fmt: skip


def plot(cases: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 4.2), squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        m = np.array([p["measured_ms"] for p in case["points"]])
        raw = np.array([p["predicted_raw_ms"] for p in case["points"]])
        cal = np.array([p["predicted_calibrated_ms"] for p in case["points"]])
        lo, hi = min(m.min(), raw.min()) * 0.95, max(m.max(), raw.max()) * 1.05
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="predicted = measured")
        ax.scatter(m, raw, s=14, marker="o", label=f"sum of parts (median {case['uncalibrated']['median_abs_pct']}%)")
        ax.scatter(m, cal, s=14, marker="x", label=f"calibrated (median {case['calibrated']['median_abs_pct']}%)")
        ax.set_title(f"{case['model'].split('_patch')[0]} · {case['threads']} thread(s)", fontsize=9)
        ax.set_xlabel("measured ms")
        ax.set_ylabel("predicted ms")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="deit_small_patch16_224,deit_tiny_patch16_224")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--plans", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tables", type=Path, default=None, help="use (and extend) these tables instead of fresh ones")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    tables = args.tables or Path(tempfile.mkdtemp(prefix="spvit-fidelity-"))
    cases = []
    for model_name in args.models.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            cases.append(run_case(model_name, threads, args.plans, tables, args.seed, args.rounds))
            c = cases[-1]
            unc, cal = c["uncalibrated"], c["calibrated"]
            print(
                f"{model_name:24} {threads} thr  uncalibrated median {unc['median_abs_pct']:5.2f}% "
                f"p95 {unc['p95_abs_pct']:5.2f}%  | calibrated median {cal['median_abs_pct']:5.2f}% "
                f"p95 {cal['p95_abs_pct']:5.2f}%  | predict {c['predict_ms_per_plan']:.3f} ms/plan",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(cases, indent=2))
    if args.plot:
        plot(cases, args.plot)
    return cases


if __name__ == "__main__":
    main()
