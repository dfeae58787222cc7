"""A table from another day: does `optimize` still ship a plan within the target, and at what cost?

A fresh table for the model is profiled and calibrated here. Two stale copies are then written
(``write_rescaled``) as if the device had run 25% faster (×0.75) or slower (×1.25) on the day
they were measured. `spvit-search optimize` runs on each of the three tables with the same
absolute target (``--ratio`` × the fresh table's dense prediction), with and without its drift
check, ``--reps`` times, the cases rotated. EViT, by default scored by agreement with the
random-weight model's top-1 on demo images (no ImageNet weights here), or by top-1 of a trained
``--checkpoint`` on its ``--data``; ``--verify-top`` candidates per round verified on the device.

Per run the benchmark reports the shipped plan's measured latency / target (goal −5%…0) as
`optimize` judged it (its ratio to the unpruned model measured alongside it, times that model's
median this session; also its raw median, ``raw_over_target``), the
number of whole-model measurements (goal: at most two more than on the fresh table in the same
rep), and ``table_off_by`` (the staleness the run saw: ×1.33 or ×0.8 times the fresh table's).

    python benchmarks/drift.py [--model deit_tiny_patch16_224] [--ratio 0.8] [--reps 3] [--trials 40]
                               [--verify-top 3] [--modes on,off] [--json benchmarks/results/drift.json]
                               [--checkpoint FILE --data fashion --objective accuracy --calib-images 256]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from spvit_search.latency import table_path, write_rescaled

CASES = (("fresh", 1.0), ("faster-day", 0.75), ("slower-day", 1.25))
RESULTS = Path(__file__).resolve().parent / "results"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spvit_search.cli", *args], capture_output=True, text=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--ratio", type=float, default=0.8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--calib-images", type=int, default=32)
    ap.add_argument("--checkpoint", type=Path, help="trained weights of --model (default: random, scored by agreement)")
    ap.add_argument("--data", default="demo", help="calibration data (with --checkpoint: its data)")
    ap.add_argument("--objective", choices=("agreement", "accuracy"), default="agreement")
    ap.add_argument("--verify-top", type=int, default=3, help="candidates per round (optimize's default: 3)")
    ap.add_argument("--modes", default="on,off", help="drift check on, off, or both")
    ap.add_argument("--json", type=Path, default=RESULTS / "drift.json")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="spvit-drift-"))
    pristine = work / "pristine"
    for step in (
        ("profile", "--model", args.model, "--out", str(pristine), "--rounds", "4", "--runs", "5"),
        ("calibrate", "--model", args.model, "--tables", str(pristine), "--points", "5", "--rounds", "4"),
    ):
        done = cli(*step)
        if done.returncode != 0:
            raise SystemExit(f"{step[0]} failed: {done.stderr[-2000:]}")
    predicted = json.loads(cli("predict", "--model", args.model, "--keep", "1.0", "--tables", str(pristine),
                               "--json").stdout)["predicted_ms"]  # fmt: skip
    target = round(args.ratio * predicted, 3)
    print(f"{args.model}: fresh table predicts dense {predicted:.2f} ms; target {target} ms", flush=True)
    src = table_path(pristine, "local", "onnxruntime", 1, 1)
    runs = []
    for rep in range(args.reps):
        for i in range(len(CASES)):
            name, factor = CASES[(i + rep) % len(CASES)]
            for check in [f"--{'no-' if m == 'off' else ''}drift-check" for m in args.modes.split(",")]:
                tables = work / f"r{rep}-{name}{check}"
                shutil.rmtree(tables, ignore_errors=True)
                write_rescaled(src, table_path(tables, "local", "onnxruntime", 1, 1), factor)
                weights = ("--checkpoint", str(args.checkpoint.resolve())) if args.checkpoint else ()
                done = cli("optimize", "--model", args.model, "--tables", str(tables), "--objective", args.objective,
                           *weights, "--data", args.data, "--calib-images", str(args.calib_images),
                           "--target-ms", str(target), "--trials", str(args.trials), "--verify-top",
                           str(args.verify_top), check, "--out", str(tables / "plan.yaml"), "--json")  # fmt: skip
                row = {"rep": rep, "case": name, "factor": factor, "drift_check": check == "--drift-check"}
                if done.returncode != 0:
                    row["error"] = done.stderr.strip().splitlines()[-1][:300]
                else:
                    out = json.loads(done.stdout)
                    shipped = next(c for c in out["candidates"] if c["keep"] == out["plan"]["keep"]
                                   and c["locations"] == out["plan"]["locations"] and not c["over_target"])  # fmt: skip
                    row.update(measured_over_target=round(out["measured_ms"] / target, 4),
                               raw_over_target=round(shipped["raw_ms"] / target, 4),
                               measurements=out["measurements"] or len(out["candidates"]),
                               table_off_by=out["table_off_by"], drift=round(out["drift"], 4),
                               candidates=[{"accuracy": round(c["accuracy"], 2), "keep": c["keep"],
                                            "measured_over_target": round(c["measured_ms"] / target, 4),
                                            "raw_over_target": round(c["raw_ms"] / target, 4),
                                            "unpruned_alongside_ms": c["reference_ms"]}
                                           for c in out["candidates"]])  # fmt: skip
                runs.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "candidates"}), flush=True)
    summary = _summary(runs)
    result = {"model": args.model, "checkpoint": args.checkpoint and args.checkpoint.name, "data": args.data,
              "objective": args.objective, "calib_images": args.calib_images, "target_ms": target,
              "dense_predicted_ms": predicted, "ratio": args.ratio,
              "trials": args.trials, "verify_top": args.verify_top, "runs": runs, "summary": summary}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    _print(summary)
    shutil.rmtree(work, ignore_errors=True)
    return result


def _summary(runs: list[dict]) -> list[dict]:
    """Per case and mode: how often the plan shipped within −5%…0 of the target, and the extra
    measurements over the fresh table of the same rep and mode."""
    rows = []
    for check in sorted({r["drift_check"] for r in runs}, reverse=True):
        fresh = {r["rep"]: r for r in runs if r["case"] == "fresh" and r["drift_check"] == check and "error" not in r}
        for name, _ in CASES:
            these = [r for r in runs if r["case"] == name and r["drift_check"] == check]
            ok = [r for r in these if "error" not in r]
            extra = [r["measurements"] - fresh[r["rep"]]["measurements"] for r in ok if r["rep"] in fresh]
            rows.append({
                "case": name, "drift_check": check, "runs": len(these), "failed": len(these) - len(ok),
                "within_window": sum(0.95 <= r["measured_over_target"] <= 1.0 for r in ok),
                "measured_over_target": [r["measured_over_target"] for r in ok],
                "raw_over_target": [r["raw_over_target"] for r in ok],
                "measurements": [r["measurements"] for r in ok],
                "extra_max": max(extra, default=None),
                "off_by_median": round(statistics.median(r["table_off_by"] for r in ok), 3) if ok else None,
            })  # fmt: skip
    return rows


def _print(summary: list[dict]) -> None:
    print("\n| case | drift check | shipped in −5%…0 | measured / target | raw / target | measurements | extra (max) "
          "| off by |")  # fmt: skip
    print("|---|---|---:|---|---|---|---:|---:|")
    for s in summary:
        ratios = ", ".join(f"{v:.3f}" for v in s["measured_over_target"])
        raw = ", ".join(f"{v:.3f}" for v in s["raw_over_target"])
        check = "on" if s["drift_check"] else "off"
        print(f"| {s['case']} | {check} | {s['within_window']}/{s['runs']} | {ratios} | {raw} | "
              f"{s['measurements']} | {s['extra_max']} | {s['off_by_median']} |")  # fmt: skip


if __name__ == "__main__":
    main()
