"""``spvit-search demo``: the whole method end to end on this host with the embedded data.

1. train the small dense ViT (``vit_demo_digits``) on the demo digits — the teacher;
2. profile its parts on the device and calibrate the table with whole-model runs;
3. measure the dense model; the target is a share of its latency (``target_ratio``), each
   candidate judged against the dense model measured beside it (or ``target_ms``, fixed);
4. ``optimize`` SPViT on the plain checkpoint, its plans scored by EViT (training-free) and judged by
   SPViT's own latency, to place the budget: keep ratios that fit it;
5. fine-tune SPViT (selectors + package token) at those ratios, distilled from the teacher;
6. ``optimize`` again with the trained selectors, verified on the device;
7. export ONNX, check it against torch on the test split, and measure it on the device.

Every step writes under ``out`` and is skipped or resumed when run again.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import build_dataset, num_classes
from .devices import DeviceConfig
from .evaluate import plan_key
from .export import export_onnx, verify_export
from .flops import count_flops
from .measure import calibrate, measure_models
from .models import build_model
from .optimize import OptimizeSettings, optimize, plot_trials
from .plan import PruningPlan
from .profile import profile_model
from .train import TrainConfig, evaluate, fit

MODEL = "vit_demo_digits"


@dataclass
class DemoSettings:
    out: Path = Path("runs/demo")
    #: 0.85, not 0.7 or 0.8: on a fast day this 6-block, 65-token model spends 0.24 of its 0.84 ms
    #: in the two blocks before any selector, and three MHTS selectors cost 0.1 ms. SPViT's plans
    #: then measure 10-18% over their predictions, and nothing fitted under 70% (fresh clone,
    #: 2026-12-01), nor under 80% once the drift check measured the day right (the same day: its
    #: candidates measured 0.86-0.94 of dense). On slow days 70% fitted (keep 0.35/0.23).
    target_ratio: float = 0.85
    target_ms: float | None = None
    dense_epochs: int = 50
    finetune_epochs: int = 30
    trials: int = 300
    progress: bool = True


def _say(text: str, progress: bool) -> None:
    if progress:
        print(f"\n== {text}", flush=True)


def run_demo(device: DeviceConfig, s: DemoSettings) -> dict:
    from profilers import MeasureSettings

    start = time.perf_counter()
    out = Path(s.out)
    tables = out / "tables"
    steps: dict[str, float] = {}

    def step(name: str, t0: float) -> None:
        steps[name] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    _say(f"1/7 train the dense {MODEL} on the demo digits", s.progress)
    torch.manual_seed(0)
    dense = build_model(MODEL, num_classes=num_classes("demo"))
    result = fit(dense, "demo", TrainConfig(epochs=s.dense_epochs, lr=2e-3, warmup_epochs=3.0), out / "dense",
                 model_name=MODEL, progress=s.progress)  # fmt: skip
    dense_ckpt = result.model_file
    step("train dense", t0)

    t0 = time.perf_counter()
    _say(f"2/7 profile {MODEL} on {device.name} and calibrate the table", s.progress)
    profile_model(device, MODEL, root=tables, progress=s.progress)
    meta = json.loads(
        (tables / device.name / f"{device.runtime}-t{device.threads}-b{device.batch}.meta.json").read_text()
    )
    if MODEL not in meta.get("calibration", {}):
        calibrate(device, MODEL, tables, 5, MeasureSettings(rounds=8, runs=5), str(dense_ckpt))
    step("profile + calibrate", t0)

    t0 = time.perf_counter()
    dense = build_model(MODEL, dense_ckpt).eval()
    timings, version = measure_models(device, {"dense": dense}, MeasureSettings(rounds=8, runs=10))
    dense_ms = timings["dense"].median_ms
    target = s.target_ms or round(dense_ms * s.target_ratio, 3)
    _say(f"3/7 dense model: {dense_ms:.3f} ms on {device.name} ({version}); target {target:g} ms", s.progress)
    step("measure dense", t0)

    def settings(**kw) -> OptimizeSettings:
        # A share, not step 3's ms: this host's speed drifts 10-20% within minutes, and the quick start
        # once failed when every candidate missed a target in ms set from a measurement minutes earlier.
        budget = {"target_ms": target} if s.target_ms else {"target_ms": None, "target_share": s.target_ratio}
        return OptimizeSettings(**budget, tables=str(tables), trials=s.trials, progress=s.progress, **kw)

    t0 = time.perf_counter()
    _say("4/7 place the budget: optimize SPViT's keep ratios, scored by EViT (training-free)", s.progress)
    # SPViT's own latency decides what fits (its selectors cost more than EViT's scorer): a plan
    # placed with EViT's latency left step 6 no SPViT plan under the budget at the same locations
    # (fresh clone, quiet host: candidates 0.60-0.61 ms against 0.564)
    evit_settings = settings(checkpoint=str(dense_ckpt), methods=("spvit",))
    evit = optimize(MODEL, device, evit_settings, out / "plan-evit.yaml")
    plot_trials(evit, evit_settings, out / "plan-evit.png", f"{MODEL} SPViT placed by EViT, target {target:g} ms")
    step("optimize (evit)", t0)

    t0 = time.perf_counter()
    start_plan = PruningPlan(locations=evit.plan.locations, keep=evit.plan.keep, method="spvit", model=MODEL)
    start_plan = start_plan.without_idle_stages(build_model(MODEL))  # the model: its grids
    start_plan.save(out / "plan-finetune.yaml")
    _say(f"5/7 fine-tune SPViT at keep={list(start_plan.keep)} before blocks {list(start_plan.locations)}", s.progress)
    torch.manual_seed(0)
    teacher = build_model(MODEL, dense_ckpt).eval()
    student = build_model(MODEL, dense_ckpt, start_plan)
    cfg = TrainConfig(epochs=s.finetune_epochs, lr=2e-4, selector_lr_scale=10.0, ratio_weight=50.0,
                      selector_warmup_epochs=1, warmup_epochs=1.0)  # fmt: skip
    run_dir = out / f"finetune-{hashlib.sha1(plan_key(start_plan).encode()).hexdigest()[:8]}"  # one per plan
    tuned = fit(student, "demo", cfg, run_dir, model_name=MODEL, plan=start_plan, teacher=teacher,
                progress=s.progress)  # fmt: skip
    step("fine-tune (spvit)", t0)

    t0 = time.perf_counter()
    _say("6/7 optimize again with the trained selectors, verified on the device", s.progress)
    final_settings = settings(checkpoint=str(tuned.model_file), methods=("spvit",))
    final = optimize(MODEL, device, final_settings, out / "plan.yaml")
    plot_trials(final, final_settings, out / "plan.png", f"{MODEL} SPViT fine-tuned, target {target:g} ms")
    step("optimize (spvit)", t0)

    t0 = time.perf_counter()
    _say("7/7 export ONNX, check it against torch, measure it", s.progress)
    pruned = build_model(MODEL, tuned.model_file, final.plan).eval()
    onnx_file = export_onnx(pruned, out / "model.onnx")
    agreement = verify_export(pruned, onnx_file, "demo")
    # the dense model beside the file, in one interleaved session: the two rows of the summary are
    # then comparable (sessions minutes apart differ by up to 5% here, and a model alone runs 2-9%
    # faster than interleaved with another)
    timings, _ = measure_models(device, {"onnx": onnx_file, "dense": dense}, MeasureSettings(rounds=8, runs=10))
    exported_ms, dense_beside_ms = timings["onnx"].median_ms, timings["dense"].median_ms
    step("export + measure", t0)

    test = build_dataset("demo", "test")
    cpu = torch.device("cpu")
    summary = {
        "device": device.name, "runtime": version, "threads": device.threads,
        "dense": {"test_top1": evaluate(dense, test, cpu)[0], "measured_ms": dense_beside_ms,
                  "measured_alone_ms": dense_ms, "gmacs": count_flops(dense).gmacs},
        "pruned": {"plan": final.plan.to_dict(), "test_top1": evaluate(pruned, test, cpu)[0],
                   "predicted_ms": final.predicted_ms, "measured_ms": final.measured_ms,
                   "exported_onnx_ms": exported_ms, "gmacs": count_flops(pruned).gmacs,
                   "onnx_same_top1": f"{agreement['agree']}/{agreement['images']}"},
        "placement": {"plan": evit.plan.to_dict(), "calib_top1": evit.accuracy, "scored_by": evit.proxy},
        # with a share: the budget the chosen plan was judged against (the dense model measured beside it)
        "target_ms": final.plan.target_ms or target, "seconds": round(time.perf_counter() - start, 1),
        "steps_seconds": steps,
        "files": {"plan": str(out / "plan.yaml"), "weights": str(tuned.model_file), "onnx": str(onnx_file),
                  "plots": [str(out / "plan-evit.png"), str(out / "plan.png"), str(run_dir / "curve.png")]},
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
