"""A percentile budget checked on the device: the per-image (adaptive) plan's file measured image by
image over calibration images, beside the unpruned model.

Why: the table predicts each image from the counts it keeps, but the file that runs them
computes the counts in its graph and runs dynamic shapes, and neither is in the table. On the
0.9 ms Fashion-MNIST model, for the plan a search chose on the table alone, the table's p50 was
0.73 of what 2,000 test images measured and its p95 0.54 (``benchmarks/percentile.py``,
2026-12-02). A fixed-count candidate is
measured with one generated input; an adaptive one needs real images, since its work depends on
them. The local device runs them in this process; the board runners and phone tools time one
generated input per file, so elsewhere the budget stays the table's (``optimize`` says so).

A round measures candidates, best first; one within the budget at the percentile is chosen.
After misses, every remaining candidate's prediction is scaled by the median measured/predicted
of the misses, and the best one that then fits is measured next.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import numpy as np

from .devices import DeviceConfig
from .search import rank_within_noise, trial_accuracy

ROUNDS = 3  # the first measures verify_top candidates, each later one the best that fits after correction


def can_measure_images(device: DeviceConfig) -> bool:
    return device.transport == "local" and device.runtime == "onnxruntime"


def verify_percentile(ranked: list, model_name: str, device: DeviceConfig, settings, adaptive, images: np.ndarray,
                      reference_model) -> tuple[list[dict], dict | None]:  # fmt: skip
    """Measure the best of ``ranked`` (``(trial, plan, predicted percentile ms)``, as
    :func:`~spvit_search.search.feasible_ranked` gives them) image by image over ``images``
    (float32, N × C × H × W) with ``reference_model`` (the unpruned model) alongside; returns every
    candidate measured and the chosen one (None: none fitted)."""
    from profilers import make_profiler

    from .export import export_onnx, export_onnx_adaptive
    from .models import build_model
    from .pruning import set_adaptive

    q, calib = settings.percentile, len(images)
    measured: dict[str, dict] = {}
    factor, budget = 1.0, settings.target_ms
    with tempfile.TemporaryDirectory(prefix="spvit-percentile-") as tmp:
        unpruned = export_onnx(reference_model, Path(tmp) / "unpruned.onnx")
        for round_ in range(ROUNDS):
            pool = [r for r in ranked if r[0].user_attrs["plan_key"] not in measured and r[2] * factor <= budget]
            batch = pool[: settings.verify_top if round_ == 0 else 1]
            if not batch:
                break
            files = {"unpruned": unpruned}
            for t, plan, _ in batch:
                model = build_model(model_name, settings.checkpoint, plan).eval()
                set_adaptive(model, adaptive)
                files[f"c{t.number}"] = export_onnx_adaptive(model, Path(tmp) / f"c{t.number}.onnx")
            with make_profiler(device) as profiler:
                ms = profiler.measure_images(files, images, repeats=settings.percentile_repeats)
            reference = float(np.median(ms["unpruned"]))
            budget = settings.target_ms if settings.target_share is None else settings.target_share * reference
            for t, plan, predicted in batch:
                per_image = ms[f"c{t.number}"]
                at_q = float(np.percentile(per_image, q))
                measured[t.user_attrs["plan_key"]] = {
                    "trial": t.number, "trial_obj": t, "plan": plan, "accuracy": trial_accuracy(t),
                    "predicted_ms": predicted, "measured_ms": at_q, "raw_ms": at_q,
                    "measured_p50_ms": float(np.percentile(per_image, 50)), "measured_mean_ms": float(per_image.mean()),
                    "reference_ms": reference, "session_unpruned_ms": reference, "budget_ms": budget,
                    "over_target": at_q > budget, "images": calib, "drift": 1.0,
                }  # fmt: skip
            passing = [c for c in measured.values() if not c["over_target"]]
            if passing:
                scored = settings.calib_images  # the images the accuracies were taken on: their noise
                best = rank_within_noise(passing, lambda c: c["accuracy"], lambda c: c["measured_ms"], scored)[0]
                return list(measured.values()), best
            factor = statistics.median(c["measured_ms"] / c["predicted_ms"] for c in measured.values())
    return list(measured.values()), None
