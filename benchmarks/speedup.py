"""Measured speedup of a pruned model vs its FLOPs reduction, and the selector overhead.

onnxruntime on this CPU, 1 thread (spinning off), batch 1 or ``--batch``, dense vs pruned by
one plan for each method (DeiT-S: (0.7, 0.49, 0.343) before blocks (3, 6, 9); PiT-S with
``--model pit_s_224 --locations 1,3,9 --keep 0.5,0.45,0.45``: one location per grid). All ONNX
sessions run interleaved in shuffled order per round (profilers/protocol.py); figures are
medians.

* speedup = dense / pruned latency; FLOPs reduction = dense / pruned MACs; their ratio
  says how much of the FLOPs saving turns into time (goal >= 0.95).
* overhead = (pruned - same-token-count blocks without any selection) / dense latency: what
  scoring, top-k, gather and the package token cost (goal <= 2%). The baseline keeps exactly
  the plan's token counts by slicing the sequence, so only the selection itself differs.
  For ``tome`` it is matching, merging and proportional attention in the later blocks (goal <= 3%).
  On a model with several grids (PiT) the baseline parks the sliced-off tokens in order and puts
  the grid back by concatenation, so the overhead also holds the restore's permutation (goal <= 3%).

    python benchmarks/speedup.py [--model deit_small_patch16_224] [--batch 1] [--rounds 7] [--json out.json]
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
from spvit_search.models import create_model, input_shape
from spvit_search.pruning import family_for, pit


class _Slice(nn.Module):
    """Selection-free stand-in for a reducer: keeps the first ``tokens`` tokens, nothing else."""

    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.tokens = tokens

    def forward(self, x, state):
        return x[:, : self.tokens]


class _SliceAndPark(nn.Module):
    """The same on a grid that is restored later (PiT): the first patches are kept, the rest
    parked in order, and a copy of a token stands in for the package (no compute)."""

    def __init__(self, tokens: int, package: bool) -> None:
        super().__init__()
        self.tokens, self.package = tokens, package

    def forward(self, x, state):
        p, pk = state.num_prefix, state.num_packages
        n = x.shape[1] - p - pk
        k = self.tokens - p - pk - int(self.package)
        patches = x[:, p : p + n]
        state.parked.append((patches[:, k:], state.positions[:, k:]))
        state.positions = state.positions[:, :k]
        extra = [patches[:, :1]] if self.package else []
        state.num_packages += len(extra)
        return torch.cat([x[:, :p], patches[:, :k], x[:, p + n :], *extra], dim=1)


def _in_order(kept, positions, parked):
    """The grid of a sliced stage: kept and parked tokens are already in grid order."""
    return torch.cat([kept, *(tokens for tokens, _ in reversed(parked))], dim=1)


def _slice_baseline(model: nn.Module, plan: sp.PruningPlan) -> nn.Module:
    tokens = plan.tokens_per_block(model)
    family = family_for(model)
    blocks = family.blocks(model)
    for loc in plan.locations:
        grids = len(family.layout(model).stages) > 1
        blocks[loc].token_selector = _SliceAndPark(tokens[loc], plan.package_token) if grids else _Slice(tokens[loc])
    return model


def _export_baseline(model: nn.Module, path: Path, batch: int) -> Path:
    original = pit._restore
    pit._restore = _in_order  # the restore without its permutation, for this export only
    try:
        return sp.export_onnx(model, path, batch_size=batch)
    finally:
        pit._restore = original


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--keep", default="0.7,0.49,0.343")
    ap.add_argument("--locations", default="3,6,9")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    keep = tuple(float(v) for v in args.keep.split(","))
    locations = tuple(int(v) for v in args.locations.split(","))
    torch.manual_seed(0)

    tmp = Path(tempfile.mkdtemp(prefix="spvit-speedup-"))
    dense = create_model(args.model).eval()
    grids = len(family_for(dense).layout(dense).stages) > 1
    methods = ("spvit", "hard", "evit") if grids else ("spvit", "hard", "evit", "tome")
    macs = {"dense": sp.count_flops(dense).macs}
    files = {"dense": sp.export_onnx(dense, tmp / "dense.onnx", batch_size=args.batch)}
    for method in methods:
        plan = sp.PruningPlan(locations=locations, keep=keep, method=method)
        model = sp.prune(create_model(args.model).eval(), plan)
        macs[method] = sp.count_flops(model).macs
        files[method] = sp.export_onnx(model, tmp / f"{method}.onnx", batch_size=args.batch)
        baseline = _slice_baseline(model, plan)
        files[f"{method}-noselect"] = _export_baseline(baseline, tmp / f"{method}-noselect.onnx", args.batch)

    image = torch.randn(args.batch, *input_shape(dense)).numpy()
    sessions = {k: onnx_session(f, threads=args.threads) for k, f in files.items()}
    calls = {k: (lambda s=s: s.run(None, {INPUT_NAME: image})) for k, s in sessions.items()}
    print(f"measuring {len(calls)} sessions x {args.rounds} rounds x {args.runs} runs ...", file=sys.stderr)
    timing = measure_interleaved(
        calls, rounds=args.rounds, runs=args.runs, on_round=lambda r: print(f"  round {r + 1}", file=sys.stderr)
    )

    dense_ms = timing["dense"].median_ms
    rows = []
    for method in methods:
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
        "batch": args.batch,
        "runtime": f"onnxruntime {ort.__version__}",
        "host": platform.processor() or platform.machine(),
        "dense_ms": round(dense_ms, 2),
        "rows": rows,
    }
    print(f"{args.model} dense {dense_ms:.2f} ms  (ORT {ort.__version__}, {args.threads} thread, batch {args.batch})")
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
