"""Accuracy of the methods on the embedded demo data, one plan for all.

Runs the real commands: `spvit-search train` (dense model, the teacher), then for the same
plan `spvit-search finetune` with `spvit` (package token) and `hard` (no package token) and
the same settings, and scores `evit` training-free on the dense checkpoint (and fine-tuned,
for reference). Reports test top-1 (400 images) and the FLOPs reduction of each pruned model.

    python benchmarks/accuracy.py [--locations 2,4] [--keep 0.55,0.3] [--epochs 30] [--out runs/accuracy]
                                  [--dense runs/dense/model.pt] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import spvit_search as sp
from spvit_search.data import build_dataset
from spvit_search.models import build_model
from spvit_search.train import evaluate

MODEL = "vit_demo_digits"


def run(*args: str) -> float:
    start = time.perf_counter()
    print("$ spvit-search " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "spvit_search.cli", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--locations", default="2,4")
    ap.add_argument("--keep", default="0.55,0.3")
    ap.add_argument("--epochs", type=int, default=30, help="fine-tune epochs (every method alike)")
    ap.add_argument("--dense", type=Path, default=None, help="a dense checkpoint (default: train one)")
    ap.add_argument("--out", type=Path, default=Path("runs/accuracy"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    locations = tuple(int(v) for v in args.locations.split(","))
    keep = tuple(float(v) for v in args.keep.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    seconds = {}

    dense_ckpt = args.dense
    if dense_ckpt is None:
        dense_ckpt = args.out / "dense" / "model.pt"
        seconds["train dense"] = run("train", "--out", str(args.out / "dense"), "--no-resume")
    test = build_dataset("demo", "test")
    cpu = torch.device("cpu")
    dense = build_model(MODEL, dense_ckpt).eval()
    dense_macs = sp.count_flops(dense).macs
    rows = [{"method": "dense", "training": "trained from scratch", "test_top1": evaluate(dense, test, cpu)[0],
             "flops_reduction_pct": 0.0}]  # fmt: skip

    def score(method: str, checkpoint: Path, training: str) -> None:
        plan = sp.PruningPlan(locations=locations, keep=keep, method=method, model=MODEL)
        model = build_model(MODEL, checkpoint, plan).eval()
        reduction = 100 * (1 - sp.count_flops(model).macs / dense_macs)
        rows.append({"method": method, "training": training, "test_top1": evaluate(model, test, cpu)[0],
                     "flops_reduction_pct": round(reduction, 1)})  # fmt: skip

    score("evit", dense_ckpt, "training-free")
    for method in ("spvit", "hard", "evit"):
        plan = sp.PruningPlan(locations=locations, keep=keep, method=method, model=MODEL)
        plan_file = plan.save(args.out / f"{method}.yaml")
        out = args.out / f"finetune-{method}"
        seconds[f"finetune {method}"] = run("finetune", "--plan", str(plan_file), "--checkpoint", str(dense_ckpt),
                                            "--out", str(out), "--epochs", str(args.epochs), "--no-resume")  # fmt: skip
        score(method, out / "model.pt", f"fine-tuned {args.epochs} epochs")

    result = {"model": MODEL, "locations": list(locations), "keep": list(keep), "rows": rows,
              "seconds": {k: round(v, 1) for k, v in seconds.items()}}  # fmt: skip
    print(f"{MODEL} on the demo digits (test: 400 images), plan locations={list(locations)} keep={list(keep)}")
    print(f"{'method':8} {'training':24} {'test top-1':>10} {'FLOPs -':>8}")
    for r in rows:
        print(f"{r['method']:8} {r['training']:24} {r['test_top1']:9.2f}% {r['flops_reduction_pct']:7.1f}%")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
