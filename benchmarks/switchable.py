"""The run-time switchable ONNX file against a static export at each density (issue 13).

For each model, a pruned model at the family's default 3 locations is exported with its keep
ratios as an input (``export_onnx_switchable``): once with dynamic counts only, and once with a
static branch per density (``operating_points``). It is also exported once per density as a
static file (``export_onnx``). All files run on this host's onnxruntime CPU provider (1 thread, batch 1, no
spinning: the profilers' session), interleaved: every round times each (density, file) pair in
a fresh random order, ``--runs`` inferences each, after warm-up; the figure is the median over
rounds of each pair's per-round median, and the ratio switchable/static is taken within a round
first (this host's speed drifts). Outputs are compared with torch at each density.

Latency does not depend on the weights (the token counts are fixed by the keep ratios), so the
models have their initial weights.

    python benchmarks/switchable.py [--models vit_demo_fashion,deit_tiny_patch16_224]
        [--ratios 0.9,0.8,0.7,0.6] [--rounds 15] [--runs 20] [--results benchmarks/results/switchable.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import spvit_search as sp
from spvit_search.export import export_onnx, export_onnx_switchable, onnx_session
from spvit_search.models import create_model


def _timed(session, feeds: dict, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench_model(name: str, ratios: list[float], rounds: int, runs: int, tables: Path | None = None) -> dict:
    torch.manual_seed(0)
    model = create_model(name).eval()
    locations = sp.pruning.family_for(model).default_locations(model, 3)
    densities = [tuple(round(r ** (i + 1), 4) for i in range(len(locations))) for r in ratios]
    sp.prune(model, sp.PruningPlan(locations=locations, keep=densities[-1]))
    x = torch.randn(1, *model.default_cfg["input_size"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        switchable = onnx_session(export_onnx_switchable(model, Path(tmp) / "switchable.onnx"))
        branched = onnx_session(export_onnx_switchable(model, Path(tmp) / "branched.onnx",
                                                       operating_points=densities))  # fmt: skip
        static = {}
        for keep in densities:
            sp.set_keep(model, keep)
            static[keep] = onnx_session(export_onnx(model, Path(tmp) / f"static-{'-'.join(map(str, keep))}.onnx"))
            with torch.no_grad():
                expected = model(x).numpy()
            feed = {"image": x.numpy(), "keep": np.asarray(keep, np.float32)}
            diff = max(float(np.abs(s.run(None, feed)[0] - expected).max()) for s in (switchable, branched))
            rows.append({"keep": list(keep), "max_abs_diff_vs_torch": diff,
                         "tokens_per_block": list(sp.pruning_state(model).token_counts)})  # fmt: skip
        pairs = [(keep, kind) for keep in densities for kind in ("static", "switchable", "branched")]
        feeds = {(keep, "static"): (static[keep], {"image": x.numpy()}) for keep in densities}
        for kind, session in (("switchable", switchable), ("branched", branched)):
            feeds |= {(keep, kind): (session, {"image": x.numpy(), "keep": np.asarray(keep, np.float32)})
                      for keep in densities}  # fmt: skip
        for session, feed in feeds.values():  # warm-up
            _timed(session, feed, 5)
        per_round = {p: [] for p in pairs}
        rng = random.Random(0)
        for _ in range(rounds):
            rng.shuffle(pairs)
            for p in pairs:
                per_round[p].append(_timed(*feeds[p], runs))
    for row, keep in zip(rows, densities, strict=True):
        s, w, b = (per_round[(keep, kind)] for kind in ("static", "switchable", "branched"))
        row.update(static_ms=round(statistics.median(s), 4), switchable_ms=round(statistics.median(w), 4),
                   ratio=round(statistics.median(y / x for x, y in zip(s, w, strict=True)), 4),
                   branched_ms=round(statistics.median(b), 4),
                   branched_ratio=round(statistics.median(y / x for x, y in zip(s, b, strict=True)), 4))  # fmt: skip
    if tables is not None and (tables / "local").exists():  # the table's prediction of each operating point
        from spvit_search.devices import DeviceRegistry
        from spvit_search.latency import LatencyTableError
        from spvit_search.predictor import PlanLatency

        try:
            latency = PlanLatency.for_device(DeviceRegistry.load().get("local"), create_model(name), name, root=tables)
        except LatencyTableError:  # this model is not in the table
            return {"model": name, "locations": list(locations), "rows": rows}
        for row in rows:
            plan = model.spvit_plan.replace(keep=tuple(row["keep"]))
            row["predicted_ms"] = round(latency.predict(plan).total_ms, 4)
            row["predicted_over_switchable"] = round(row["predicted_ms"] / row["switchable_ms"], 4)
    return {"model": name, "locations": list(locations), "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit_demo_fashion,deit_tiny_patch16_224", type=lambda s: s.split(","))
    ap.add_argument("--ratios", default="0.9,0.8,0.7,0.6", type=lambda s: [float(v) for v in s.split(",")])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--tables", type=Path, default=None,
                    help="latency tables (profiled and calibrated today): their predictions beside")  # fmt: skip
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "switchable.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    models = [bench_model(m, args.ratios, args.rounds, args.runs, args.tables) for m in args.models]
    results = {"onnxruntime": ort.__version__, "threads": 1, "batch": 1, "rounds": args.rounds, "runs": args.runs,
               "models": models}  # fmt: skip
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1))
    print(
        "| model | keep | tokens per block | static (ms) | switchable (ms) | switchable / static | "
        "with static branches (ms) | branched / static | max |Δ| |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for m in results["models"]:
        for r in m["rows"]:
            print(f"| {m['model']} | {'/'.join(f'{k:g}' for k in r['keep'])} | {r['tokens_per_block']} | "
                  f"{r['static_ms']:.3f} | {r['switchable_ms']:.3f} | {r['ratio']:.3f} | "
                  f"{r['branched_ms']:.3f} | {r['branched_ratio']:.3f} | "
                  f"{r['max_abs_diff_vs_torch']:.1e} |" + (f" predicted {r['predicted_ms']:.3f}" if "predicted_ms" in r
                                                             else ""))  # fmt: skip
    return results


if __name__ == "__main__":
    main()
