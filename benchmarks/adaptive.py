"""Adaptive per-image token counts against the plan's fixed counts at equal mean measured latency (issue 13).

The checkpoints are ``benchmarks/densities.py``'s separately fine-tuned SPViT models at one
density (``--keep``, default 0.7/0.49/0.343; one per seed): their selectors' keep probabilities
are calibrated to that plan by its ratio loss. For each seed:

1. the local table of ``vit_demo_fashion`` (profiled and calibrated here once, ``OUT/tables``);
2. the adaptive scale on the *calibration* split: first where the predicted mean latency of
   the adaptive counts equals the fixed plan's, then two secant steps on the measured mean
   (batch-1 ONNX files, ``--calib-images`` images, interleaved with the fixed file);
3. on the test split: top-1 of both (the adaptive model in batches; a batch equals batch 1),
   each image's latency measured with both files (median of ``--repeats`` runs per image,
   files alternating image by image, onnxruntime CPU, 1 thread), the predicted latency of each
   image from its counts (``PlanLatency.predict_counts``): mean, p50 and p95 of both. With them,
   ``--calib-latency-images`` calibration images run through both files, spread evenly among
   the test images (same session, same spells of the host): their measured / predicted ratios
   (``CountsLatency``) turn the table's predictions into the session's distribution, whose
   mean, p50 and p95 are compared with the test images' measured ones;
4. batches of 64 in torch: the padded share of the token slots and the time against the fixed
   counts (the price of the pad-to-largest policy);
5. in torch on the calibration images, no graph overhead: top-1 and mean counts of the fixed
   plan, of expected counts at three scales, and of a mass threshold (``MassCount``) at four
   shares (``policies_calib``).

    python benchmarks/adaptive.py [--seeds 0,1,2] [--keep 0.7,0.49,0.343] [--latency-images 2000]
        [--out runs/adaptive] [--results benchmarks/results/adaptive.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from accuracy import SHIPPED_TEACHERS

import spvit_search as sp
from spvit_search.data import build_dataset
from spvit_search.devices import DeviceRegistry
from spvit_search.export import export_onnx, export_onnx_adaptive, onnx_session
from spvit_search.models import build_model
from spvit_search.plan import kept_count
from spvit_search.predictor import CountsLatency, PlanLatency
from spvit_search.pruning import AdaptiveCount, pruning_state, set_adaptive
from spvit_search.train import evaluate

DATA, MODEL = "fashion", "vit_demo_fashion"


def tables(out: Path, device, checkpoint: Path) -> Path:
    from profilers import MeasureSettings
    from spvit_search.measure import calibrate
    from spvit_search.profile import profile_model

    root = out / "tables"
    profile_model(device, MODEL, root=root, progress=False)
    meta = root / device.name / f"{device.runtime}-t{device.threads}-b{device.batch}.meta.json"
    if MODEL not in json.loads(meta.read_text()).get("calibration", {}):
        calibrate(device, MODEL, root, 5, MeasureSettings(rounds=8, runs=5), str(checkpoint))
    return root


def counts_of(model, images: torch.Tensor, batch: int = 250) -> np.ndarray:
    """(I, S) patch tokens each image keeps at each stage under the model's adaptive setting."""
    rows = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            model(images[i : i + batch])
            rows.append(torch.stack(pruning_state(model).adaptive_counts, dim=1).numpy())
    return np.concatenate(rows)


def per_image_ms(sessions: dict, images: torch.Tensor, repeats: int) -> dict[str, np.ndarray]:
    """Each image's median latency under each session, the sessions alternating image by image."""
    out = {name: [] for name in sessions}
    for s in sessions.values():  # warm-up
        for _ in range(20):
            s.run(None, {"image": images[:1].numpy()})
    for x in images:
        feed = {"image": x[None].numpy()}
        for name, s in sessions.items():
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                s.run(None, feed)
                times.append(time.perf_counter() - t0)
            out[name].append(1e3 * statistics.median(times))
    return {k: np.asarray(v) for k, v in out.items()}


def per_image_ms_interleaved(sessions: dict, images: torch.Tensor, reference: torch.Tensor, repeats: int):
    """:func:`per_image_ms` of ``images`` and of the calibration ``reference`` images, the latter
    spread evenly among the former, so both see the same spells of the host (it drifts 4-10%
    within minutes). Returns both dicts, in their own order."""
    n, m = len(images), len(reference)
    order = np.argsort(np.concatenate([np.arange(n) / n, (np.arange(m) + 0.5) / m]), kind="stable")
    ms = per_image_ms(sessions, torch.cat([images, reference])[torch.from_numpy(order)], repeats)
    back = np.argsort(order)
    ms = {k: v[back] for k, v in ms.items()}
    return {k: v[:n] for k, v in ms.items()}, {k: v[n:] for k, v in ms.items()}


def summary(ms: np.ndarray) -> dict:
    return {"mean": round(float(ms.mean()), 4), "p50": round(float(np.percentile(ms, 50)), 4),
            "p95": round(float(np.percentile(ms, 95)), 4)}  # fmt: skip


def run_seed(args, seed: int, device, root: Path, calib: torch.Tensor, calib_labels: torch.Tensor, test) -> dict:
    plan = sp.PruningPlan(locations=args.locations, keep=args.keep, method="spvit", model=MODEL)
    ckpt = args.checkpoints / "-".join(f"{k:g}" for k in args.keep) / f"seed{seed}" / "model.pt"
    model = build_model(MODEL, ckpt, plan).eval()
    latency = PlanLatency.for_device(device, build_model(MODEL), MODEL, root=root, methods=("spvit",))
    fixed_ms = latency.predict(plan).total_ms
    work = args.out / f"seed{seed}"
    fixed_file = export_onnx(model, work / "fixed.onnx")

    def predicted_mean(scale: float) -> float:
        set_adaptive(model, AdaptiveCount(scale=scale))
        return float(latency.predict_counts(plan, counts_of(model, calib)).mean())

    lo, hi = 0.3, 3.0  # bisection on the predicted mean (it rises with the scale)
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predicted_mean(mid) < fixed_ms else (lo, mid)
    scale = (lo + hi) / 2

    def measured_gap(scale: float) -> float:
        set_adaptive(model, AdaptiveCount(scale=scale))
        sessions = {"fixed": onnx_session(fixed_file),
                    "adaptive": onnx_session(export_onnx_adaptive(model, work / "adaptive.onnx"))}  # fmt: skip
        ms = per_image_ms(sessions, calib[: args.calib_latency_images], 3)
        return float(ms["adaptive"].mean() / ms["fixed"].mean() - 1.0)

    steps = [(scale, measured_gap(scale))]
    for _ in range(2):  # secant steps on the measured mean (calibration split)
        s1, g1 = steps[-1]
        s0, g0 = steps[-2] if len(steps) > 1 else (s1 * 0.9, measured_gap(s1 * 0.9))
        if abs(g1) < 0.005 or g1 == g0:
            break
        steps.append((max(0.2, s1 - g1 * (s1 - s0) / (g1 - g0)), None))
        steps[-1] = (steps[-1][0], measured_gap(steps[-1][0]))
    scale = min(steps, key=lambda s: abs(s[1]))[0]
    set_adaptive(model, AdaptiveCount(scale=scale))
    adaptive_file = export_onnx_adaptive(model, work / "adaptive.onnx")

    cpu = torch.device("cpu")
    top1 = {"adaptive": evaluate(model, test, cpu)[0]}
    set_adaptive(model, None)
    top1["fixed"] = evaluate(model, test, cpu)[0]
    images = torch.stack([test[i][0] for i in range(args.latency_images)])
    reference = calib[: args.calib_latency_images]
    set_adaptive(model, AdaptiveCount(scale=scale))
    counts, reference_counts = counts_of(model, images), counts_of(model, reference)
    sessions = {"fixed": onnx_session(fixed_file), "adaptive": onnx_session(adaptive_file)}
    measured, reference_ms = per_image_ms_interleaved(sessions, images, reference, args.repeats)
    predicted = latency.predict_counts(plan, counts)
    session = {"adaptive": CountsLatency.fit(latency.predict_counts(plan, reference_counts), reference_ms["adaptive"]),
               "fixed": CountsLatency.fit(np.full(len(reference), fixed_ms), reference_ms["fixed"])}  # fmt: skip
    in_session = {"adaptive": session["adaptive"].percentiles(predicted),
                  "fixed": session["fixed"].percentiles(np.full(len(images), fixed_ms))}  # fmt: skip
    pad = padding_cost(model, images[:640], plan)
    measured_ms = {k: summary(v) for k, v in measured.items()}
    return {"seed": seed, "scale": round(scale, 4), "scale_steps": steps, "test_top1": top1,
            "measured_ms": measured_ms,
            "predicted_ms": {"adaptive": summary(predicted), "fixed": round(fixed_ms, 4)},
            "predicted_in_session_ms": {k: {q: round(v, 4) for q, v in d.items()} for k, d in in_session.items()},
            "predicted_over_measured": {k: {q: round(in_session[k][q] / measured_ms[k][q], 4)
                                            for q in ("mean", "p50", "p95")} for k in in_session},
            "policies_calib": policies(model, calib, calib_labels, plan),
            "counts_mean": counts.mean(axis=0).round(2).tolist(), "counts_p5": np.percentile(counts, 5, 0).tolist(),
            "counts_p95": np.percentile(counts, 95, 0).tolist(), "batched_64": pad}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class MassCount(AdaptiveCount):
    """A policy tried against the expected count (not in the package): the fewest top-scored
    tokens whose keep probabilities hold a share ``tau`` of the image's Σp."""

    tau: float = 0.9

    def counts(self, keep_logp: torch.Tensor, real: torch.Tensor, keep: float, num_patches: int) -> torch.Tensor:
        lo, hi = self.bounds(keep, num_patches)
        ranked, _ = (keep_logp.exp() * real).sort(dim=1, descending=True)
        share = ranked.cumsum(dim=1) / ranked.sum(dim=1, keepdim=True)
        k = ((share < self.tau).sum(dim=1) + 1).float().clamp(min=lo, max=hi)
        return torch.minimum(k, real.sum(dim=1) - 1).clamp(min=1).to(torch.int64)


def policies(model, images: torch.Tensor, labels: torch.Tensor, plan: sp.PruningPlan) -> dict:
    """Torch, calibration split, no graph overhead: top-1 and mean counts of the fixed plan, of
    expected counts at three scales and of :class:`MassCount` at four shares. Whether a policy
    gains anything at equal counts before the adaptive file's cost is paid."""
    setting = pruning_state(model).adaptive
    out = {}
    candidates = {
        "fixed": None,
        **{f"expected x{s:g}": AdaptiveCount(scale=s) for s in (0.9, 1.0, 1.1)},
        **{f"mass {t:g}": MassCount(tau=t, min_factor=0.3, max_factor=2.0) for t in (0.8, 0.85, 0.9, 0.95)},
    }
    for name, policy in candidates.items():
        set_adaptive(model, policy)
        correct, counts = 0, []
        with torch.no_grad():
            for i in range(0, len(images), 250):
                correct += int((model(images[i : i + 250]).argmax(1) == labels[i : i + 250]).sum())
                if policy is not None:
                    counts.append(torch.stack(pruning_state(model).adaptive_counts, dim=1).numpy())
        patches = model.patch_embed.num_patches
        c = np.concatenate(counts) if counts else np.array([[kept_count(k, patches) for k in plan.keep]])
        out[name] = {"top1": round(100 * correct / len(images), 2), "counts_mean": c.mean(axis=0).round(1).tolist(),
                     "first_stage_p5_p95": np.percentile(c[:, 0], [5, 95]).tolist()}  # fmt: skip
    set_adaptive(model, setting)
    return out


def padding_cost(model, images: torch.Tensor, plan: sp.PruningPlan) -> dict:
    """Batches of 64 in torch: padded share of each stage's slots, and time against fixed counts."""
    padded, slots = np.zeros(len(plan.keep)), np.zeros(len(plan.keep))
    timings = {"adaptive": [], "fixed": []}
    adaptive = pruning_state(model).adaptive
    with torch.no_grad():
        for _ in range(3):
            for i in range(0, len(images), 64):
                x = images[i : i + 64]
                for name, setting in (("adaptive", adaptive), ("fixed", None)):
                    set_adaptive(model, setting)
                    t0 = time.perf_counter()
                    model(x)
                    timings[name].append(time.perf_counter() - t0)
                    if setting is not None:
                        k = torch.stack(pruning_state(model).adaptive_counts, dim=1).numpy()
                        padded += (k.max(axis=0) - k).sum(axis=0)
                        slots += k.max(axis=0) * len(k)
    set_adaptive(model, adaptive)
    return {"padded_slot_share": (padded / slots).round(4).tolist(),
            "time_adaptive_over_fixed": round(statistics.median(timings["adaptive"]) /
                                              statistics.median(timings["fixed"]), 4)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2", type=lambda s: [int(v) for v in s.split(",")])
    ap.add_argument("--keep", default="0.7,0.49,0.343", type=lambda s: tuple(float(v) for v in s.split(",")))
    ap.add_argument("--locations", default="2,3,5", type=lambda s: tuple(int(v) for v in s.split(",")))
    ap.add_argument("--checkpoints", type=Path, default=Path("runs/densities/runs/separate"))
    ap.add_argument("--calib-images", type=int, default=1000)
    ap.add_argument("--calib-latency-images", type=int, default=300)
    ap.add_argument("--latency-images", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("runs/adaptive"))
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "adaptive.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    device = DeviceRegistry.load().get("local")
    root = tables(args.out, device, SHIPPED_TEACHERS[DATA])
    calib_set = build_dataset(DATA, "calib", build_model(MODEL))
    calib = torch.stack([calib_set[i][0] for i in range(min(args.calib_images, len(calib_set)))])
    calib_labels = torch.stack([calib_set[i][1] for i in range(len(calib))])
    test = build_dataset(DATA, "test", build_model(MODEL))
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    results.setdefault("seeds", {})
    for seed in args.seeds:
        if str(seed) not in results["seeds"]:
            results["seeds"][str(seed)] = run_seed(args, seed, device, root, calib, calib_labels, test)
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=1))
        r = results["seeds"][str(seed)]
        pad = r["batched_64"]
        print(f"seed {seed}: scale {r['scale']}, top-1 fixed {r['test_top1']['fixed']:.2f}% adaptive "
              f"{r['test_top1']['adaptive']:.2f}%; measured mean fixed {r['measured_ms']['fixed']['mean']:.3f} "
              f"adaptive {r['measured_ms']['adaptive']['mean']:.3f} ms; adaptive p50/p95 predicted "
              f"{r['predicted_ms']['adaptive']['p50']:.3f}/{r['predicted_ms']['adaptive']['p95']:.3f} measured "
              f"{r['measured_ms']['adaptive']['p50']:.3f}/{r['measured_ms']['adaptive']['p95']:.3f}; in session "
              f"predicted/measured {r.get('predicted_over_measured')}; batched: "
              f"padded {pad['padded_slot_share']}, time ×{pad['time_adaptive_over_fixed']}")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
