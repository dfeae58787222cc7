"""The control of ``benchmarks/equal_latency.py``: its dense teacher fine-tuned with the harness's
budget and recipe, nothing pruned (a keep-1 plan of the family's training-free method, which
equals the dense model: README, "Models with several token grids" and "Swin").

Why: every pruned contender gets ``--epochs`` more epochs with the teacher distilled, on top of a
teacher that a short recipe may leave short of convergence. If those steps alone lifted the dense
model, "within a point of the teacher" would flatter pruning; this says how much they give.
The cells go into the harness's results file under ``dense_control`` (resumable, one per seed).

    python benchmarks/dense_control.py --results benchmarks/results/equal_latency_swin_demo_fashion.json
        --out runs/equal-latency-swin-demo-fashion [--seeds 0,1,2] [--jobs 2]

Run it after the harness, not beside it: both write the results file.
"""

from __future__ import annotations

import argparse
import statistics
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from accuracy import claim_run_dir, log, run_cli
from equal_latency import DATA, Results, dense_plan

from spvit_search.data import build_dataset
from spvit_search.models import build_model
from spvit_search.train import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, required=True, help="the harness's results file")
    ap.add_argument("--out", type=Path, required=True, help="the harness's --out (its teacher is OUT/teacher)")
    ap.add_argument("--seeds", default="0,1,2", type=lambda s: [int(v) for v in s.split(",")])
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    if not args.results.exists():
        raise SystemExit(f"{args.results}: no such results file (run benchmarks/equal_latency.py first)")
    results = Results(args.results)
    setting = results.data.get("setting", {})
    model_name = results.data.get("model") or setting.get("model")
    teacher = args.out / "teacher" / "model.pt"
    if not model_name or not teacher.exists():
        raise SystemExit(f"{args.results} names no model, or {teacher} does not exist: pass the harness's --out")
    shape = build_model(model_name)  # untrained: the plan's locations and the test split's transforms
    plan = dense_plan(shape, model_name)
    plan_file = plan.save(args.out / "plans" / "dense-control.yaml")
    control = results.data.setdefault("dense_control", {"plan": plan.to_dict(), "cells": {}})
    budget = {"epochs": setting["epochs"], "finetune_subset": setting["finetune_subset"]}
    control.update(budget=budget, teacher_top1=results.data.get("dense_top1"))
    test = build_dataset(DATA, "test", shape)
    lock = threading.Lock()  # two trainings record into one results file

    def train(seed: int) -> None:
        if str(seed) in control["cells"]:
            return
        out = args.out / "runs" / "dense-control" / f"seed{seed}"
        cli = ["finetune", "--plan", str(plan_file), "--checkpoint", str(teacher), "--epochs", str(budget["epochs"]),
               "--data", DATA, "--seed", str(seed), "--out", str(out),
               "--train-subset", str(budget["finetune_subset"])]  # fmt: skip
        claim_run_dir(out, {"args": cli})
        seconds = run_cli(cli, max(1, 2 // args.jobs), out.with_suffix(".log"))
        top1 = evaluate(build_model(model_name, out / "model.pt", plan).eval(), test, torch.device("cpu"))[0]
        with lock:
            control["cells"][str(seed)] = {"test_top1": top1, "seconds": round(seconds, 1), "command": cli}
            results.save()
        log(f"dense control seed {seed}: test top-1 {top1:.2f}%")

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(train, args.seeds))
    top1 = [c["test_top1"] for c in control["cells"].values()]
    control["mean"] = round(statistics.mean(top1), 2)
    control["sd"] = round(statistics.stdev(top1), 2) if len(top1) > 1 else None
    results.save()
    print(
        f"{model_name}: teacher {control['teacher_top1']}% test top-1; fine-tuned at keep 1 with the harness's "
        f"budget ({budget['epochs']} epochs on {budget['finetune_subset']} images): {control['mean']}% "
        f"± {control['sd']} over {len(top1)} seeds"
    )


if __name__ == "__main__":
    main()
