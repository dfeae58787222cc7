"""Cost and fidelity of `spvit-search profile` on this host.

1. Runs `spvit-search profile` from an empty table on the local device (wall time of the
   whole command, interpreter start included) and counts the measured points
   against the dense alternative: every block at every token count (depth × N0 points).
2. Fidelity of the sparse grid: measures, in one interleaved session, every grid point and
   held-out token counts (not on the grid) of the block, selector and head parts, fits each
   part on its grid points as the table does, and compares the fit with the held-out points.
   (One session: on this VM whole-machine speed drifts by a few % over seconds, which would
   otherwise be counted as fit error.)

    python benchmarks/profile_cost.py [--model deit_small_patch16_224] [--heldout 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from profilers import Job, MeasureSettings, make_profiler
from spvit_search.blocks import model_parts
from spvit_search.devices import DeviceRegistry
from spvit_search.latency import LatencyTable, fit_curve, table_path
from spvit_search.models import create_model
from spvit_search.plan import PROFILED_BY_DEFAULT
from spvit_search.profile import _artifact


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--device", default="local")
    ap.add_argument("--heldout", type=int, default=10, help="held-out token counts per checked part")
    ap.add_argument("--rounds", type=int, default=15, help="rounds of the fidelity session")
    ap.add_argument("--runs", type=int, default=10, help="runs per point per round in the fidelity session")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    device = DeviceRegistry.load().get(args.device)
    root = Path(tempfile.mkdtemp(prefix="spvit-profile-cost-"))
    command = [sys.executable, "-m", "spvit_search.cli", "profile", "--device", args.device, "--model", args.model,
               "--out", str(root)]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(done.stderr)
    measured = int(done.stdout.split(" points measured")[0].rsplit(" ", 1)[-1])
    model = create_model(args.model)
    dense_points = len(model.blocks) * (model.num_prefix_tokens + model.patch_embed.num_patches)
    table = LatencyTable.open(table_path(root, device.name, device.runtime, device.threads, device.batch))

    rng = random.Random(0)
    jobs, held_of, parts = [], {}, [p for p in model_parts(model, PROFILED_BY_DEFAULT) if p.kind != "stem"]
    with make_profiler(device) as profiler, tempfile.TemporaryDirectory() as tmp:
        for part in parts:
            lo, hi = min(part.grid), max(part.grid)
            pool = [n for n in range(lo, hi + 1) if n not in part.grid]
            held_of[part.signature] = sorted(rng.sample(pool, min(args.heldout, len(pool))))
            tokens = sorted({*part.grid, *held_of[part.signature]})
            jobs.append(Job(_artifact(profiler, part, tokens, Path(tmp), device.batch), tuple(tokens)))
        timing = profiler.measure(jobs, MeasureSettings(rounds=args.rounds, runs=args.runs))
    checks = []
    for part in parts:
        sig, held = part.signature, held_of[part.signature]
        fit = fit_curve(list(part.grid), [timing[(sig, n)].median_ms for n in part.grid])
        errors = [(float(fit(n)) - timing[(sig, n)].median_ms) / timing[(sig, n)].median_ms for n in held]
        table_err = [(float(table.fit(sig)(n)) - timing[(sig, n)].median_ms) / timing[(sig, n)].median_ms for n in held]
        checks.append({
            "signature": sig, "kind": part.kind, "heldout_tokens": held,
            "median_abs_error_pct": round(100 * float(np.median(np.abs(errors))), 2),
            "max_abs_error_pct": round(100 * float(np.max(np.abs(errors))), 2),
            "table_vs_later_median_pct": round(100 * float(np.median(table_err)), 2),
            "latency_at_max_tokens_ms": round(float(fit(max(part.grid))), 3),
        })  # fmt: skip

    out = {
        "model": args.model,
        "device": args.device,
        "wall_s": round(wall, 1),
        "command": " ".join(command[3:]),
        "measured_points": measured,
        "dense_points": dense_points,
        "reduction": round(dense_points / measured, 1),
        "heldout": checks,
    }
    print(f"`spvit-search profile --device {args.device} --model {args.model}`: complete table in {wall:.1f} s wall, "
          f"{measured} measured points "
          f"vs {dense_points} dense ({out['reduction']}x fewer)")  # fmt: skip
    print(f"{'part':34} {'median |err|':>12} {'max |err|':>10} {'table vs later':>15}")
    for c in checks:
        print(f"{c['signature']:34} {c['median_abs_error_pct']:11.2f}% {c['max_abs_error_pct']:9.2f}% "
              f"{c['table_vs_later_median_pct']:+14.2f}%")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
