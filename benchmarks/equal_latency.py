"""Accuracy at equal *measured* latency on a device: every contender under the same three budgets.

On Fashion-MNIST with the shipped dense teacher (``benchmarks/checkpoints/vit_demo_fashion.pt``), or
with ``--model pit_demo_fashion`` / ``swin_demo_fashion`` and a teacher trained here first
(``--teacher-epochs`` on ``--teacher-subset`` images, seed 0, kept in ``OUT/teacher``; resumable).
Each family brings its own contenders (``--contenders`` defaults to them): PiT evit, hard, spvit;
Swin its training-free ``norm`` and ``spvit`` (the smaller dense model is built for flat ViTs
only):

1. tables: the device's latency table of ``vit_demo_fashion`` (every method's parts), calibrated;
   the dense model is measured and the targets are shares of it (``--targets``, default
   55/70/85%; fixed at the first run and kept in the results, so a resumed run aims the same);
2. plans: ``optimize`` for each method and target (``evit`` and ``tome`` scored by themselves,
   ``spvit`` and ``hard`` placed by the EViT proxy with their own latency), every method at the
   target's share of the dense model's *predicted* latency under the one table of step 1 (no
   per-method device check: step 4 measures everything together), and ``shrink`` for the
   smaller dense model (every depth measured, the deepest within the target). With ``--budget
   flops`` the targets are shares of the dense model's FLOPs instead (``optimize --target-flops``):
   plans no host's speed moves, for claims stated in FLOPs; still measured in step 4;
3. training, the same budget for every contender and seed (``--epochs`` on ``--finetune-subset``
   images, the teacher's logits and tokens distilled): ``finetune`` for evit, tome, hard, spvit
   and spvit with the latency-aware loss (target 90% of its plan's prediction: with exact token
   counts it can only shape the selector's scores), learned selectors trained from the first
   step with the teacher's class-attention hint (``SELECTOR_WARMUP``, ``SELECTOR_HINT``),
   ``train --teacher`` for the smaller model;
4. every model exported to ONNX and measured end to end, all files interleaved in one session
   with the dense model (nothing else runs meanwhile); top-1 on the test split.

No choice is made on the test split: plans are ranked on the calibration split, models are the
last epoch. Each cell is written as it finishes (``OUT/cells/…json`` and ``--results``); a rerun
skips what is done. The same harness runs on any device of ``devices.yaml`` (``--device``).

    python benchmarks/equal_latency.py [--device local] [--budget latency|flops] [--seeds 0,1,2] [--jobs 2] [--epochs 2]
        [--finetune-subset 3000] [--trials 150] [--out runs/equal-latency]
        [--results benchmarks/results/equal_latency.json] [--summary-only --markdown]
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from accuracy import SETTINGS as DATA_SETTINGS
from accuracy import SHIPPED_TEACHERS, claim_run_dir, curve, log, run_cli, shipped_sha256

import spvit_search as sp
from spvit_search.data import build_dataset
from spvit_search.devices import DeviceRegistry
from spvit_search.models import build_model
from spvit_search.plan import PROFILED_BY_DEFAULT
from spvit_search.train import evaluate

DATA = "fashion"
# contender -> (plan it uses, what it is); plan "depth" is the smaller dense model
CONTENDERS = {
    "smaller": ("depth", "dense with fewer blocks (the teacher's, evenly spaced), distilled"),
    "evit-free": ("evit", "EViT training-free: class-attention top-k + fused token"),
    "evit": ("evit", "EViT fine-tuned"),
    "tome-free": ("tome", "ToMe training-free: bipartite merging, proportional attention"),
    "tome": ("tome", "ToMe fine-tuned"),
    "hard": ("hard", "learned selector, pruned tokens dropped (DynamicViT-like)"),
    "spvit": ("spvit", "learned selector + package token (SPViT)"),
    "spvit-latency": ("spvit", "spvit + latency-aware loss"),
    "norm-free": ("norm", "training-free: windows ranked by mean token norm (SparseViT's importance; Swin)"),
    "norm": ("norm", "norm ranking, fine-tuned (Swin)"),
}
#: selector locations searched per plan: on swin_demo (5 blocks that can prune, in two grids) three
#: multi-head selectors cost 15% of the dense model and no spvit plan reached 70% (fastest 0.85 ms
#: against 0.81); one per grid leaves room for the windows to be pruned
FAMILY_STAGES = {"vit": 3, "pit": 3, "swin": 2}
#: contenders of each family: methods it supports ("depth": the smaller dense model, flat ViTs only)
FAMILY_CONTENDERS = {
    "vit": [c for c in CONTENDERS if not c.startswith("norm")],
    "pit": ["evit-free", "evit", "hard", "spvit", "spvit-latency"],
    "swin": ["norm-free", "norm", "spvit", "spvit-latency"],
}


# Epochs that train only the selectors before the backbone joins (finetune's default is 1). In a
# 2-epoch budget that leaves the backbone one decaying epoch; on the calibration split (seed 0,
# the 55% plan) spvit reached 77.00% with 0 against 74.50% with 1, so learned selectors start
# together with the backbone here.
SELECTOR_WARMUP = 0
# Weight of finetune's --selector-hint for learned selectors (the teacher's class-attention top-k
# as each selector's target). Chosen on the calibration split at the 55% plans: spvit 70.95 /
# 74.00 / 71.90% without it against 74.95 / 75.70 / 77.15% with 10 (seeds 0, 1, 2), hard 67.25
# against 72.90% (seed 0). A fresh selector otherwise ends 92 steps with nearly flat keep
# probabilities (std 0.006; its top-k overlaps the teacher's ranking by 0.53, chance 0.41).
SELECTOR_HINT = 10.0


#: what a target is a share of (--budget): the dense model's latency as the table predicts it, or its
#: FLOPs. FLOPs plans are the same on every host and day; they are measured with the rest all the same
PLANNING = {"latency": "share of the predicted dense latency", "flops": "share of the dense model's FLOPs"}


def dense_plan(model: torch.nn.Module, model_name: str | None = None) -> sp.PruningPlan:
    """Keep 1 at the family's default location with its training-free method: nothing acts, so the
    pruned model equals the dense one (on Swin with the exact-zero shift masks of pruned plans)."""
    family = sp.pruning.family_for(model)
    return sp.PruningPlan(locations=family.default_locations(model, 1), keep=(1.0,), model=model_name,
                          method=family.training_free)  # fmt: skip


class Results:
    """The results file: written after every cell (atomically), read back on a rerun."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}
        self.data.setdefault("cells", {})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.tables = self.out / "tables"
        self.device = DeviceRegistry.load(args.devices).get(args.device)
        self.results = Results(args.results)
        self.model = args.model
        self.family = family_of(args.model)
        shipped = args.model == DATA_SETTINGS[DATA].model
        self.teacher = SHIPPED_TEACHERS[DATA] if shipped else self.out / "teacher" / "model.pt"
        teacher = ({"teacher_sha256": shipped_sha256(DATA_SETTINGS[DATA])} if shipped else
                   {"teacher_epochs": args.teacher_epochs, "teacher_subset": args.teacher_subset})  # fmt: skip
        self.stages = args.stages or FAMILY_STAGES[self.family.name]
        extra = {} if shipped else {"model": args.model, "stages": self.stages}
        self.setting = {**extra, "epochs": args.epochs,
                        "finetune_subset": args.finetune_subset, "trials": args.trials, "search_locations": True,
                        "selector_warmup": SELECTOR_WARMUP, "selector_hint": SELECTOR_HINT,
                        "planning": PLANNING[args.budget], "device": args.device,
                        **teacher}  # fmt: skip
        if self.results.data.get("setting") not in (None, self.setting):
            raise SystemExit(f"{args.results} holds a run with other settings {self.results.data['setting']}; "
                             "give another --results (and --out)")  # fmt: skip
        self.results.data["setting"] = self.setting
        self._test = None
        self._lock = threading.Lock()  # the pool's threads record cells into one results file

    # -- 1. teacher, tables, dense latency, targets -------------------------------------------
    def train_teacher(self) -> None:
        """A dense teacher for a model that ships none: seed 0, recorded in the settings, resumable."""
        out = self.teacher.parent
        args = ["train", "--model", self.model, "--data", DATA, "--epochs", str(self.args.teacher_epochs),
                "--warmup-epochs", "1", "--lr", "2e-3", "--seed", "0", "--out", str(out),
                "--train-subset", str(self.args.teacher_subset)]  # fmt: skip
        done = (out / "model.pt").exists() and (out / "metrics.csv").exists()
        if done and len((out / "metrics.csv").read_text().strip().splitlines()) - 1 >= self.args.teacher_epochs:
            if "teacher" in self.results.data:
                return
        else:
            run_cli(args, os.cpu_count() or 2, out.with_suffix(".log"))
        with (out / "metrics.csv").open() as fh:
            seconds = sum(float(r["seconds"]) for r in csv.DictReader(fh))
        self.results.data["teacher"] = {"command": "spvit-search " + " ".join(args), "seconds": round(seconds, 1),
                                        **curve(out / "metrics.csv")}  # fmt: skip
        self.results.save()

    def dense_model(self) -> torch.nn.Module:
        """The teacher as every pruned model runs it: patched with nothing acting (identical on ViT
        and PiT; on Swin, the exact-zero shift masks of its pruned plans: README, Swin)."""
        model = build_model(self.model, self.teacher).eval()
        return sp.prune(model, dense_plan(model))

    def prepare(self) -> None:
        from profilers import MeasureSettings
        from spvit_search.measure import calibrate, measure_models
        from spvit_search.profile import profile_model

        if self.teacher != SHIPPED_TEACHERS.get(DATA):
            self.train_teacher()

        # the calibration measures plans of the default methods: their parts are always profiled
        wanted = {CONTENDERS[c][0] for c in self.args.contenders} - {"depth"}
        methods = tuple(sorted(wanted | set(PROFILED_BY_DEFAULT)))
        profile_model(self.device, self.model, root=self.tables, methods=methods,
                      rounds=self.args.profile_rounds, progress=False)  # fmt: skip
        d = self.device
        meta = self.tables / d.name / f"{d.runtime}-t{d.threads}-b{d.batch}.meta.json"
        if self.model not in json.loads(meta.read_text()).get("calibration", {}):
            calibrate(self.device, self.model, self.tables, 5, MeasureSettings(rounds=8, runs=5), str(self.teacher))
        if "targets" not in self.results.data and self.args.budget == "flops":
            self.results.data["budget"] = "flops"
            self.results.data["targets"] = {f"{r:g}": r for r in self.args.targets}
            self.results.save()
        if "targets" not in self.results.data:
            dense = self.dense_model()
            timing, _ = measure_models(self.device, {"dense": dense}, MeasureSettings(rounds=10, runs=10))
            dense_ms = timing["dense"].median_ms
            self.results.data["dense_ms_at_start"] = dense_ms
            self.results.data["targets"] = {f"{r:g}": round(r * dense_ms, 4) for r in self.args.targets}
            self.results.save()
        log(f"targets (ms): {self.results.data['targets']}")

    # -- 2. plans -----------------------------------------------------------------------------
    def plans(self) -> None:
        from profilers import MeasureSettings
        from spvit_search.optimize import OptimizeSettings, optimize
        from spvit_search.search import SearchError
        from spvit_search.smaller import measure_depths, pick_depth, save_shallower, shallower

        plans = self.results.data.setdefault("plans", {})
        for ratio in self.results.data["targets"]:
            for method in sorted({CONTENDERS[c][0] for c in self.args.contenders} - {"depth"}):
                key = f"{ratio}/{method}"
                if key in plans:
                    continue
                # locations searched too: on a model this small a block's fixed cost is a large part
                # of its time, so tight targets need pruning from the second block on
                # Every method is placed in one frame: the share of the dense model's latency predicted
                # by the one table and calibration of step 1, with no per-method check on the device.
                # This host's speed swings by 10-20% within minutes, so checking candidates against a
                # dense model measured beside them gave each method its own random budget (1.76 to
                # 2.02 ms for 55% within two minutes); the final step measures every model together.
                flops = self.args.budget == "flops"
                settings = OptimizeSettings(target_ms=None, target_share=None if flops else float(ratio),
                                            target_flops=float(ratio) if flops else None, checkpoint=str(self.teacher),
                                            data=DATA, methods=(method,), search_locations=True,
                                            proxy=self.family.training_free, stages=self.stages,
                                            trials=self.args.trials, tables=str(self.tables), verify_top=0,
                                            progress=False)  # fmt: skip
                path = self.plan_file(ratio, method)
                started = time.perf_counter()
                try:
                    result = optimize(self.model, self.device, settings, path)
                except SearchError as err:  # a method whose fastest plan misses the budget has no cell here
                    plans[key] = {"infeasible": str(err)}
                    log(f"plan {key}: infeasible: {err}")
                    self.results.save()
                    continue
                plans[key] = {
                    "plan": result.plan.to_dict(),
                    "calib_top1": result.accuracy,
                    "scored_by": result.proxy or method,
                    "budget_ms": result.plan.target_ms,
                    "flops_share": result.flops_share,
                    "seconds": round(time.perf_counter() - started),
                }
                budget = (f"{ratio} of the dense model's FLOPs; the plan's {result.flops_share:.3f}" if flops else
                          f"{result.plan.target_ms:g} ms: {ratio} of the dense model's predicted latency")  # fmt: skip
                log(f"plan {key}: keep {list(result.plan.keep)} at {list(result.plan.locations)}, predicted "
                    f"{result.predicted_ms:.3f} ms (budget {budget})")  # fmt: skip
                self.results.save()
        wanted = "smaller" in self.args.contenders
        if wanted and not all(f"{r}/depth" in plans for r in self.results.data["targets"]):
            depths = measure_depths(self.device, self.model, self.teacher, MeasureSettings(rounds=8, runs=10))
            self.results.data["depths"] = [c.as_dict() for c in depths]
            dense_ms = max(depths, key=lambda c: c.depth).measured_ms  # the full depth, measured with the rest
            for ratio in self.results.data["targets"]:
                chosen = pick_depth(depths, float(ratio) * dense_ms)
                model, blocks = shallower(self.model, self.teacher, chosen.depth)
                path = save_shallower(model, self.out / "plans" / ratio / "smaller.pt")
                plans[f"{ratio}/depth"] = {"depth": chosen.depth, "blocks": list(blocks), "checkpoint": str(path),
                                           "measured_ms": chosen.measured_ms}  # fmt: skip
            self.results.save()

    def feasible(self, ratio: str, contender: str) -> bool:
        """False where the contender's method has no plan within the budget (recorded as infeasible)."""
        return "infeasible" not in self.results.data["plans"].get(f"{ratio}/{CONTENDERS[contender][0]}", {})

    def write_plan_files(self) -> None:
        """Every plan as the file its fine-tunes read (written once, before the pool starts)."""
        for key, entry in self.results.data["plans"].items():
            if "plan" in entry:
                ratio, method = key.split("/")
                self.plan_of(ratio, method).save(self.plan_file(ratio, method))

    def plan_file(self, ratio: str, method: str) -> Path:
        return self.out / "plans" / ratio / f"{method}.yaml"

    def plan_of(self, ratio: str, method: str) -> sp.PruningPlan:
        """The plan as models are built with it: stages that keep what the one before kept *on
        the same grid* do nothing, and ``finetune`` trains no selector there (its checkpoint has
        none). The model is given: read as one grid, a PiT plan lost its later grids' stages."""
        plan = sp.PruningPlan.from_dict(self.results.data["plans"][f"{ratio}/{method}"]["plan"])
        return plan.without_idle_stages(self.layout_model)

    @functools.cached_property
    def layout_model(self) -> torch.nn.Module:
        """An untrained copy of the model: its token grids, for plan arithmetic."""
        return build_model(self.model)

    # -- 3. training --------------------------------------------------------------------------
    def key(self, ratio: str, seed: int | None, contender: str) -> str:
        return f"{ratio}/{'shared' if seed is None else f'seed{seed}'}/{contender}"

    def cell_args(self, ratio: str, seed: int, contender: str, out: Path) -> list[str]:
        budget = ["--epochs", str(self.args.epochs), "--data", DATA, "--seed", str(seed), "--out", str(out),
                  "--train-subset", str(self.args.finetune_subset)]  # fmt: skip
        if contender == "smaller":
            small = self.results.data["plans"][f"{ratio}/depth"]["checkpoint"]
            return ["train", "--model", self.model, "--checkpoint", small, "--teacher", str(self.teacher),
                    "--lr", "2e-4", "--warmup-epochs", "1", *budget]  # fmt: skip
        method = CONTENDERS[contender][0]
        plan, plan_file = self.plan_of(ratio, method), self.plan_file(ratio, method)
        extra = []
        if contender == "spvit-latency":
            extra = ["--latency-weight", "1.0", "--target-ms", str(round(0.9 * plan.predicted_ms, 4)), "--tables",
                     str(self.tables), "--latency-device", self.device.name]  # fmt: skip
        if plan.spec.learned_selector:  # chosen on the calibration split: see SELECTOR_WARMUP, SELECTOR_HINT
            extra += ["--selector-warmup", str(SELECTOR_WARMUP)]
            if self.family.training_free == "evit":  # the hint reads class attention: none on Swin
                extra += ["--selector-hint", str(SELECTOR_HINT)]
        return ["finetune", "--plan", str(plan_file), "--checkpoint", str(self.teacher), *budget, *extra]

    def train_cell(self, ratio: str, seed: int, contender: str, threads: int) -> None:
        key = self.key(ratio, seed, contender)
        if key in self.results.data["cells"]:
            return
        out = self.out / "runs" / key
        args = self.cell_args(ratio, seed, contender, out)
        claim_run_dir(out, {"args": args, "setting": self.setting})
        seconds = run_cli(args, threads, out.with_suffix(".log"))
        self.record(
            key, ratio, contender, out / "model.pt", {"seconds": round(seconds, 1), **curve(out / "metrics.csv")}
        )

    def record(self, key: str, ratio: str, contender: str, checkpoint: Path, extra: dict) -> None:
        model, plan = self.model_of(ratio, contender, checkpoint)
        with self._lock:
            if self._test is None:
                self._test = build_dataset(DATA, "test", model)
        top1 = evaluate(model, self._test, torch.device("cpu"))[0]
        cell = {"contender": contender, "ratio": ratio, "checkpoint": str(checkpoint), "test_top1": top1,
                "gmacs": sp.count_flops(model).gmacs, "plan": None if plan is None else plan.to_dict(),
                "predicted_ms": self.predicted(model, plan), **extra}  # fmt: skip
        with self._lock:
            self.results.data["cells"][key] = cell
            self.results.save()
        log(f"{key}: test top-1 {top1:.2f}%")

    def model_of(self, ratio: str, contender: str, checkpoint: Path):
        method = CONTENDERS[contender][0]
        if method == "depth":
            return build_model(self.model, checkpoint).eval(), None
        plan = self.plan_of(ratio, method)
        return build_model(self.model, checkpoint, plan).eval(), plan

    def predicted(self, model: torch.nn.Module, plan: sp.PruningPlan | None) -> float:
        from spvit_search.predictor import PlanLatency

        methods = () if plan is None else (plan.method,)
        shape = build_model(self.model, None) if plan is not None else model
        latency = PlanLatency.for_device(self.device, shape, self.model, root=self.tables, methods=methods)
        depth = sp.pruning.family_for(shape).depth(shape)
        dense = sp.PruningPlan(locations=(depth - 1,), keep=(1.0,), model=self.model, method=self.family.training_free)
        return round(latency.predict(plan or dense).total_ms, 4)

    # -- 4. measurement -----------------------------------------------------------------------
    def measure(self) -> None:
        """Export every cell and the dense model; measure all files interleaved, in one session."""
        from profilers import MeasureSettings
        from spvit_search.export import export_onnx
        from spvit_search.measure import measure_models

        cells = self.results.data["cells"]
        files = {"dense": export_onnx(self.dense_model(), self.out / "onnx" / "dense.onnx")}
        for key, cell in cells.items():
            model, _ = self.model_of(cell["ratio"], cell["contender"], Path(cell["checkpoint"]))
            files[key] = export_onnx(model, self.out / "onnx" / (key.replace("/", "_") + ".onnx"))
        log(f"measuring {len(files)} ONNX files interleaved on {self.device.name}")
        timings, version = measure_models(self.device, files, MeasureSettings(rounds=self.args.rounds, runs=10))
        for key, cell in cells.items():
            cell["measured_ms"] = round(timings[key].median_ms, 4)
        self.results.data["measurement"] = {"dense_ms": round(timings["dense"].median_ms, 4), "runtime": version,
                                            "files": len(files), "at": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
        self.results.save()

    def check_artifacts(self) -> None:
        """Refuse a results file whose checkpoints are not on this machine: a committed record read
        in a fresh clone. Resuming it would train a new teacher, keep targets set on another day's
        host, and fail only at the end, loading checkpoints that are not here."""
        missing = {k: c["checkpoint"] for k, c in self.results.data["cells"].items()
                   if not Path(c["checkpoint"]).exists()}  # fmt: skip
        if missing:
            key, path = next(iter(missing.items()))
            raise SystemExit(
                f"{self.args.results} records {len(missing)} cells whose checkpoints are not here (e.g. {key}: "
                f"{path}): it is the record of another run. Run afresh with a new --results and --out, or print "
                "it with --summary-only"
            )

    def run(self) -> None:
        started = time.perf_counter()
        self.check_artifacts()
        self.prepare()
        self.plans()
        for ratio in self.results.data["targets"]:
            for contender in [c for c in self.args.contenders if c.endswith("-free") and self.feasible(ratio, c)]:
                key = self.key(ratio, None, contender)
                if key not in self.results.data["cells"]:
                    self.record(key, ratio, contender, self.teacher, {})
        self.write_plan_files()
        tasks = [(r, s, c) for s in self.args.seeds for r in self.results.data["targets"]
                 for c in self.args.contenders if not c.endswith("-free") and self.feasible(r, c)]  # fmt: skip
        threads = self.args.threads or max(1, (os.cpu_count() or 2) // self.args.jobs)
        with ThreadPoolExecutor(self.args.jobs) as pool:
            for future in [pool.submit(self.train_cell, r, s, c, threads) for r, s, c in tasks]:
                future.result()
        self.measure()
        self.results.data["last_run_seconds"] = round(time.perf_counter() - started)
        self.results.save()


def family_of(model_name: str):
    return sp.pruning.family_for(build_model(model_name))


def summarise(data: dict, seeds: list[int]) -> list[dict]:
    """Mean ± sd over seeds per (target, contender); latency as a share of the dense model's."""
    dense_ms = data.get("measurement", {}).get("dense_ms")
    groups: dict[tuple[str, str], list[dict]] = {}
    for key, cell in data["cells"].items():
        ratio, seed, contender = key.split("/")
        if seed == "shared" or int(seed.removeprefix("seed")) in seeds:
            groups.setdefault((ratio, contender), []).append(cell)
    rows = []
    for (ratio, contender), cells in sorted(groups.items(), key=lambda g: (g[0][0], list(CONTENDERS).index(g[0][1]))):
        top1 = [c["test_top1"] for c in cells]
        measured = [c["measured_ms"] for c in cells if c.get("measured_ms") is not None]
        rows.append({
            "target": ratio, "target_ms": data["targets"][ratio], "contender": contender, "n": len(cells),
            "top1_mean": round(statistics.mean(top1), 2),
            "top1_sd": round(statistics.stdev(top1), 2) if len(top1) > 1 else None,
            "measured_ms": round(statistics.median(measured), 3) if measured else None,
            "measured_share": round(statistics.median(measured) / dense_ms, 3) if measured and dense_ms else None,
            "predicted_ms": round(statistics.mean(c["predicted_ms"] for c in cells), 3),
            "gmacs": round(statistics.mean(c["gmacs"] for c in cells), 4),
            "plan": cells[0]["plan"],
        })  # fmt: skip
    return rows


def print_table(rows: list[dict], data: dict, markdown: bool) -> None:
    m = data.get("measurement", {})
    name = data.get("model", DATA_SETTINGS[DATA].model)
    print(f"dense {name}: measured {m.get('dense_ms')} ms ({m.get('runtime')}, {m.get('at')})")
    head = "| target | contender | seeds | test top-1 | measured ms (× dense) | predicted ms | GMACs | plan |"
    if markdown:
        print(head + "\n|---|---|---:|---:|---:|---:|---:|---|")
    for key, entry in data.get("plans", {}).items():
        if "infeasible" in entry:
            print(f"{key}: no plan within the budget ({entry['infeasible']})")
    for r in rows:
        sd = f" ± {r['top1_sd']:.2f}" if r["top1_sd"] is not None else ""
        share = f" ({r['measured_share']:.2f})" if r["measured_share"] else ""
        ms = f"{r['measured_ms']:.3f}{share}" if r["measured_ms"] else "—"
        plan = r["plan"]
        what = f"keep {plan['keep']} at {plan['locations']}" if plan else "fewer blocks"
        target = (f"{float(r['target']):.0%} FLOPs" if data.get("budget") == "flops" else
                  f"{float(r['target']):.0%} ({r['target_ms']:.3f} ms)")  # fmt: skip
        cols = (target, r["contender"], str(r["n"]),
                f"{r['top1_mean']:.2f}%{sd}", ms, f"{r['predicted_ms']:.3f}", f"{r['gmacs']:.4f}", what)  # fmt: skip
        print("| " + " | ".join(cols) + " |" if markdown else "  ".join(f"{c:>14}" for c in cols))


def plot(rows: list[dict], data: dict, path: Path) -> Path | None:
    """Test top-1 vs measured latency, one line per contender over the three targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense_ms = data.get("measurement", {}).get("dense_ms")
    if not dense_ms:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, contender in enumerate(CONTENDERS):
        pts = sorted((r["measured_ms"], r["top1_mean"], r["top1_sd"] or 0.0) for r in rows
                     if r["contender"] == contender and r["measured_ms"])  # fmt: skip
        if pts:
            style = "--" if contender.endswith("-free") else "-"
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], ls=style, marker="o",
                        ms=4, capsize=3, color=plt.get_cmap("tab10")(i), label=contender)  # fmt: skip
    dense = data.get("dense_top1")
    if dense is not None:
        ax.scatter([dense_ms], [dense], marker="*", s=150, color="k", zorder=5, label="dense teacher")
    for target in data["targets"].values() if data.get("budget") != "flops" else ():
        ax.axvline(target * dense_ms / data["dense_ms_at_start"], color="0.8", lw=0.8, ls=":", zorder=0)
    ax.set(xlabel=f"measured latency on {data['setting']['device']}, ms (ONNX, end to end)",
           ylabel="Fashion-MNIST test top-1 (%)", title="equal measured latency (dotted: the targets, rescaled "
           "to this session's dense)" if data.get("budget") != "flops" else "plans at equal FLOPs (one point per "
           "target), placed by their measured latency")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DATA_SETTINGS[DATA].model, help="a *_demo_fashion model of any family")
    ap.add_argument("--teacher-epochs", type=int, default=6, help="dense teacher's epochs (models that ship none)")
    ap.add_argument("--teacher-subset", type=int, default=12000, help="dense teacher's training images")
    ap.add_argument("--device", default="local")
    ap.add_argument("--devices", default=None, help="devices.yaml (default: the project's)")
    ap.add_argument("--targets", default="0.55,0.7,0.85", type=lambda s: [float(v) for v in s.split(",")])
    ap.add_argument("--budget", choices=sorted(PLANNING), default="latency",
                    help="what --targets are shares of: the dense model's predicted latency, or its FLOPs")  # fmt: skip
    ap.add_argument("--seeds", default="0,1,2", type=lambda s: [int(v) for v in s.split(",")])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--stages", type=int, default=None, help="selector locations per plan (default: the family's)")
    ap.add_argument("--finetune-subset", type=int, default=3000)
    ap.add_argument("--trials", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=8, help="measurement rounds (all files interleaved in each)")
    ap.add_argument("--profile-rounds", type=int, default=10, help="rounds of the latency table's profiling")
    ap.add_argument("--contenders", default=None, type=lambda s: s.split(","),
                    help=f"a subset of {','.join(CONTENDERS)} (default: the model family's)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="default: runs/equal-latency[-MODEL]")
    ap.add_argument("--results", type=Path, default=None,
                    help="default: benchmarks/results/equal_latency[_MODEL].json")  # fmt: skip
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    family = family_of(args.model)
    allowed = FAMILY_CONTENDERS[family.name]
    args.contenders = args.contenders or allowed
    unknown = [c for c in args.contenders if c not in CONTENDERS]
    if unknown:
        ap.error(f"unknown contender(s) {unknown}; choose from {allowed}")
    other = [c for c in args.contenders if c not in allowed]
    if other:
        ap.error(f"contender(s) {other} are not offered on {args.model} ({family.name}); choose from {allowed}")
    if args.budget == "flops" and "smaller" in args.contenders:
        ap.error("the smaller dense model is placed by measured latency: leave it out of a --budget flops run")
    suffix = "" if args.model == DATA_SETTINGS[DATA].model else f"_{args.model}"
    args.out = args.out or Path(f"runs/equal-latency{suffix.replace('_', '-')}")
    args.results = args.results or Path(__file__).parent / "results" / f"equal_latency{suffix}.json"
    harness = Harness(args)
    if not args.summary_only:
        harness.run()
    data = harness.results.data
    if args.model != DATA_SETTINGS[DATA].model:
        data["model"] = args.model
    if "dense_top1" not in data:
        dense = harness.dense_model()
        data["dense_top1"] = evaluate(dense, build_dataset(DATA, "test", dense), torch.device("cpu"))[0]
    data["summary"] = summarise(data, args.seeds)
    harness.results.save()
    plot(data["summary"], data, args.results.with_suffix(".png"))
    print_table(data["summary"], data, args.markdown)
    return data


if __name__ == "__main__":
    main()
