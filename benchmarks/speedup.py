"""Measured speedup of pruned DeiT-S vs its FLOPs reduction, and the selector overhead.

onnxruntime on this CPU, batch 1, 1 thread (spinning off), dense vs pruned at
(0.7, 0.49, 0.343) before blocks (3, 6, 9) for each method. All ONNX sessions run
interleaved in shuffled order per round (profilers/protocol.py); figures are medians.

* speedup = dense / pruned latency; FLOPs reduction = dense / pruned MACs; their ratio
  says how much of the FLOPs saving turns into time (goal >= 0.95).
* overhead = (pruned - same-token-count blocks without any selection) / dense latency: what
  scoring, top-k, gather and the package token cost (goal <= 2%). The baseline keeps exactly
  the plan's token counts by slicing the sequence, so only the selection itself differs.
  For ``tome`` it is matching, merging and proportional attention in the later blocks (goal <= 3%).

    python benchmarks/speedup.py [--model deit_small_patch16_224] [--rounds 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn

import spvit_search as sp
from profilers.protocol import measure_interleaved
from spvit_search.export import INPUT_NAME, onnx_session
from spvit_search.models import create_model


class _Slice(nn.Module):
    """Selection-free stand-in for a reducer: keeps the first ``tokens`` tokens, nothing else."""

    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.tokens = tokens

    def forward(self, x, state):
        return x[:, : self.tokens]


def _slice_baseline(model: nn.Module, plan: sp.PruningPlan) -> nn.Module:
    tokens = plan.tokens_per_block(model)
    for loc in plan.locations:
        model.blocks[loc].token_selector = _Slice(tokens[loc])
    return model


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--keep", default="0.7,0.49,0.343")
    ap.add_argument("--locations", default="3,6,9")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    keep = tuple(float(v) for v in args.keep.split(","))
    locations = tuple(int(v) for v in args.locations.split(","))
    torch.manual_seed(0)

    tmp = Path(tempfile.mkdtemp(prefix="spvit-speedup-"))
    dense = create_model(args.model).eval()
    macs = {"dense": sp.count_flops(dense).macs}
    files = {"dense": sp.export_onnx(dense, tmp / "dense.onnx")}
    for method in ("spvit", "hard", "evit", "tome"):
        plan = sp.PruningPlan(locations=locations, keep=keep, method=method)
        model = sp.prune(create_model(args.model).eval(), plan)
        macs[method] = sp.count_flops(model).macs
        files[method] = sp.export_onnx(model, tmp / f"{method}.onnx")
        files[f"{method}-noselect"] = sp.export_onnx(_slice_baseline(model, plan), tmp / f"{method}-noselect.onnx")

    image = torch.randn(1, 3, 224, 224).numpy()
    sessions = {k: onnx_session(f, threads=args.threads) for k, f in files.items()}
    calls = {k: (lambda s=s: s.run(None, {INPUT_NAME: image})) for k, s in sessions.items()}
    print(f"measuring {len(calls)} sessions x {args.rounds} rounds x {args.runs} runs ...", file=sys.stderr)
    timing = measure_interleaved(
        calls, rounds=args.rounds, runs=args.runs, on_round=lambda r: print(f"  round {r + 1}", file=sys.stderr)
    )

    dense_ms = timing["dense"].median_ms
    rows = []
    for method in ("spvit", "hard", "evit", "tome"):
        ms = timing[method].median_ms
        speedup = dense_ms / ms
        reduction = macs["dense"] / macs[method]
        overhead = (ms - timing[f"{method}-noselect"].median_ms) / dense_ms * 100
        rows.append(
            {
                "method": method,
                "latency_ms": round(ms, 2),
                "speedup": round(speedup, 3),
                "flops_reduction": round(reduction, 3),
                "speedup_over_flops": round(speedup / reduction, 3),
                "overhead_pct_of_dense": round(overhead, 2),
            }
        )
    result = {
        "model": args.model,
        "keep": list(keep),
        "locations": list(locations),
        "threads": args.threads,
        "batch": 1,
        "runtime": f"onnxruntime {ort.__version__}",
        "host": platform.processor() or platform.machine(),
        "dense_ms": round(dense_ms, 2),
        "rows": rows,
    }
    print(f"{args.model} dense {dense_ms:.2f} ms  (ORT {ort.__version__}, {args.threads} thread, batch 1)")
    print(f"{'method':8} {'ms':>8} {'speedup':>8} {'FLOPs red.':>10} {'ratio':>6} {'overhead':>9}")
    for r in rows:
        print(
            f"{r['method']:8} {r['latency_ms']:8.2f} {r['speedup']:8.3f} {r['flops_reduction']:10.3f} "
            f"{r['speedup_over_flops']:6.3f} {r['overhead_pct_of_dense']:8.2f}%"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
