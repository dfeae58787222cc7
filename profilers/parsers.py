"""Parsers of the stock on-device benchmark tools' output.

Each parser takes the tool's whole output and returns a :class:`ToolResult` in
milliseconds, or raises :class:`ParseError` saying what was missing or what the tool
reported; profilers add the device, file and command to that message.

Units differ between tools and even inside one: ``benchmark_model`` prints microseconds;
``onnxruntime_perf_test`` prints its average in milliseconds and its percentiles in seconds;
``xdputil benchmark`` prints throughput (frames per second over all its threads).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class ParseError(ValueError):
    """Tool output that does not hold a measurement."""


@dataclass(frozen=True)
class ToolResult:
    avg_ms: float
    count: int | None = None
    median_ms: float | None = None
    p_low_ms: float | None = None  # benchmark_model: p5; onnxruntime_perf_test: none (it has no low percentile)
    p_high_ms: float | None = None  # benchmark_model: p95; onnxruntime_perf_test: P90
    std_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None

    @property
    def typical_ms(self) -> float:
        """The median when the tool reports one, else the mean."""
        return self.median_ms if self.median_ms is not None else self.avg_ms


_NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"


def _errors(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if re.match(r"\s*(ERROR|E\d{4})\b", line)]


def _stats_line(text: str) -> dict[str, float]:
    """The last ``count=… avg=…`` line of benchmark_model (the timed runs, after warm-up)."""
    lines = [line for line in text.splitlines() if re.search(r"\bcount=\d+", line)]
    if not lines:
        return {}
    return {k: float(v) for k, v in re.findall(r"(\w+)=" + _NUM, lines[-1])}


def parse_benchmark_model(text: str) -> ToolResult:
    """TFLite/LiteRT ``benchmark_model``: recent (``Inference timings in us: …``) and legacy formats."""
    errors = _errors(text)
    if errors or "Benchmarking failed" in text:
        raise ParseError("benchmark_model failed: " + ("; ".join(errors) or "Benchmarking failed"))
    recent = re.search(r"Inference timings in us:.*?Inference \(avg\):\s*" + _NUM, text)
    legacy = re.search(r"Average inference timings in us:.*?Inference:\s*" + _NUM, text)
    match = recent or legacy
    if match is None:
        raise ParseError("no 'Inference timings in us' summary line in benchmark_model output")
    stats = _stats_line(text)
    us = 1e-3
    return ToolResult(
        avg_ms=float(match.group(1)) * us,
        count=int(stats["count"]) if "count" in stats else None,
        median_ms=stats["median"] * us if "median" in stats else None,
        p_low_ms=stats["p5"] * us if "p5" in stats else None,
        p_high_ms=stats["p95"] * us if "p95" in stats else None,
        std_ms=stats["std"] * us if "std" in stats else None,
        min_ms=stats["min"] * us if "min" in stats else None,
        max_ms=stats["max"] * us if "max" in stats else None,
    )


def _seconds(text: str, label: str) -> float | None:
    match = re.search(rf"{label}:\s*{_NUM}\s*s\b", text)
    return float(match.group(1)) * 1e3 if match else None


def parse_onnxruntime_perf_test(text: str) -> ToolResult:
    """``onnxruntime_perf_test -m times``: average in ms, percentiles in seconds."""
    errors = _errors(text)
    avg = re.search(r"Average inference time cost(?: total)?:\s*" + _NUM + r"\s*ms", text)
    if avg is None:
        detail = "; ".join(errors) if errors else "no 'Average inference time cost' line"
        raise ParseError(f"onnxruntime_perf_test gave no measurement: {detail}")
    runs = re.search(r"^Runs:\s*(\d+)", text, re.MULTILINE) or re.search(r"Total inference requests:\s*(\d+)", text)
    return ToolResult(
        avg_ms=float(avg.group(1)),
        count=int(runs.group(1)) if runs else None,
        median_ms=_seconds(text, "P50 Latency"),
        p_high_ms=_seconds(text, "P90 Latency"),
        min_ms=_seconds(text, "Min Latency"),
        max_ms=_seconds(text, "Max Latency"),
    )


def parse_xdputil(text: str, threads: int = 1) -> ToolResult:
    """``xdputil benchmark``: ``FPS= …`` over ``threads`` workers -> mean latency per frame."""
    fps = re.search(r"FPS=\s*" + _NUM, text)
    if fps is None or float(fps.group(1)) <= 0:
        errors = _errors(text)
        raise ParseError("xdputil gave no positive 'FPS=' line" + (": " + "; ".join(errors) if errors else ""))
    frames = re.search(r"number_of_frames=\s*(\d+)", text)
    return ToolResult(avg_ms=1e3 * threads / float(fps.group(1)), count=int(frames.group(1)) if frames else None)


PARSERS = {
    "benchmark_model": parse_benchmark_model,
    "onnxruntime_perf_test": parse_onnxruntime_perf_test,
    "xdputil": parse_xdputil,
}


@dataclass(frozen=True)
class Temperature:
    name: str
    kind: int  # Android's Temperature type: 0 CPU, 1 GPU, 2 battery, 3 skin, ...
    celsius: float


def parse_thermalservice(text: str) -> list[Temperature]:
    """``dumpsys thermalservice``: only the HAL's current readings (the cached block can be stale)."""
    start = text.find("Current temperatures from HAL:")
    if start < 0:
        raise ParseError("no 'Current temperatures from HAL' block in dumpsys thermalservice output")
    end = text.find("Current cooling devices", start)
    block = text[start : end if end >= 0 else len(text)]
    temps = [
        Temperature(name, int(kind), float(value))
        for value, kind, name in re.findall(
            r"Temperature\{mValue=" + _NUM + r",\s*mType=(-?\d+),\s*mName=([^,}]+)", block
        )
    ]
    if not temps:
        raise ParseError("the 'Current temperatures from HAL' block has no readings")
    return temps


def cpu_temperature(temps: list[Temperature]) -> float:
    """Hottest CPU sensor, or the hottest sensor of any kind if none is typed CPU."""
    cpu = [t.celsius for t in temps if t.kind == 0]
    return max(cpu or [t.celsius for t in temps])
