"""Accuracy of the pruning methods at one plan, over seeds, on the digits and on Fashion-MNIST.

Runs the real commands for every cell (data set × seed × variant): `spvit-search train` for the
dense model of that seed (the teacher of every fine-tune of that seed), `spvit-search finetune`
for each method with the same settings, and scores `evit` training-free on the dense checkpoint.
The ablations (Fashion-MNIST by default) change one thing of the `spvit` fine-tune each.

Every cell's result is written as it finishes, to ``OUT/<data>/seed<S>/<variant>.json`` and
into ``--results`` (committed: a rerun, or a later session, skips the cells it holds with the
same settings). No selection on the test split: every model is the last epoch of its run; the
calibration split is what the training curves are drawn on.

    python benchmarks/accuracy.py [--data digits,fashion] [--seeds 0,1,2] [--suite main,ablations]
                                  [--jobs 2] [--out runs/accuracy] [--results benchmarks/results/accuracy.json]
                                  [--finetune-subset N]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import functools
import hashlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import spvit_search as sp
from spvit_search.data import build_dataset
from spvit_search.models import build_model
from spvit_search.plan import kept_count
from spvit_search.train import evaluate

LOCATIONS, KEEP = (2, 4), (0.55, 0.3)


@dataclass(frozen=True)
class DataSetting:
    """How one data set is trained: the same recipe for every seed and method."""

    name: str
    data: str
    model: str
    dense_epochs: int
    dense_lr: float
    dense_warmup: float
    finetune_epochs: int
    train_subset: int | None  # of the dense training
    finetune_subset: int | None  # of every fine-tune (a prefix of the same fixed order as train_subset)
    shared_teacher: bool  # one dense model (seed 0) is every seed's teacher: too slow to train per seed here


SETTINGS = {
    "digits": DataSetting("digits", "demo", "vit_demo_digits", 50, 2e-3, 3.0, 20, None, None, False),
    "fashion": DataSetting("fashion", "fashion", "vit_demo_fashion", 12, 2e-3, 1.0, 3, None, 12000, True),
}
# A shipped dense checkpoint used instead of training one when its sha256 matches its sidecar.
SHIPPED_TEACHERS = {"fashion": Path(__file__).parent / "checkpoints" / "vit_demo_fashion.pt"}

# variant -> (method, extra finetune arguments, what it shows)
MAIN = {
    "spvit": ("spvit", [], "learned selector + package token, exact top-k in training"),
    "hard": ("hard", [], "learned selector, pruned tokens dropped"),
    "evit": ("evit", [], "class-attention scorer + fused token"),
}
ABLATIONS = {
    "spvit-sampled": ("spvit", ["--train-count", "sampled"], "Gumbel-sampled decisions + ratio loss (as published)"),
    "spvit-nodistill": ("spvit", ["--distill-weight", "0", "--token-weight", "0"], "no distillation"),
    "spvit-latency": ("spvit", ["--latency-weight", "1.0"], "latency-aware loss on (target 90% of the plan's)"),
}
_print_lock = threading.Lock()
_results_lock = threading.Lock()


def log(text: str) -> None:
    with _print_lock:
        print(text, file=sys.stderr, flush=True)


def run_cli(args: list[str], threads: int, logfile: Path) -> float:
    """Run ``spvit-search *args`` with ``threads`` threads, its output in ``logfile``; seconds taken.

    ``train`` and ``finetune`` skip their own test-split top-1: every harness evaluates the
    weights itself (10,000 images: 12-19 s a run of a demo model here, twice otherwise).
    """
    start = time.perf_counter()
    if args[0] in ("train", "finetune"):
        args = [*args, "--no-final-test"]
    log("$ spvit-search " + " ".join(args))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("w") as fh:
        done = subprocess.run([sys.executable, "-m", "spvit_search.cli", *args], stdout=fh, stderr=subprocess.STDOUT,
                              env=env)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"failed (exit {done.returncode}): spvit-search {' '.join(args)}; see {logfile}")
    return time.perf_counter() - start


def curve(metrics: Path) -> dict:
    """Final training-mode kept fractions and the largest epoch-to-epoch drop of calib top-1."""
    with metrics.open() as fh:
        rows = list(csv.DictReader(fh))
    acc = [float(r["eval_acc"]) for r in rows]
    drops = [0.0, *(a - b for a, b in itertools.pairwise(acc[1:]))]  # after the first (warm-up) epoch; 0: none fell
    kept = [float(v) for v in rows[-1]["kept"].split("/")] if rows[-1].get("kept") else None
    return {"calib_curve": acc, "max_drop_after_warmup": round(max(drops), 3), "train_kept": kept}


@functools.cache  # read once per process: done() asks for every cell
def shipped_sha256(setting: DataSetting) -> str | None:
    """sha256 of the shipped teacher of ``setting`` as its sidecar states it (None: none shipped)."""
    shipped = SHIPPED_TEACHERS.get(setting.name)
    if shipped is None or not shipped.exists():
        return None
    return json.loads(shipped.with_suffix(".json").read_text())["sha256"]


def claim_run_dir(out: Path, spec: dict) -> bool:
    """Make ``out`` the working folder of the run described by ``spec``; True if it already was.

    A folder left by a run of the same spec is kept (the CLI resumes or reuses it); one left by
    another spec (other settings, another teacher) is emptied first, so its run is neither
    resumed nor mistaken for a finished one.
    """
    marker = out / "cell.json"
    same = marker.exists() and json.loads(marker.read_text()) == spec
    if out.exists() and not same:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(spec, indent=1))
    return same


def gathered_fractions(model: torch.nn.Module, num_patches: int) -> list[float]:
    """Kept fractions of a training-free scorer: it gathers exact counts in training as at inference."""
    return [kept_count(k, num_patches) / num_patches for k in model.spvit_plan.keep]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results_file: Path = args.results
        self.results = {"cells": {}}
        self.mine: set[str] = set()  # cells this process wrote: its copy wins over the file's
        self.merge_results()
        self.tests: dict[str, object] = {}
        self._seed_locks: dict[tuple[str, int], threading.Lock] = {}

    def merge_results(self) -> None:
        """Take in the cells another process (another lane, an earlier session) wrote to the file."""
        old = json.loads(self.results_file.read_text()) if self.results_file.exists() else {}
        for key, cell in old.get("cells", {}).items():  # a file of the one-seed benchmark has none
            if key not in self.mine:
                self.results["cells"][key] = cell

    def update(self, change) -> None:
        """Apply ``change`` to the results and write them, merged with what other processes wrote."""
        self.results_file.parent.mkdir(parents=True, exist_ok=True)
        with _results_lock, self.results_file.with_suffix(".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # benchmark processes running side by side share the file
            self.merge_results()
            change(self.results)
            tmp = self.results_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.results, indent=1))
            os.replace(tmp, self.results_file)

    def key(self, setting: DataSetting, seed: int, variant: str) -> str:
        return f"{setting.name}/seed{seed}/{variant}"

    def done(self, setting: DataSetting, seed: int, variant: str) -> dict | None:
        """The recorded cell, if it was made with today's setting and today's shipped teacher."""
        cell = self.results["cells"].get(self.key(setting, seed, variant))
        return cell if cell and is_current(setting.name, cell) else None

    def record(self, setting: DataSetting, seed: int, variant: str, cell: dict) -> None:
        cell = {"setting": asdict(setting), **cell, "teacher_sha256": shipped_sha256(setting)}
        self.mine.add(self.key(setting, seed, variant))
        path = self.args.out / setting.name / f"seed{seed}" / f"{variant}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cell, indent=1))
        self.update(lambda results: results["cells"].__setitem__(self.key(setting, seed, variant), cell))
        log(f"{self.key(setting, seed, variant)}: test top-1 {cell['test_top1']:.2f}%")

    def test_set(self, setting: DataSetting, model: torch.nn.Module):
        if setting.name not in self.tests:
            self.tests[setting.name] = build_dataset(setting.data, "test", model)
        return self.tests[setting.name]

    def score(self, setting: DataSetting, checkpoint: Path, method: str | None) -> tuple[dict, torch.nn.Module]:
        plan = None if method is None else sp.PruningPlan(LOCATIONS, KEEP, method=method, model=setting.model)
        model = build_model(setting.model, checkpoint, plan).eval()
        top1 = evaluate(model, self.test_set(setting, model), torch.device("cpu"))[0]
        return {"test_top1": top1, "macs": sp.count_flops(model).macs}, model

    def teacher(self, setting: DataSetting, seed: int, threads: int) -> tuple[Path, dict]:
        """The dense model of ``seed`` (or the shared one): shipped, trained before, or trained now."""
        teacher_seed = 0 if setting.shared_teacher else seed
        shipped = SHIPPED_TEACHERS.get(setting.name)
        if shipped is not None and shipped.exists():
            meta = json.loads(shipped.with_suffix(".json").read_text())
            if hashlib.sha256(shipped.read_bytes()).hexdigest() != meta["sha256"]:
                raise SystemExit(f"{shipped}: sha256 differs from {shipped.with_suffix('.json')}")
            return shipped, {"teacher": str(shipped), "teacher_sha256": meta["sha256"], "seconds": meta.get("seconds")}
        root = self.args.out / setting.name / ("dense" if setting.shared_teacher else f"seed{seed}/dense")
        with self._teacher_lock if setting.shared_teacher else contextlib.nullcontext():
            spec = {"setting": asdict(setting), "seed": teacher_seed}
            if not (claim_run_dir(root, spec) and (root / "model.pt").exists()):
                dense_subset = ["--train-subset", str(setting.train_subset)] if setting.train_subset else []
                args = ["train", "--model", setting.model, "--out", str(root), "--epochs", str(setting.dense_epochs),
                        "--lr", str(setting.dense_lr), "--warmup-epochs", str(setting.dense_warmup), "--data",
                        setting.data, "--seed", str(teacher_seed), *dense_subset]  # fmt: skip
                seconds = round(run_cli(args, threads, root.with_suffix(".log")), 1)
            else:
                seconds = None
        return root / "model.pt", {"teacher": str(root / "model.pt"), "seconds": seconds, **curve(root / "metrics.csv")}

    def prepare_seed(self, setting: DataSetting, seed: int, threads: int) -> tuple[Path, int]:
        """The teacher of ``seed`` (trained if needed), its dense and training-free cells; (checkpoint, MACs)."""
        with self._seed_locks[(setting.name, seed)]:  # the first task of a seed prepares it, the others wait
            dense_ckpt, provenance = self.teacher(setting, seed, threads)
            if not self.done(setting, seed, "dense"):
                cell, _ = self.score(setting, dense_ckpt, None)
                self.record(setting, seed, "dense", {**cell, **provenance, "shared_teacher": setting.shared_teacher})
            dense_macs = self.results["cells"][self.key(setting, seed, "dense")]["macs"]
            if not self.done(setting, seed, "evit-free"):
                cell, model = self.score(setting, dense_ckpt, "evit")
                reduction = 100 * (1 - cell["macs"] / dense_macs)
                kept = gathered_fractions(model, model.patch_embed.num_patches)
                self.record(setting, seed, "evit-free", {**cell, "train_kept": kept, "flops_reduction_pct": reduction})
        return dense_ckpt, dense_macs

    def cell(self, setting: DataSetting, seed: int, variant: str | None, threads: int) -> None:
        """One task of the pool: prepare the seed, then fine-tune and score ``variant`` (None: only prepare)."""
        if all(self.done(setting, seed, v) for v in ("dense", "evit-free", *([variant] if variant else []))):
            return
        dense_ckpt, dense_macs = self.prepare_seed(setting, seed, threads)
        if variant is None or self.done(setting, seed, variant):
            return
        method, extra, _ = {**MAIN, **ABLATIONS}[variant]
        root = self.args.out / setting.name / f"seed{seed}"
        plan = sp.PruningPlan(LOCATIONS, KEEP, method=method, model=setting.model)
        plan_file = plan.save(root / f"{variant}.yaml")
        if "--latency-weight" in extra:
            extra = [*extra, "--target-ms", str(self.latency_target(setting, plan)), "--tables",
                     str(self.args.out / "tables")]  # fmt: skip
        out = root / variant
        claim_run_dir(out, {"setting": asdict(setting), "seed": seed, "variant": variant, "method": method,
                            "extra": extra, "teacher_sha256": shipped_sha256(setting)})  # fmt: skip
        tune_subset = ["--train-subset", str(setting.finetune_subset)] if setting.finetune_subset else []
        seconds = run_cli(["finetune", "--plan", str(plan_file), "--checkpoint", str(dense_ckpt), "--out", str(out),
                           "--epochs", str(setting.finetune_epochs), "--data", setting.data, "--seed", str(seed),
                           *tune_subset, *extra], threads, root / f"{variant}.log")  # fmt: skip
        scored, model = self.score(setting, out / "model.pt", method)
        stats = curve(out / "metrics.csv")
        if stats["train_kept"] is None:
            stats["train_kept"] = gathered_fractions(model, model.patch_embed.num_patches)
        reduction = 100 * (1 - scored["macs"] / dense_macs)
        self.record(setting, seed, variant,
                    {**scored, **stats, "seconds": round(seconds, 1), "flops_reduction_pct": reduction})  # fmt: skip

    _latency_lock = threading.Lock()
    _teacher_lock = threading.Lock()

    def latency_target(self, setting: DataSetting, plan: sp.PruningPlan) -> float:
        """90% of the plan's predicted latency on this host: the loss then has something to push."""
        from spvit_search.devices import DeviceRegistry
        from spvit_search.predictor import PlanLatency
        from spvit_search.profile import profile_model

        tables = self.args.out / "tables"
        with self._latency_lock:
            device = DeviceRegistry.load(None).get("local")
            profile_model(device, setting.model, root=tables, progress=False)
            model = build_model(setting.model)
            predicted = PlanLatency.for_device(device, model, setting.model, root=tables).predict(plan).total_ms
        return round(0.9 * predicted, 4)

    def run(self) -> None:
        """Every cell as one task of a pool of ``--jobs`` workers, seeds interleaved.

        Tasks are ordered variant by variant across the seeds (the seeds' teachers first), so
        the workers start on different seeds' teachers and no worker idles at the end while the
        last seed's cells run one after another.
        """
        variants = list(MAIN) if "main" in self.args.suite else []
        tasks = []
        for name in self.args.data:
            setting = SETTINGS[name]
            chosen = variants + (list(ABLATIONS) if "ablations" in self.args.suite and name in self.args.ablation_data
                                 else [])  # fmt: skip
            for variant in [None, *chosen]:
                tasks += [(setting, seed, variant) for seed in self.args.seeds]
            self._seed_locks.update({(name, seed): threading.Lock() for seed in self.args.seeds})
        threads = self.args.threads or max(1, (os.cpu_count() or 2) // self.args.jobs)
        with ThreadPoolExecutor(self.args.jobs) as pool:
            for future in [pool.submit(self.cell, setting, seed, variant, threads) for setting, seed, variant in tasks]:
                future.result()


def is_current(data: str, cell: dict) -> bool:
    """Whether ``cell`` was made with today's setting and shipped teacher (others are rerun, not shown)."""
    setting = SETTINGS.get(data)
    return (setting is not None and cell.get("setting") == asdict(setting)
            and cell.get("teacher_sha256") == shipped_sha256(setting))  # fmt: skip


def summarise(results: dict, seeds: list[int]) -> list[dict]:
    """Mean ± sd over the seeds of every (data set, variant) that has all of them."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for key, cell in results["cells"].items():
        data, seed, variant = key.split("/")
        if int(seed.removeprefix("seed")) in seeds and is_current(data, cell):
            groups.setdefault((data, variant), []).append(cell)
    rows = []
    for (data, variant), cells in sorted(groups.items()):
        untrained = variant in ("dense", "evit-free")  # scored, not fine-tuned
        if untrained and all(c["setting"].get("shared_teacher") for c in cells):
            cells = cells[:1]  # one model, scored once
        top1 = [c["test_top1"] for c in cells]
        kept = [c["train_kept"] for c in cells if c.get("train_kept")]
        rows.append({
            "data": data, "variant": variant, "seeds": len(cells),
            "test_top1_mean": round(statistics.mean(top1), 2),
            "test_top1_sd": round(statistics.stdev(top1), 2) if len(top1) > 1 else None,
            "flops_reduction_pct": round(statistics.mean(c.get("flops_reduction_pct", 0.0) for c in cells), 1),
            "train_kept_mean": [round(statistics.mean(k[i] for k in kept), 4) for i in range(len(kept[0]))]
            if kept else None,
            "max_drop_after_warmup": None if untrained
            else max(0.0, *(c.get("max_drop_after_warmup", 0.0) for c in cells)),
        })  # fmt: skip
    return rows


def print_table(rows: list[dict], markdown: bool = False) -> None:
    head = ("data", "variant", "seeds", "test top-1", "FLOPs -", "train kept", "max drop")
    if markdown:
        print("| " + " | ".join(head) + " |\n|---|---|---:|---:|---:|---:|---:|")
    else:
        print(f"{head[0]:8} {head[1]:16} {head[2]:>5} {head[3]:>16} {head[4]:>8} {head[5]:>14} {head[6]:>8}")
    for r in rows:
        sd = f" ± {r['test_top1_sd']:.2f}" if r["test_top1_sd"] is not None else ""
        kept = "/".join(f"{k:.3f}" for k in r["train_kept_mean"]) if r["train_kept_mean"] else "—"
        drop = f"{r['max_drop_after_warmup']:.2f}" if r["max_drop_after_warmup"] is not None else "—"
        if markdown:
            cells = (r["data"], f"`{r['variant']}`", str(r["seeds"]), f"{r['test_top1_mean']:.2f}%{sd}",
                     f"{r['flops_reduction_pct']:.1f}%", kept, drop)  # fmt: skip
            print("| " + " | ".join(cells) + " |")
        else:
            print(f"{r['data']:8} {r['variant']:16} {r['seeds']:5d} {r['test_top1_mean']:9.2f}%{sd:7} "
                  f"{r['flops_reduction_pct']:7.1f}% {kept:>14} {drop:>8}")  # fmt: skip


def plot_curves(results: dict, seeds: list[int], path: Path) -> Path | None:
    """Calibration top-1 per epoch of every fine-tune, mean over seeds with its range shaded: the
    picture of 'no collapse' (one panel per data set)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, dict[str, list[list[float]]]] = {}
    for key, cell in results["cells"].items():
        data, seed, variant = key.split("/")
        current = is_current(data, cell) and int(seed.removeprefix("seed")) in seeds
        if variant != "dense" and cell.get("calib_curve") and current:
            curves.setdefault(data, {}).setdefault(variant, []).append(cell["calib_curve"])
    if not curves:
        return None
    names = sorted({v for variants in curves.values() for v in variants})
    colour = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(names)}  # one colour per variant, all panels
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for ax, (data, variants) in zip(axes[0], sorted(curves.items()), strict=True):
        for variant, runs in sorted(variants.items()):
            epochs = range(1, min(len(r) for r in runs) + 1)
            cols = [[r[e - 1] for r in runs] for e in epochs]
            mean = [statistics.mean(c) for c in cols]
            ax.plot(epochs, mean, marker="o", ms=3, color=colour[variant], label=f"{variant} ({len(runs)} seeds)")
            ax.fill_between(epochs, [min(c) for c in cols], [max(c) for c in cols], alpha=0.15, color=colour[variant])
        ax.set(title=f"{data}: fine-tune at keep {KEEP} before {LOCATIONS}", xlabel="epoch",
               ylabel="calibration top-1 (%)")  # fmt: skip
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="digits,fashion", type=lambda s: s.split(","))
    ap.add_argument("--seeds", default="0,1,2", type=lambda s: [int(v) for v in s.split(",")])
    ap.add_argument("--suite", default="main,ablations", type=lambda s: s.split(","))
    ap.add_argument("--ablation-data", default="fashion", type=lambda s: s.split(","))
    ap.add_argument("--jobs", type=int, default=1, help="seed pipelines run at once (threads split between them)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of each run (default: cores / jobs)")
    ap.add_argument("--out", type=Path, default=Path("runs/accuracy"))
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "accuracy.json")
    ap.add_argument(
        "--finetune-subset",
        type=int,
        default=None,
        help="fine-tune on this many training images instead of the setting's (with its own --results)",
    )
    ap.add_argument("--summary-only", action="store_true", help="print the table of the results file and stop")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown (as in the README)")
    args = ap.parse_args(argv)
    unknown = [d for d in args.data if d not in SETTINGS]
    if unknown:
        ap.error(f"unknown data {unknown}; choose from {sorted(SETTINGS)}")
    if args.finetune_subset is not None:  # recorded in every cell's setting: other cells are not reused
        for name in args.data:
            SETTINGS[name] = replace(SETTINGS[name], finetune_subset=args.finetune_subset)
    bench = Bench(args)
    started = time.perf_counter()
    if not args.summary_only:
        bench.run()
    seconds = None if args.summary_only else round(time.perf_counter() - started, 1)

    def finish(results: dict) -> None:
        results["plan"] = {"locations": list(LOCATIONS), "keep": list(KEEP)}
        results["summary"] = summarise(results, args.seeds)
        if seconds is not None:
            results["last_run_seconds"] = seconds

    bench.update(finish)
    plot_curves(bench.results, args.seeds, args.results.with_suffix(".png"))
    print_table(bench.results["summary"], args.markdown)
    return bench.results


if __name__ == "__main__":
    main()
