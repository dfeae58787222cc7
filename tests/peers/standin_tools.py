"""Stand-ins for the stock on-device tools, for the test board and the test phone.

They *really* time the model file they are given (onnxruntime for .onnx, LiteRT for .tflite)
and print the result in the real tool's format (see tests/fixtures/tool-outputs), so rows
profiled through the SSH and ADB test devices are real measurements. Fault switches come from
the environment: SPVIT_STANDIN_GARBLE=1 prints garbage, SPVIT_STANDIN_CPU_TEMP sets the
temperature that ``dumpsys thermalservice`` reports (a file path is read on every call),
SPVIT_STANDIN_STALL_FILE hangs the tool while that file exists.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

GARBLE = "Segmentation fault (core dumped)\n\x00\x1b[0m garbage ###\n"


def _ort_runner(path: str, threads: int, free_dims: dict[str, int]):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else free_dims.get(d, 1) for d in i.shape]
        feeds[i.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return lambda: session.run(None, feeds)


def _tflite_runner(path: str, threads: int):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=path, num_threads=threads)
    it.allocate_tensors()
    for d in it.get_input_details():
        it.set_tensor(d["index"], np.random.default_rng(0).standard_normal(d["shape"]).astype(np.float32))
    return it.invoke


def _time(run, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        run()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        out.append(time.perf_counter() - start)
    return out


def _garbled() -> bool:
    return os.environ.get("SPVIT_STANDIN_GARBLE") == "1"


def _stall() -> None:
    """SPVIT_STANDIN_STALL_FILE=PATH: while PATH exists, the tool hangs before printing (a long
    benchmark during which the toolkit waits for output, e.g. to cut the link under it)."""
    flag = os.environ.get("SPVIT_STANDIN_STALL_FILE")
    deadline = time.monotonic() + 60
    while flag and Path(flag).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def onnxruntime_perf_test(args: list[str]) -> int:
    runs, threads, free, positional, i = 100, 1, {}, [], 0
    while i < len(args):
        a = args[i]
        if a in ("-r", "-x", "-f", "-e", "-m"):
            value = args[i + 1]
            if a == "-r":
                runs = int(value)
            elif a == "-x":
                threads = int(value)
            elif a == "-f":
                name, dim = value.split(":")
                free[name] = int(dim)
            i += 2
            continue
        if not a.startswith("-"):
            positional.append(a)
        i += 1
    model = positional[0]
    _stall()
    if not Path(model).is_file():
        print(f"Error: [ONNXRuntimeError] : 3 : NO_SUCHFILE : Load model from {model} failed. File doesn't exist")
        return 255
    if _garbled():
        print(GARBLE)
        return 0
    start = time.perf_counter()
    run = _ort_runner(model, threads, free)
    created = time.perf_counter() - start
    times = _time(run, runs, warmup=1)
    total = sum(times)
    s = sorted(times)
    print(f"Session creation time cost: {created:.7f} s\nFirst inference time cost: {int(s[0] * 1e3)} ms")
    print(f"Total inference time cost: {total:.6f} s\nTotal inference requests: {runs}")
    print(f"Average inference time cost: {total / runs * 1e3:.5f} ms\nTotal inference run time: {total:.5f} s")
    print(f"Number of inferences per second: {runs / total:.3f}\nAvg CPU usage: 97 %\nRuns:{runs}")
    for label, q in (("Min", 0), ("Max", 100), ("P50", 50), ("P90", 90), ("P95", 95), ("P99", 99), ("P999", 99.9)):
        print(f"{label} Latency: {np.percentile(s, q):.8f} s")
    return 0


def benchmark_model(args: list[str]) -> int:
    opts = dict(a.removeprefix("--").split("=", 1) for a in args if a.startswith("--") and "=" in a)
    graph = opts.get("graph", "")
    print("INFO: STARTING!")
    print(f"INFO: Graph: [{graph}]")
    if not Path(graph).is_file():
        print(f"ERROR: Could not open '{graph}'.\nERROR: Failed to mmap model {graph}\nERROR: Benchmarking failed.")
        return 1
    if _garbled():
        print(GARBLE)
        return 0
    threads, runs = int(opts.get("num_threads", 1)), int(opts.get("num_runs", 50))
    print(f"INFO: Num threads: [{threads}]\nINFO: Loaded model {graph}\nINFO: Initialized TensorFlow Lite runtime.")
    run = _tflite_runner(graph, threads) if graph.endswith(".tflite") else _ort_runner(graph, threads, {})
    warm = _time(run, int(opts.get("warmup_runs", 1)), warmup=0)
    times = _time(run, runs, warmup=0)
    us = [t * 1e6 for t in times]
    w = [t * 1e6 for t in warm]
    for v in (w, us):
        print(f"INFO: count={len(v)} first={int(v[0])} curr={int(v[-1])} min={int(min(v))} max={int(max(v))} "
              f"avg={statistics.mean(v):.1f} std={int(np.std(v))} p5={int(np.percentile(v, 5))} "
              f"median={int(np.median(v))} p95={int(np.percentile(v, 95))}\n")  # fmt: skip
    print(f"INFO: Inference timings in us: Init: 1000, First inference: {int(w[0])}, "
          f"Warmup (avg): {statistics.mean(w):.1f}, Inference (avg): {statistics.mean(us):.1f}")  # fmt: skip
    return 0


def xdputil(args: list[str]) -> int:
    if len(args) < 2 or args[0] != "benchmark":
        print("usage: xdputil benchmark <xmodel> [-i subgraph] <num_threads>")
        return 1
    model, threads = args[1], int(args[-1])
    _stall()
    if not Path(model).is_file():
        print(f"F1121 00:00:00.000000 xmodel.cpp:50] Check failed: cannot open {model}")
        return 134
    if _garbled():
        print(GARBLE)
        return 0
    run = _ort_runner(model, 1, {})
    times = _time(run, 30, warmup=2)
    fps = threads / statistics.median(times)
    print("I1121 00:00:00.000000 benchmark.cpp:200] writing report to <STDOUT>")
    print(f"FPS= {fps:.2f} number_of_frames= {len(times) * threads} time= {sum(times):.2f} seconds.")
    return 0


THERMAL = """IsStatusOverride: false
Thermal Status: 0
Cached temperatures:
\tTemperature{{mValue=31.2, mType=3, mName=skin, mStatus=0}}
HAL Ready: true
Current temperatures from HAL:
\tTemperature{{mValue={cpu}, mType=0, mName=CPU0, mStatus=0}}
\tTemperature{{mValue={cpu4}, mType=0, mName=CPU4, mStatus=0}}
\tTemperature{{mValue=29.3, mType=2, mName=battery, mStatus=0}}
Current cooling devices from HAL:
\tCoolingDevice{{mValue=0, mType=2, mName=thermal-cpufreq-0}}
"""


def dumpsys(args: list[str]) -> int:
    if args[:1] != ["thermalservice"]:
        print(f"Can't find service: {' '.join(args)}")
        return 0
    value = os.environ.get("SPVIT_STANDIN_CPU_TEMP", "41.5")
    if Path(value).is_file():
        value = Path(value).read_text().strip()
    print(THERMAL.format(cpu=float(value), cpu4=float(value) + 0.6))
    return 0


PROPS = {"ro.product.model": "Loopback Phone", "ro.product.manufacturer": "spvit-tests", "ro.soc.model": "HostCPU",
         "ro.board.platform": "loopback", "ro.build.version.release": "14", "ro.build.version.sdk": "34"}  # fmt: skip


def getprop(args: list[str]) -> int:
    if args:
        print(PROPS.get(args[0], ""))
    else:
        for k, v in PROPS.items():
            print(f"[{k}]: [{v}]")
    return 0


TOOLS = {f.__name__: f for f in (onnxruntime_perf_test, benchmark_model, xdputil, dumpsys, getprop)}


def install(bin_dir: Path, env: dict[str, str] | None = None) -> Path:
    """Write one executable wrapper per tool into ``bin_dir`` (this interpreter, these env vars)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    tests_dir = Path(__file__).resolve().parent.parent
    for name in TOOLS:
        script = bin_dir / name
        script.write_text(
            f"#!{sys.executable}\nimport os, sys\nos.environ.update({dict(env or {})!r})\n"
            f"sys.path.insert(0, {str(tests_dir)!r})\nfrom peers.standin_tools import TOOLS\n"
            f"sys.exit(TOOLS[{name!r}](sys.argv[1:]))\n"
        )
        script.chmod(0o755)
    return bin_dir
