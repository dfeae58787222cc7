"""``optimize --percentile`` against the device (issue 13): a budget held at a percentile of the
per-image latency, and what the test images measure.

The checkpoint is ``benchmarks/densities.py``'s SPViT model fine-tuned at 0.7/0.49/0.343 (seed 0).
For each percentile of ``--percentiles``:

1. the local table of ``vit_demo_fashion`` is profiled and calibrated here (``OUT/tables``, as in
   ``benchmarks/adaptive.py``);
2. ``optimize`` runs with ``--percentile P``, per-image counts at ``--scale``, and the budget
   ``--target-share`` of the unpruned model. It scores plans on ``--calib-images`` images of the
   calibration split and, on this local device, measures its best candidates' files image by
   image over ``--verify-images`` of them beside the unpruned model
   (:mod:`spvit_search.verify_adaptive`); ``--verify-top 0`` keeps the table's prediction alone;
3. the chosen plan is exported with its counts computed in the graph (``export_onnx_adaptive``),
   beside the unpruned model. ``--latency-images`` test images are measured through both files
   (median of ``--repeats`` runs per image, files alternating, onnxruntime CPU, 1 thread), with
   ``--calib-latency-images`` calibration images spread among them;
4. reported:
   - the measured percentile over the test images, as a share of the unpruned model measured
     alongside, against the target share;
   - the table's prediction of it;
   - the in-session prediction (``CountsLatency`` from the calibration images) against what was
     measured.

A search that finds no plan within the budget on the device is recorded with its message.

    python benchmarks/percentile.py [--percentiles 50,95] [--target-share 0.95] [--scale 1.0]
        [--verify-top 3] [--verify-images 100]
        [--checkpoint runs/densities/runs/separate/0.7-0.49-0.343/seed0/model.pt]
        [--out runs/percentile] [--results benchmarks/results/percentile.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from accuracy import SHIPPED_TEACHERS
from adaptive import counts_of, per_image_ms_interleaved, tables

import spvit_search as sp
from spvit_search.data import build_dataset
from spvit_search.devices import DeviceRegistry
from spvit_search.errors import SpvitError
from spvit_search.export import export_onnx, export_onnx_adaptive, onnx_session
from spvit_search.models import build_model
from spvit_search.optimize import OptimizeSettings, calibration_tensors, optimize
from spvit_search.predictor import CountsLatency, PlanLatency
from spvit_search.pruning import AdaptiveCount, set_adaptive

DATA, MODEL = "fashion", "vit_demo_fashion"


def run_percentile(args, q: float, device, root: Path, images: torch.Tensor, reference: torch.Tensor) -> dict:
    latency = PlanLatency.for_device(device, build_model(MODEL), MODEL, root=root, methods=("spvit",))
    unpruned_ms = latency.predict(sp.PruningPlan(locations=(2,), keep=(1.0,), model=MODEL)).total_ms
    settings = OptimizeSettings(target_ms=None, target_share=args.target_share, checkpoint=str(args.checkpoint),
                                data=DATA,
                                calib_images=args.calib_images, methods=("spvit",), trials=args.trials,
                                percentile=q, adaptive_scale=args.scale, tables=str(root), progress=False,
                                verify_top=args.verify_top, percentile_images=args.verify_images)  # fmt: skip
    work = args.out / f"p{q:g}"
    try:
        result = optimize(MODEL, device, settings, work / "plan.yaml")
    except SpvitError as err:  # no plan within the budget on the device: that is the finding
        return {"percentile": q, "target_share": args.target_share, "refused": str(err)}
    target = result.plan.target_ms
    plan = result.plan
    model = build_model(MODEL, args.checkpoint, plan).eval()
    set_adaptive(model, AdaptiveCount(scale=args.scale))
    dense = build_model(MODEL, SHIPPED_TEACHERS[DATA]).eval()  # latency does not depend on the weights
    sessions = {"adaptive": onnx_session(export_onnx_adaptive(model, work / "adaptive.onnx")),
                "unpruned": onnx_session(export_onnx(dense, work / "unpruned.onnx"))}  # fmt: skip
    counts, reference_counts = counts_of(model, images), counts_of(model, reference)
    measured, reference_ms = per_image_ms_interleaved(sessions, images, reference, args.repeats)
    predicted = latency.predict_counts(plan, counts)
    in_session = CountsLatency.fit(latency.predict_counts(plan, reference_counts), reference_ms["adaptive"])
    unpruned_measured = float(np.median(measured["unpruned"]))
    key = f"p{q:g}"
    measured_q = float(np.percentile(measured["adaptive"], q))
    return {
        "percentile": q, "target_ms": target, "target_share": args.target_share, "plan_keep": list(plan.keep),
        "calib_accuracy": round(result.accuracy, 3), "optimize_adaptive": result.adaptive,
        "optimize_candidates": result.candidates,
        "test_counts_mean": counts.mean(axis=0).round(2).tolist(),
        "test_predicted_by_table_ms": round(float(np.percentile(predicted, q)), 4),
        "test_measured_ms": round(measured_q, 4), "unpruned_measured_ms": round(unpruned_measured, 4),
        "measured_share": round(measured_q / unpruned_measured, 4),
        "table_unpruned_ms": round(unpruned_ms, 4),
        "table_over_measured": round(float(np.percentile(predicted, q)) / measured_q, 4),
        "in_session_ms": round(in_session.percentiles(predicted, (q,))[key], 4),
        "in_session_over_measured": round(in_session.percentiles(predicted, (q,))[key] / measured_q, 4),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--percentiles", default="50,95", type=lambda s: [float(v) for v in s.split(",")])
    ap.add_argument("--target-share", type=float, default=0.95)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--trials", type=int, default=80)
    ap.add_argument("--checkpoint", type=Path,
                    default=Path("runs/densities/runs/separate/0.7-0.49-0.343/seed0/model.pt"))  # fmt: skip
    ap.add_argument("--calib-images", type=int, default=500)
    ap.add_argument("--verify-top", type=int, default=3, help="candidates measured image by image (0: the table's)")
    ap.add_argument("--verify-images", type=int, default=100, help="calibration images each candidate is measured on")
    ap.add_argument("--calib-latency-images", type=int, default=300)
    ap.add_argument("--latency-images", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("runs/percentile"))
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "percentile.json")
    args = ap.parse_args(argv)
    if not args.checkpoint.is_file():
        raise SystemExit(f"{args.checkpoint} does not exist: run python benchmarks/densities.py --seeds 0 --ratios 0.7 "
                         "--results /tmp/densities.json first (a new results file: the shipped one holds that cell, "
                         "so it would be skipped), or give --checkpoint")  # fmt: skip
    torch.set_num_threads(1)
    device = DeviceRegistry.load().get("local")
    root = tables(args.out, device, SHIPPED_TEACHERS[DATA])  # calibrated on the dense teacher's plans
    probe = build_model(MODEL)
    test = build_dataset(DATA, "test", probe)
    images = torch.stack([test[i][0] for i in range(args.latency_images)])
    calib, _ = calibration_tensors(DATA, args.calib_images, probe)
    rows = [run_percentile(args, q, device, root, images, calib[: args.calib_latency_images])
            for q in args.percentiles]  # fmt: skip
    results = {"model": MODEL, "checkpoint": str(args.checkpoint), "scale": args.scale, "rows": rows}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1))
    print("| percentile | budget (share) | plan keep | verified on calib (share) | test measured (share) | "
          "test share / target share | table / measured | in session / measured |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "refused" in r:
            print(f"| p{r['percentile']:g} | ({r['target_share']:g}) | refused: {r['refused']} | | | | | |")
            continue
        a, key = r["optimize_adaptive"], f"measured_p{r['percentile']:g}_ms"
        verified = f"{a[key]:.3f} ms ({a[key] / a['unpruned_measured_ms']:.3f})" if key in a else "not measured"
        print(f"| p{r['percentile']:g} | {r['target_ms']:.3f} ms ({r['target_share']:g}) | {r['plan_keep']} | "
              f"{verified} | {r['test_measured_ms']:.3f} ms ({r['measured_share']:.3f}) | "
              f"{r['measured_share'] / r['target_share']:.3f} | {r['table_over_measured']:.3f} | "
              f"{r['in_session_over_measured']:.3f} |")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
