#!/usr/bin/env python3
"""Board side of the SSH profiler: times ONNX parts with onnxruntime and prints JSON.

Copied to the board next to ``protocol.py`` (the same measurement protocol as on the host)
and run once per chunk of parts, so a whole chunk costs one SSH round trip:

    python3 board_runner.py --describe      facts about the board, JSON
    python3 board_runner.py job.json        measure; '@@round k' lines, then '@@result {json}'

Needs only Python 3, numpy and onnxruntime on the board.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def describe() -> dict:
    cpuinfo = _read("/proc/cpuinfo") or ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                if line.startswith(("model name", "Hardware", "Model"))), platform.machine())  # fmt: skip
    temps = [int(v) / 1000 for v in (_read(p) for p in glob.glob("/sys/class/thermal/thermal_zone*/temp"))
             if v and v.lstrip("-").isdigit()]  # fmt: skip
    facts = {
        "model": (_read("/proc/device-tree/model") or platform.node()).strip("\x00"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor") or "unknown (no cpufreq)",
        "temperature_c": max(temps) if temps else None,
        "python": platform.python_version(),
    }
    try:
        import onnxruntime as ort

        facts["runtime"] = f"onnxruntime {ort.__version__}"
        facts["providers_available"] = ort.get_available_providers()
    except ImportError as err:
        facts["runtime_error"] = f"onnxruntime is not importable on the board: {err}"
    return facts


def measure(job: dict) -> dict:
    import numpy as np
    import onnxruntime as ort
    from protocol import measure_interleaved

    missing = [p for p in job["providers"] if p not in ort.get_available_providers()]
    if missing:
        return {
            "error": f"execution providers {missing} are not available; the board has {ort.get_available_providers()}"
        }
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = job["threads"]
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions, calls = {}, {}
    rng = np.random.default_rng(job.get("seed", 0))
    for item in job["items"]:
        path = item["model"]
        if path not in sessions:
            sessions[path] = ort.InferenceSession(path, opts, providers=job["providers"])
        feeds = {i["name"]: rng.standard_normal(i["shape"]).astype(np.float32) for i in item["inputs"]}
        calls[item["key"]] = lambda s=sessions[path], f=feeds: s.run(None, f)
    if job.get("cpus"):
        os.sched_setaffinity(0, job["cpus"])
    timings = measure_interleaved(
        calls, warmup=job["warmup"], rounds=job["rounds"], runs=job["runs"], seed=job.get("seed", 0),
        on_round=lambda r: print(f"@@round {r}", flush=True),
    )  # fmt: skip
    providers = sorted({p for s in sessions.values() for p in s.get_providers()})
    return {"runtime": f"onnxruntime {ort.__version__}", "providers": providers,
            "timings": {k: t.as_dict() for k, t in timings.items()}}  # fmt: skip


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[1] == "--describe":
        print("@@result " + json.dumps(describe()), flush=True)
        return 0
    if len(argv) != 2:
        print("usage: board_runner.py --describe | job.json", file=sys.stderr)
        return 2
    with open(argv[1]) as fh:
        job = json.load(fh)
    try:
        result = measure(job)
    except Exception as err:  # reported to the host as JSON, with the type
        result = {"error": f"{type(err).__name__}: {err}"}
    print("@@result " + json.dumps(result), flush=True)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
