"""This host: onnxruntime (one dynamic-token ONNX per part) or LiteRT (one .tflite per count)."""

from __future__ import annotations

import contextlib
import glob
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from spvit_search.export import onnx_session, tflite_runner

from .base import CheckItem, Job, MeasureSettings, Profiler, ProfilerError
from .protocol import Timing, measure_interleaved


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def host_facts() -> dict:
    """CPU model, cores, governor, frequencies and temperatures of this host where readable."""
    cpuinfo = _read("/proc/cpuinfo") or ""
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), None
    )
    temps = []
    for zone in sorted(glob.glob("/sys/class/thermal/thermal_zone*/temp")):
        value = _read(zone)
        if value and value.lstrip("-").isdigit():
            temps.append(int(value) / 1000)
    freqs = [_read(p) for p in sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"))]
    return {
        "model": platform.node(),
        "cpu": model or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor") or "unknown (no cpufreq)",
        "frequencies_khz": [int(f) for f in freqs if f and f.isdigit()] or None,
        "temperature_c": max(temps) if temps else None,
    }


class LocalProfiler(Profiler):
    chunk_points = 64  # nothing to drop here: interleave a whole model's parts

    def __init__(self, device) -> None:
        super().__init__(device)
        self.artifact_format = "tflite" if device.runtime == "tflite" else "onnx"
        self.dynamic_tokens = device.runtime == "onnxruntime"

    def runtime_version(self) -> str:
        if self.device.runtime == "tflite":
            try:
                import ai_edge_litert
            except ImportError:
                raise ProfilerError(
                    f"{self.where()}: runtime tflite needs ai-edge-litert (spvit-search[tflite])"
                ) from None
            return f"ai-edge-litert {getattr(ai_edge_litert, '__version__', 'unknown')}"
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"

    def check(self) -> list[CheckItem]:
        items = super().check()
        allowed = sorted(os.sched_getaffinity(0))
        cpus = self.device.cpus
        if cpus is not None and not set(cpus) <= set(allowed):
            items.append(CheckItem("affinity", False, f"mask {self.device.affinity} names CPUs outside {allowed}"))
        if self.device.threads > len(cpus or allowed):
            items.append(CheckItem("threads", False, f"{self.device.threads} threads on {len(cpus or allowed)} CPUs"))
        return items

    def _runner(self, path: Path) -> Callable:
        if self.device.runtime == "tflite":
            run = tflite_runner(path, threads=self.device.threads)
            return lambda feeds: run(*feeds.values())
        session = onnx_session(path, threads=self.device.threads)
        return lambda feeds: session.run(None, feeds)

    def pinned_cpus(self) -> list[int] | None:
        """The configured mask; single-threaded runs default to the last allowed CPU.

        CPU 0 takes most interrupts: on this project's 2-vCPU VM, pinning one thread to CPU 1
        cut the 1-second spread of a block from ±5% to ±2%, of a selector from ±25% to ±7%.
        """
        if self.device.cpus is not None:
            return self.device.cpus
        if self.device.threads == 1:
            return [max(os.sched_getaffinity(0))]
        return None

    def describe(self) -> dict:
        facts = host_facts()
        cpus = self.pinned_cpus()
        facts["affinity"] = "all cores" if cpus is None else ",".join(map(str, cpus))
        facts["runtime"] = self.runtime_version()
        return facts

    def measure(self, jobs: list[Job], settings: MeasureSettings, on_round=None) -> dict[tuple[str, int], Timing]:
        rng = np.random.default_rng(settings.seed)
        runners: dict[Path, Callable] = {}
        calls = {}
        for job in jobs:
            art = job.artifact
            for n in job.tokens:
                path = art.file_for(n)
                if path not in runners:
                    runners[path] = self._runner(path)
                feeds = {
                    spec.name: rng.standard_normal(shape).astype(np.float32)
                    for spec, shape in zip(art.inputs, art.shapes(n), strict=True)
                }
                calls[(art.signature, n)] = lambda run=runners[path], feeds=feeds: run(feeds)
        with self._pinned():
            return measure_interleaved(
                calls, warmup=settings.warmup, rounds=settings.rounds, runs=settings.runs,
                seed=settings.seed, on_round=on_round,
            )  # fmt: skip

    def measure_images(self, files: dict[str, Path], images: np.ndarray, repeats: int = 3,
                       warmup: int = 10) -> dict[str, np.ndarray]:  # fmt: skip
        if self.device.runtime != "onnxruntime":
            raise ProfilerError(f"{self.where()}: per-image latency is measured with onnxruntime, not "
                                f"{self.device.runtime}")  # fmt: skip
        sessions = {name: onnx_session(path, threads=self.device.threads) for name, path in files.items()}
        inputs = {name: s.get_inputs()[0].name for name, s in sessions.items()}
        out: dict[str, list[float]] = {name: [] for name in files}
        with self._pinned():
            for name, s in sessions.items():
                for _ in range(warmup):
                    s.run(None, {inputs[name]: images[:1]})
            for image in images:
                feed = image[None]
                for name, s in sessions.items():
                    times = []
                    for _ in range(repeats):
                        start = time.perf_counter()
                        s.run(None, {inputs[name]: feed})
                        times.append(time.perf_counter() - start)
                    out[name].append(1e3 * statistics.median(times))
        return {name: np.asarray(v) for name, v in out.items()}

    @contextlib.contextmanager
    def _pinned(self):
        previous = os.sched_getaffinity(0)
        cpus = self.pinned_cpus()
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        try:
            yield
        finally:
            os.sched_setaffinity(0, previous)
