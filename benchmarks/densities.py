"""One weight-shared checkpoint at several densities against a model fine-tuned for each (issue 13).

On Fashion-MNIST with the shipped dense teacher (``benchmarks/checkpoints/vit_demo_fashion.pt``),
the selector locations of the model family's default and ``--densities`` operating points (per-
stage ratios r, kept cumulatively: keep = r, r², r³):

- ``separate``: ``finetune`` at one density (``--epochs`` on ``--finetune-subset`` images), one run
  per density and seed;
- ``shared``: one ``finetune --densities`` run per seed with every density and the dense path in
  every step (so each density gets the steps a separate run gives it), the sparse paths
  distilled from the dense one; ``shared-nohint`` the same without the selector hint (the
  teacher's class-attention top-k as the selectors' target) — the hint's effect.

Every run distils the teacher's logits and tokens and uses the selector settings of
``benchmarks/equal_latency.py`` (chosen there on the calibration split). Reported: test top-1 at
each density (mean ± sd over seeds), shared − separate, and the shared checkpoint's dense option
(every keep 1.0) against the teacher. Each run is recorded as it finishes (``--results``); a
rerun skips what is done.

    python benchmarks/densities.py [--seeds 0,1,2] [--jobs 2] [--epochs 2] [--finetune-subset 3000]
        [--ratios 0.9,0.8,0.7,0.6] [--out runs/densities] [--results benchmarks/results/densities.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from accuracy import SETTINGS as DATA_SETTINGS
from accuracy import SHIPPED_TEACHERS, claim_run_dir, curve, log, run_cli, shipped_sha256
from equal_latency import SELECTOR_HINT, SELECTOR_WARMUP

import spvit_search as sp
from spvit_search.data import build_dataset
from spvit_search.models import build_model
from spvit_search.train import evaluate

DATA = "fashion"
MODEL = DATA_SETTINGS[DATA].model
CONTENDERS = {
    "separate": "fine-tuned at this density alone",
    "shared": "one weight-shared checkpoint, every density and the dense path each step, selector hint",
    "shared-nohint": "the same without the selector hint",
}


def keep_of(ratio: float, stages: int) -> tuple[float, ...]:
    return tuple(round(ratio ** (i + 1), 4) for i in range(stages))


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, args.out
        self.teacher = SHIPPED_TEACHERS[DATA]
        model = build_model(MODEL, self.teacher)
        self.locations = sp.pruning.family_for(model).default_locations(model, 3)
        self.densities = [keep_of(r, len(self.locations)) for r in args.ratios]
        self.setting = {"model": MODEL, "teacher_sha256": shipped_sha256(DATA_SETTINGS[DATA]), "epochs": args.epochs,
                        "finetune_subset": args.finetune_subset, "locations": list(self.locations),
                        "densities": [list(k) for k in self.densities], "selector_hint": SELECTOR_HINT,
                        "selector_warmup": SELECTOR_WARMUP,
                        "shared_recipe": "dense loss + mean of the sparse losses, no ratio loss"}  # fmt: skip
        self.results = json.loads(args.results.read_text()) if args.results.exists() else {}
        if self.results.get("setting") not in (None, self.setting):
            raise SystemExit(f"{args.results} holds a run with other settings: give another --results (and --out)")
        self.results["setting"] = self.setting
        self.results.setdefault("cells", {})
        self._lock = threading.Lock()
        self._test = build_dataset(DATA, "test", model)

    def save(self) -> None:
        self.args.results.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.args.results.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        os.replace(tmp, self.args.results)

    def plan_file(self, keep: tuple[float, ...]) -> Path:
        path = self.out / "plans" / ("plan-" + "-".join(f"{k:g}" for k in keep) + ".yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        sp.PruningPlan(locations=self.locations, keep=keep, method="spvit", model=MODEL).save(path)
        return path

    def cells(self) -> list[tuple[str, int, tuple[float, ...] | None]]:
        todo = [("separate", s, k) for s in self.args.seeds for k in self.densities]
        todo += [(c, s, None) for c in ("shared", "shared-nohint") for s in self.args.seeds]
        return todo

    def key(self, contender: str, seed: int, keep) -> str:
        what = "all" if keep is None else "-".join(f"{k:g}" for k in keep)
        return f"{contender}/{what}/seed{seed}"

    def run_cell(self, contender: str, seed: int, keep, threads: int) -> None:
        key = self.key(contender, seed, keep)
        if key in self.results["cells"]:
            return
        out = self.out / "runs" / key
        sparsest = keep or self.densities[-1]
        args = ["finetune", "--plan", str(self.plan_file(sparsest)), "--checkpoint", str(self.teacher),
                "--data", DATA, "--epochs", str(self.args.epochs), "--train-subset", str(self.args.finetune_subset),
                "--seed", str(seed), "--out", str(out), "--selector-warmup", str(SELECTOR_WARMUP)]  # fmt: skip
        if contender != "shared-nohint":
            args += ["--selector-hint", str(SELECTOR_HINT)]
        if keep is None:
            args += ["--densities", ";".join(",".join(f"{k:g}" for k in d) for d in self.densities)]
        claim_run_dir(out, {"args": args, "setting": self.setting})
        seconds = run_cli(args, threads, out.with_suffix(".log"))
        model = build_model(MODEL, out / "model.pt", sp.PruningPlan.load(self.plan_file(sparsest))).eval()
        points = [keep] if keep is not None else [*self.densities, (1.0,) * len(self.locations)]
        top1 = {}
        for point in points:
            sp.set_keep(model, point)
            top1["-".join(f"{k:g}" for k in point)] = evaluate(model, self._test, torch.device("cpu"))[0]
        cell = {"contender": contender, "seed": seed, "test_top1": top1, "seconds": round(seconds, 1),
                **curve(out / "metrics.csv")}  # fmt: skip
        with self._lock:
            self.results["cells"][key] = cell
            self.save()
        log(f"{key}: {top1}")

    def run(self) -> None:
        if "teacher_test_top1" not in self.results:
            dense = build_model(MODEL, self.teacher).eval()
            self.results["teacher_test_top1"] = evaluate(dense, self._test, torch.device("cpu"))[0]
            self.results["gmacs"] = {
                "-".join(f"{k:g}" for k in d): sp.count_flops(
                    sp.prune(build_model(MODEL, self.teacher).eval(),
                             sp.PruningPlan(locations=self.locations, keep=d, method="spvit"))).gmacs
                for d in [*self.densities, (1.0,) * len(self.locations)]
            }  # fmt: skip
            self.save()
        threads = max(1, (os.cpu_count() or 2) // self.args.jobs)
        with ThreadPoolExecutor(self.args.jobs) as pool:
            for f in [pool.submit(self.run_cell, c, s, k, threads) for c, s, k in self.cells()]:
                f.result()


def summarise(results: dict, seeds: list[int]) -> list[dict]:
    """Per density: separate and shared mean ± sd over seeds, their difference, FLOPs saved."""
    cells = results["cells"]
    dense_gmacs = results["gmacs"]["-".join("1" for _ in results["setting"]["locations"])]
    rows = []
    points = [*results["setting"]["densities"], [1.0] * len(results["setting"]["locations"])]
    for keep in points:
        name = "-".join(f"{k:g}" for k in keep)
        row = {"keep": keep, "flops_saved_pct": round(100 * (1 - results["gmacs"][name] / dense_gmacs), 1)}
        for contender in CONTENDERS:
            vals = [c["test_top1"][name] for k, c in cells.items() if k.startswith(contender + "/")
                    and c["seed"] in seeds and name in c["test_top1"]]  # fmt: skip
            if contender == "separate" and all(k >= 1.0 for k in keep):
                vals = [results["teacher_test_top1"]]  # the dense point: the original model
            if vals:
                row[contender] = {"mean": round(statistics.mean(vals), 3), "n": len(vals),
                                  "sd": round(statistics.stdev(vals), 3) if len(vals) > 1 else None}  # fmt: skip
        if "separate" in row and "shared" in row:
            row["shared_minus_separate"] = round(row["shared"]["mean"] - row["separate"]["mean"], 3)
        rows.append(row)
    return rows


def print_table(rows: list[dict], results: dict) -> None:
    print(f"teacher (dense, original) test top-1 {results['teacher_test_top1']:.2f}%")
    print("| keep | FLOPs saved | separate | shared | shared − separate | shared, no hint |")
    print("|---|---:|---:|---:|---:|---:|")

    def fmt(v):
        if v is None:
            return "—"
        return f"{v['mean']:.2f}%" + (f" ± {v['sd']:.2f}" if v.get("sd") is not None else "") + f" (n={v['n']})"

    for r in rows:
        diff = r.get("shared_minus_separate")
        print(f"| {'/'.join(f'{k:g}' for k in r['keep'])} | {r['flops_saved_pct']:.1f}% | {fmt(r.get('separate'))} | "
              f"{fmt(r.get('shared'))} | {'—' if diff is None else f'{diff:+.2f}'} | "
              f"{fmt(r.get('shared-nohint'))} |")  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2", type=lambda s: [int(v) for v in s.split(",")])
    ap.add_argument("--ratios", default="0.9,0.8,0.7,0.6", type=lambda s: [float(v) for v in s.split(",")])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--finetune-subset", type=int, default=3000)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/densities"))
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "densities.json")
    ap.add_argument("--summary-only", action="store_true")
    args = ap.parse_args(argv)
    if args.summary_only:
        results = json.loads(args.results.read_text())
    else:
        bench = Bench(args)
        bench.run()
        results = bench.results
    rows = summarise(results, args.seeds)
    results["summary"] = rows
    print_table(rows, results)
    return results


if __name__ == "__main__":
    main()
