"""Does the plan `optimize` picks meet its target when it really runs? DeiT-S (PiT-S, Swin-T) on this host.

For 3 targets (shares of the dense model's measured latency), `spvit-search optimize`
(EViT on DeiT-S, agreement with the dense model's top-1 on demo images upscaled to 224 —
no ImageNet weights here — verification of the top candidates on the device) picks a plan;
that plan is then exported to ONNX on its own and measured end to end in a fresh session
(interleaved with the dense model, whose figure is reported so that a slow spell of the host
is visible), and compared with the target (goal: within −5%…+3%). Parts of the model missing
from the copied tables are profiled into the copy first (``spvit-search profile`` resumes).

    python benchmarks/latency_truth.py [--model deit_small_patch16_224] [--ratios 0.55,0.7,0.85]
                                       [--trials 120] [--locations 1,3,9] [--json out.json]

``--locations`` fixes where the selectors sit (default: optimize's evenly spaced ones); the
method is optimize's default, EViT (on Swin its training-free ``norm``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import spvit_search as sp
from profilers import MeasureSettings
from spvit_search.devices import DeviceRegistry
from spvit_search.measure import measure_models
from spvit_search.models import build_model
from spvit_search.profile import profile_model
from spvit_search.pruning import family_for


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--ratios", default="0.55,0.7,0.85")
    ap.add_argument("--trials", type=int, default=120)
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--locations", default=None, help="selector locations, e.g. 1,3,9 (default: optimize's)")
    ap.add_argument("--tables", default="latency_tables", help="tables to read and calibrate (a copy is used)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    device = DeviceRegistry.load().get("local")
    work = Path(tempfile.mkdtemp(prefix="spvit-truth-"))
    tables = work / "tables"
    if Path(args.tables).exists():
        subprocess.run(["cp", "-r", args.tables, str(tables)], check=True)
    print(f"profiling {args.model} into the copy (parts already there are kept) ...", file=sys.stderr, flush=True)
    profile_model(device, args.model, root=tables, progress=False)
    dense = build_model(args.model).eval()
    # patched with nothing acting: identical for ViT and PiT; a Swin runs with the exact-zero shift
    # masks its plans use (timm's -100 gives denormal softmax weights, slow on x86: README, Swin)
    family = family_for(dense)
    sp.prune(dense, sp.PruningPlan(locations=family.default_locations(dense, 1), keep=(1.0,),
                                   method=family.training_free))  # fmt: skip
    timing, version = measure_models(device, {"dense": dense}, MeasureSettings(rounds=8, runs=5))
    dense_ms = timing["dense"].median_ms
    rows = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        target = round(dense_ms * ratio, 2)
        plan_file = work / f"plan-{ratio}.yaml"
        cmd = [sys.executable, "-m", "spvit_search.cli", "optimize", "--model", args.model, "--target-ms", str(target),
               "--objective", "agreement", "--calib-images", str(args.calib_images), "--trials", str(args.trials),
               "--tables", str(tables), "--out", str(plan_file), "--json",
               *(["--locations", args.locations] if args.locations else [])]  # fmt: skip
        print(f"target {target} ms ({ratio:.0%} of dense {dense_ms:.2f} ms) ...", file=sys.stderr, flush=True)
        summary = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        plan = sp.PruningPlan.load(plan_file)
        model = build_model(args.model, None, plan).eval()
        onnx = sp.export_onnx(model, work / f"chosen-{ratio}.onnx")
        # interleaved with the dense model: a slow spell of this shared VM shows in both
        again, _ = measure_models(device, {"onnx": onnx, "dense": dense}, MeasureSettings(rounds=20, runs=5))
        measured = again["onnx"].median_ms
        rows.append({
            "target_ms": target, "ratio_of_dense": ratio, "method": plan.method, "keep": list(plan.keep),
            "locations": list(plan.locations), "agreement_pct": summary["accuracy"],
            "predicted_ms": plan.predicted_ms, "verified_ms": plan.measured_ms,
            "exported_measured_ms": round(measured, 3), "dense_same_session_ms": round(again["dense"].median_ms, 3),
            "error_pct": round(100 * (measured / target - 1), 2), "trials": summary["trials"],
        })  # fmt: skip
        r = rows[-1]
        print(f"{args.model} target {target:7.2f} ms: keep {r['keep']} predicted {r['predicted_ms']:.2f}, verified "
              f"{r['verified_ms']:.2f}, exported file measured {measured:.2f} ms -> {r['error_pct']:+.2f}% "
              f"(agreement {r['agreement_pct']:.1f}%)", flush=True)  # fmt: skip
    out = {"model": args.model, "device": device.name, "runtime": version, "dense_ms": round(dense_ms, 3), "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return rows


if __name__ == "__main__":
    main()
