"""Rounds of stock benchmark-tool invocations on a remote shell, one shell round trip per round.

For tools that time one model file per process (``benchmark_model``, ``onnxruntime_perf_test``,
``xdputil``), a round is every point's command in a fresh shuffled order, sent as one script:
each command's output is framed by marker lines with its exit code (``echo "@@rc $?"``: the
legacy ADB shell reports none of its own). A point's value per round is the tool's median
(its mean if it prints none); the table row is the median of rounds.
"""

from __future__ import annotations

import random
import shlex
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .base import ProfilerError
from .parsers import ParseError, ToolResult
from .protocol import Timing

BEGIN, RC = "@@spvit-begin ", "@@spvit-rc "


@dataclass(frozen=True)
class ToolCall:
    key: tuple[str, int]  # (signature, tokens)
    command: str  # already quoted for a POSIX shell
    file: str  # the model file on the device, for error messages
    parse: Callable[[str], ToolResult]


def round_script(calls: list[ToolCall], cwd: str) -> str:
    lines = [f"cd {shlex.quote(cwd)} || exit 97"]
    for i, call in enumerate(calls):
        lines.append(f"echo {BEGIN}{i}; {call.command} 2>&1; echo {RC}$?")
    return "\n".join(lines) + "\n"


def split_round(output: str, count: int) -> list[tuple[int | None, str]]:
    """Per call: (exit code or None if the output was cut, its text)."""
    results: list[tuple[int | None, list[str]]] = [(None, []) for _ in range(count)]
    current = None
    for line in output.splitlines():
        if line.startswith(BEGIN) and line[len(BEGIN) :].strip().isdigit():
            current = int(line[len(BEGIN) :])
        elif line.startswith(RC) and current is not None:
            code = line[len(RC) :].strip()
            results[current] = (int(code) if code.lstrip("-").isdigit() else None, results[current][1])
            current = None
        elif current is not None and current < count:
            results[current][1].append(line)
    return [(rc, "\n".join(text)) for rc, text in results]


def run_tool_rounds(
    calls: list[ToolCall],
    rounds: int,
    run_script: Callable[[str], str],
    cwd: str,
    where: str,
    seed: int = 0,
    before_round: Callable[[int], None] | None = None,
    on_round: Callable[[int], None] | None = None,
) -> dict[tuple[str, int], Timing]:
    rng = random.Random(seed)
    values: dict[tuple[str, int], list[float]] = {c.key: [] for c in calls}
    counts: dict[tuple[str, int], int] = {c.key: 0 for c in calls}
    order = list(calls)
    for r in range(rounds):
        if before_round is not None:
            before_round(r)
        rng.shuffle(order)
        output = run_script(round_script(order, cwd))
        if "@@spvit-begin" not in output and output.strip():
            raise ProfilerError(f"{where}: the round script did not run in {cwd}: {output.strip()[-300:]}")
        for call, (rc, text) in zip(order, split_round(output, len(order)), strict=True):
            if rc is None:
                raise ProfilerError(f"{where}: output of `{call.command}` was cut off (file {call.file})")
            if rc != 0:
                raise ProfilerError(
                    f"{where}: `{call.command}` exited with {rc} (file {call.file}): {text.strip()[-400:]}"
                )
            try:
                result = call.parse(text)
            except ParseError as err:
                raise ProfilerError(
                    f"{where}: could not read the output of `{call.command}` (file {call.file}): {err}. "
                    f"Output was: {text.strip()[-300:]!r}"
                ) from None
            values[call.key].append(result.typical_ms)
            counts[call.key] += result.count or 1
        if on_round is not None:
            on_round(r)
    return {key: _timing(v, counts[key]) for key, v in values.items()}


def _timing(values: list[float], runs: int) -> Timing:
    return Timing(
        median_ms=float(statistics.median(values)),
        p10_ms=float(np.percentile(values, 10)),
        p90_ms=float(np.percentile(values, 90)),
        mean_ms=float(np.mean(values)),
        std_ms=float(np.std(values)),
        runs=runs,
        rounds=len(values),
    )
