"""``spvit-search profile``: measure every distinct part of a model on a device into its table.

Parts already in the table are skipped (``force`` re-measures them), rows are written as soon
as a part is measured, and a dropped connection leaves every finished row in place: running
the same command again resumes where it stopped.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from . import __version__
from .blocks import Part, export_part_onnx, export_part_tflite, model_parts
from .devices import DeviceConfig
from .errors import SpvitError
from .latency import LatencyTable, now_iso, table_path
from .models import create_model
from .plan import PROFILED_BY_DEFAULT

DEFAULT_ROOT = Path("latency_tables")


@dataclass(frozen=True)
class ProfileResult:
    table: Path
    plot: Path | None
    measured: int  # points measured in this run
    skipped: int  # points already in the table
    parts: int
    seconds: float


def _todo(part: Part, table: LatencyTable, tokens: tuple[int, ...] | None, force: bool) -> list[int]:
    grid = part.grid
    if tokens is not None and len(part.grid) > 1:
        lo, hi = min(part.grid), max(part.grid)
        bad = [n for n in tokens if not lo <= n <= hi]
        if bad:
            raise SpvitError(f"--tokens {bad} outside {lo}..{hi}, the token counts {part.signature} can see")
        grid = tuple(sorted(set(tokens)))
    return [n for n in grid if force or not table.has(part.signature, n)]


def _artifact(profiler, part: Part, todo: list[int], folder: Path, batch: int):
    from profilers import Artifact

    name = part.signature
    if profiler.artifact_format == "tflite":
        files = {n: export_part_tflite(part, folder / f"{name}-n{n}.tflite", n, batch) for n in todo}
    elif profiler.dynamic_tokens and part.dynamic:
        files = {None: export_part_onnx(part, folder / f"{name}.onnx", None, batch)}
    else:
        files = {n: export_part_onnx(part, folder / f"{name}-n{n}.onnx", n, batch) for n in todo}
    return Artifact(name, part.inputs, files, batch)


def _chunks(work: list[tuple[Part, list[int]]], size: int) -> list[list[tuple[Part, list[int]]]]:
    """Consecutive groups of whole parts with about ``size`` points each."""
    chunks: list[list[tuple[Part, list[int]]]] = []
    count = size
    for part, todo in work:
        if count + len(todo) > size and count > 0:
            chunks.append([])
            count = 0
        chunks[-1].append((part, todo))
        count += len(todo)
    return chunks


def _check_runtime(table: LatencyTable, version: str, force: bool) -> None:
    if force or not len(table.rows):
        return
    seen = sorted(set(table.rows["runtime_version"]))
    if seen != [version]:
        raise SpvitError(
            f"{table.path} holds rows measured with {', '.join(seen)}; the device now runs {version}. "
            "Re-measure with --force, or write to another --out folder"
        )


def profile_model(
    device: DeviceConfig,
    model_name: str,
    *,
    root: str | Path = DEFAULT_ROOT,
    tokens: tuple[int, ...] | None = None,
    rounds: int = 10,
    warmup: int = 3,
    runs: int = 10,
    force: bool = False,
    methods: tuple[str, ...] = PROFILED_BY_DEFAULT,
    progress: bool = True,
    plot: bool = True,
) -> ProfileResult:
    from profilers import Job, LinkLostError, MeasureSettings, ProfilerError, make_profiler

    start = time.perf_counter()
    model = create_model(model_name).eval()
    parts = model_parts(model, methods)
    path = table_path(root, device.name, device.runtime, device.threads, device.batch)
    table = LatencyTable.open(path)
    work = [(part, _todo(part, table, tokens, force)) for part in parts]
    total = sum(len(todo) for _, todo in work)
    skipped = sum(len(p.grid) for p in parts) - total if tokens is None else 0
    settings = MeasureSettings(warmup=warmup, rounds=rounds, runs=runs)
    if total == 0:
        return ProfileResult(path, path.with_suffix(".png") if plot else None, 0, skipped, len(parts),
                             time.perf_counter() - start)  # fmt: skip
    measured = 0
    session: dict = {"model": model_name, "started_at": now_iso(), "status": "running",
                     "settings": {"warmup": warmup, "rounds": rounds, "runs": runs}}  # fmt: skip
    table.meta.update({"schema_version": table.meta.get("schema_version", 1), "toolkit_version": __version__})
    table.meta["device"] = device.model_dump(include={"name", "transport", "runtime", "threads", "batch", "affinity"})
    table.meta.setdefault("sessions", []).append(session)

    bar = tqdm(total=total * rounds, disable=not progress, unit="pt·round", desc=f"profile {device.name}")
    try:
        with make_profiler(device) as profiler, tempfile.TemporaryDirectory(prefix="spvit-parts-") as tmp:
            version = profiler.runtime_version()
            _check_runtime(table, version, force)
            session["device_before"] = profiler.describe()
            for chunk in _chunks([(p, t) for p, t in work if t], profiler.chunk_points):
                bar.set_postfix_str(", ".join(part.signature for part, _ in chunk)[:60])
                jobs = [
                    Job(_artifact(profiler, part, todo, Path(tmp), device.batch), tuple(todo)) for part, todo in chunk
                ]
                points = sum(len(todo) for _, todo in chunk)
                timings = profiler.measure(jobs, settings, on_round=lambda _r, k=points: bar.update(k))
                stamp = now_iso()
                table.append([
                    {"signature": sig, "tokens": n, **timings[(sig, n)].as_dict(), "runtime": device.runtime,
                     "runtime_version": version, "threads": device.threads, "batch": device.batch, "measured_at": stamp}
                    for job in jobs for sig, n in job.points()
                ])  # fmt: skip
                measured += points
            session["device_after"] = {"temperature_c": profiler.describe().get("temperature_c")}
            session["status"] = "complete"
    except (ProfilerError, OSError) as err:
        session["status"] = "interrupted"
        session["error"] = str(err)
        kept = f"{measured} of {total} points measured in this run are kept in {path}"
        if isinstance(err, (LinkLostError, OSError)):  # rerunning helps only when the link was the problem
            raise LinkLostError(f"{err}\n{kept}; run the same command again to resume") from None
        raise ProfilerError(f"{err}\n{kept}; fix the cause above, then run the same command to go on") from None
    finally:
        bar.close()
        session["finished_at"] = now_iso()
        session["points_measured"] = measured
        table.save_meta()
    png = None
    if plot and len(table.rows):
        title = f"{device.name} · {device.runtime} · {device.threads} thread(s) · batch {device.batch}"
        png = table.plot(path.with_suffix(".png"), title=title)
    return ProfileResult(path, png, measured, skipped, len(parts), time.perf_counter() - start)
