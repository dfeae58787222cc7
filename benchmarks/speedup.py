"""Measured speedup of a pruned model vs its FLOPs reduction, and the selector overhead.

onnxruntime on this CPU, 1 thread (spinning off), batch 1 or ``--batch``, dense vs pruned by
one plan for each method (DeiT-S: (0.7, 0.49, 0.343) before blocks (3, 6, 9); PiT-S with
``--model pit_s_224 --locations 1,3,9 --keep 0.5,0.45,0.45``: one location per grid; Swin-T
with ``--model swin_tiny_patch4_window7_224 --locations 0,2,4 --keep 0.5,0.5,0.5``: half the
windows of stages 0-2, its methods ``spvit`` and ``norm``). All ONNX
sessions run interleaved in shuffled order per round (profilers/protocol.py); figures are
medians.

Ratios are paired by round: each round's dense / pruned and (pruned - baseline) / dense, then the
median over rounds (with the overhead's interquartile range), so drift between rounds cancels
instead of entering as the difference of two medians (on this 2-core host that difference swung
by 3-4% of dense between two runs minutes apart, hiding a 3% goal).

* speedup = dense / pruned latency; FLOPs reduction = dense / pruned MACs; their ratio
  says how much of the FLOPs saving turns into time (goal >= 0.95).
* overhead = (pruned - same-token-count blocks without any selection) / dense latency: what
  scoring, top-k, gather and the package token cost (goal <= 2%). The baseline keeps exactly
  the plan's token counts by slicing the sequence, so only the selection itself differs.
  For ``tome`` it is matching, merging and proportional attention in the later blocks (goal <= 3%).
  On a model with several grids (PiT) the baseline parks the sliced-off tokens in order and puts
  the grid back by concatenation, so the overhead also holds the restore's permutation (goal <= 3%).
  On Swin the baseline computes the first k windows of each pruned block and carries the rest in
  order: the overhead is the scoring, the ranking of windows and the restore's permutation.

    python benchmarks/speedup.py [--model deit_small_patch16_224] [--batch 1] [--rounds 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import spvit_search as sp
from profilers.protocol import measure_interleaved
from spvit_search.export import INPUT_NAME, onnx_session
from spvit_search.models import create_model, input_shape
from spvit_search.pruning import family_for, pit, swin


class _Slice(nn.Module):
    """Selection-free stand-in for a reducer: keeps the first ``tokens`` tokens, nothing else."""

    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.tokens = tokens

    def forward(self, x, state):
        return x[:, : self.tokens]


class _SliceAndPark(nn.Module):
    """The same on a grid that is restored later (PiT): the first patches are kept, the rest
    parked in order, and a copy of a token stands in for the package (no compute). The parked
    tokens re-enter unchanged, so moving them by their package's update counts as overhead."""

    def __init__(self, tokens: int, package: bool) -> None:
        super().__init__()
        self.tokens, self.package = tokens, package

    def forward(self, x, state):
        p, pk = state.num_prefix, state.num_packages
        n = x.shape[1] - p - pk
        k = self.tokens - p - pk - int(self.package)
        patches = x[:, p : p + n]
        state.parked.append((patches[:, k:], state.positions[:, k:]))
        state.parked_packages.append(None)
        state.positions = state.positions[:, :k]
        extra = [patches[:, :1]] if self.package else []
        state.num_packages += len(extra)
        return torch.cat([x[:, :p], patches[:, :k], x[:, p + n :], *extra], dim=1)


def _in_order(kept, positions, parked):
    """The grid of a sliced stage: kept and parked tokens are already in grid order."""
    return torch.cat([kept, *(tokens for tokens, _ in reversed(parked))], dim=1)


def _first_windows(self, x, logp, selector, first):
    """Selection-free stand-in for a Swin block's window pruning: the first k windows of the
    partition are computed and the others carried, through the same two gathers, with indices
    fixed in advance (no score, no ranking, no inverse permutation)."""
    b, h, w, c = x.shape
    index = self.spvit_window_index
    area, windows = index.area, index.windows
    k = sp.plan.kept_count(selector.keep, windows)
    tokens = torch.cat([x.reshape(b, h * w, c), x.new_zeros(b, 1, c)], dim=1)
    raw = tokens[:, index.tokens[: k * area]].reshape(b * k, area, c)
    valid = index.valid[: k * area].reshape(1, k, area, 1).expand(b, -1, -1, -1).reshape(b * k, area, 1)
    mask = None if self.attn_mask is None else self.attn_mask[:k].repeat(b, 1, 1)
    computed = self._compute(raw, valid, mask)
    source = torch.where(index.window_of < k, index.window_of * area + index.offset_in, k * area + index.position)
    both = torch.cat([computed.reshape(b, k * area, c), x.reshape(b, h * w, c)], dim=1)
    return both[:, source].reshape(b, h, w, c)


def _slice_baseline(model: nn.Module, plan: sp.PruningPlan) -> nn.Module:
    tokens = plan.tokens_per_block(model)
    family = family_for(model)
    if family.name == "swin":  # the selectors stay; their scores are replaced at export
        return model
    blocks = family.blocks(model)
    for loc in plan.locations:
        grids = len(family.layout(model).stages) > 1
        blocks[loc].token_selector = _SliceAndPark(tokens[loc], plan.package_token) if grids else _Slice(tokens[loc])
    return model


def _export_baseline(model: nn.Module, path: Path, batch: int) -> Path:
    """Export with the selection replaced (for this export only): PiT's restore without its
    permutation; Swin's window pruning without scores or ranking."""
    saved = (pit._restore, swin._PrunedSwinBlock._forward_windows, swin.WindowSelector.token_logp)
    pit._restore = _in_order
    swin._PrunedSwinBlock._forward_windows = _first_windows
    swin.WindowSelector.token_logp = lambda self, x: x[..., 0]
    try:
        return sp.export_onnx(model, path, batch_size=batch)
    finally:
        pit._restore, swin._PrunedSwinBlock._forward_windows, swin.WindowSelector.token_logp = saved


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
    methods = family_for(dense).methods
    macs = {"dense": sp.count_flops(dense).macs}
    files = {"dense": sp.export_onnx(dense, tmp / "dense.onnx", batch_size=args.batch)}
    if family_for(dense).name == "swin":
        # timm's -100 shift masks give denormal softmax weights (slow on x86); pruning uses exact
        # zeros, so the dense reference does too (keep 1 everywhere: timm's forward, its outputs);
        # timm's own model is measured beside it and reported
        files["dense-timm"] = files["dense"]
        dense_plan = sp.PruningPlan(locations=locations, keep=(1.0,) * len(locations), method="norm")
        exact = sp.prune(create_model(args.model).eval(), dense_plan)
        files["dense"] = sp.export_onnx(exact, tmp / "dense-exact-mask.onnx", batch_size=args.batch)
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
    dense_rounds = np.array(timing["dense"].round_ms)
    rows = []
    for method in methods:
        ms = timing[method].median_ms
        pruned_rounds = np.array(timing[method].round_ms)
        baseline_rounds = np.array(timing[f"{method}-noselect"].round_ms)
        speedup = float(np.median(dense_rounds / pruned_rounds))
        reduction = macs["dense"] / macs[method]
        overheads = (pruned_rounds - baseline_rounds) / dense_rounds * 100
        q25, overhead, q75 = (float(v) for v in np.percentile(overheads, [25, 50, 75]))
        rows.append(
            {
                "method": method,
                "latency_ms": round(ms, 2),
                "speedup": round(speedup, 3),
                "flops_reduction": round(reduction, 3),
                "speedup_over_flops": round(speedup / reduction, 3),
                "overhead_pct_of_dense": round(overhead, 2),
                "overhead_iqr_pct": [round(q25, 2), round(q75, 2)],
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
        **({"dense_timm_masks_ms": round(timing["dense-timm"].median_ms, 2)} if "dense-timm" in timing else {}),
        "rows": rows,
    }
    print(f"{args.model} dense {dense_ms:.2f} ms  (ORT {ort.__version__}, {args.threads} thread, batch {args.batch})")
    if "dense-timm" in timing:
        timm_ms = timing["dense-timm"].median_ms
        print(f"  timm's own dense model (-100 shift masks, denormal softmax weights): {timm_ms:.2f} ms")
    print(f"{'method':8} {'ms':>8} {'speedup':>8} {'FLOPs red.':>10} {'ratio':>6} {'overhead':>9}  rounds' IQR")
    for r in rows:
        low, high = r["overhead_iqr_pct"]
        print(
            f"{r['method']:8} {r['latency_ms']:8.2f} {r['speedup']:8.3f} {r['flops_reduction']:10.3f} "
            f"{r['speedup_over_flops']:6.3f} {r['overhead_pct_of_dense']:8.2f}%  [{low:.2f}, {high:.2f}]%"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
