"""Commands of the latency side: devices, profile, predict, measure, calibrate."""

from __future__ import annotations

import itertools
import json
import sys

import click

from ..plan import PROFILED_BY_DEFAULT
from . import main
from ._common import (
    build_plan,
    device_for,
    devices_option,
    parse_list,
    plan_options,
    prediction_line,
    registry,
    user_errors,
)


@main.group(invoke_without_command=True)
@devices_option
@click.pass_context
@user_errors
def devices(ctx, devices_file):
    """List the devices of the registry (or check one: devices check NAME)."""
    ctx.obj = devices_file
    if ctx.invoked_subcommand is not None:
        return
    known = registry(devices_file)
    click.echo(f"devices in {known.source}:")
    for name in known.names:
        raw = known.raw(name)
        where = ""
        if raw.get("ssh"):
            where = f"{raw['ssh'].get('user', '?')}@{raw['ssh'].get('host', '?')}:{raw['ssh'].get('port', 22)}"
        elif raw.get("adb"):
            where = str(raw["adb"].get("serial", "?"))
        click.echo(
            f"  {name:14} {raw.get('transport', '?'):6} {raw.get('runtime', 'onnxruntime'):12} "
            f"threads={raw.get('threads', 1):<3} {where:28} {raw.get('description', '')}"
        )


@devices.command("check")
@click.argument("name")
@devices_option
@click.pass_obj
@user_errors
def devices_check(group_devices_file, name, devices_file):
    """Reachability, runtime presence and version, CPU and thermal state of device NAME (or several:
    NAME1,NAME2 — each checked and reported; the exit code says whether any failed)."""
    # --devices after the command, as every other command takes it, or before it (the group's)
    known = registry(devices_file or group_devices_file)
    devices = [known.get(n) for n in parse_list(name, str, "NAME")]
    failed = [d.name for d in devices if not _check_one(d, len(devices) > 1)]
    if failed:
        if len(devices) > 1:
            click.echo(f"failed: {', '.join(failed)}")
        sys.exit(2)


def _check_one(device, named: bool) -> bool:
    from profilers import make_profiler

    if named:
        click.echo(f"{device.name}:")
    profiler = make_profiler(device)
    try:
        profiler.open()
    except Exception as err:  # the one place that reports instead of raising: say what failed
        click.echo(f"  {'reach':12} FAIL  {err}")
        return False
    ok = True
    try:
        for item in profiler.check():
            ok &= item.ok
            click.echo(f"  {item.what:12} {'ok  ' if item.ok else 'FAIL'}  {item.detail}")
    finally:
        profiler.close()
    return ok


@main.command()
@click.option("--device", "device_name", default="local", show_default=True,
              help="device name in the registry, or several (pixel,zcu102), profiled at once")  # fmt: skip
@click.option("--model", "model_name", required=True, help="timm model name")
@click.option("--tokens", default=None, help="token counts to measure (default: a sparse grid per part)")
@click.option("--threads", type=int, default=None, help="override the device's thread count")
@click.option("--rounds", type=int, default=10, show_default=True, help="interleaved rounds per point")
@click.option("--runs", type=int, default=10, show_default=True, help="runs per point per round")
@click.option("--force", is_flag=True, help="re-measure points already in the table")
@click.option("--out", "root", default="latency_tables", show_default=True, type=click.Path(file_okay=False))
@click.option(
    "--methods",
    default=",".join(PROFILED_BY_DEFAULT),
    show_default=True,
    help="methods whose parts to measure (tome: its merge and the blocks with proportional attention)",
)
@devices_option
@user_errors
def profile(device_name, model_name, tokens, threads, rounds, runs, force, root, methods, devices_file):
    """Measure per-part latency vs token count of MODEL on DEVICE into latency_tables/."""
    from concurrent.futures import ThreadPoolExecutor

    from ..errors import SpvitError
    from ..plan import METHODS
    from ..profile import profile_model

    devices = [device_for(devices_file, name, threads) for name in parse_list(device_name, str, "--device")]
    chosen = parse_list(methods, str, "--methods")
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise click.BadParameter(f"unknown methods {unknown}; known: {list(METHODS)}", param_hint="--methods")
    here = [d.name for d in devices if d.transport == "local"]
    if len(here) > 1:
        raise click.BadParameter(f"{', '.join(here)} all run on this host: measured at once they disturb each other; "
                                 "profile them one after the other", param_hint="--device")  # fmt: skip

    def one(device):
        return profile_model(device, model_name, root=root, tokens=parse_list(tokens, int, "--tokens"),
                             rounds=rounds, runs=runs, force=force, methods=chosen)  # fmt: skip

    if len(devices) == 1:
        _report_profile(one(devices[0]))
        return
    # several devices: each into its own table, concurrently; one failing does not stop the others
    with ThreadPoolExecutor(len(devices)) as pool:
        futures = {d.name: pool.submit(one, d) for d in devices}
    failed = []
    for name, future in futures.items():
        try:
            _report_profile(future.result(), name)
        except SpvitError as err:
            failed.append(name)
            click.echo(f"{name}: FAILED: {err}", err=True)
    if failed:
        raise SpvitError(f"{len(failed)} of {len(devices)} devices failed: {', '.join(failed)} (the others' tables "
                         "are complete; rerun with the failed ones)")  # fmt: skip


def _report_profile(result, name: str | None = None) -> None:
    head = f"{name}: " if name else ""
    click.echo(f"{head}{result.table}: {result.measured} points measured, {result.skipped} already there, "
               f"{result.parts} parts, {result.seconds:.1f} s")  # fmt: skip
    if result.plot:
        click.echo(f"{head}plot: {result.plot}")


@main.command()
@click.option("--device", "device_name", default="local", show_default=True)
@plan_options
@click.option("--threads", type=int, default=None, help="override the device's thread count")
@click.option("--tables", default="latency_tables", show_default=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@devices_option
@user_errors
def predict(device_name, model_name, keep, locations, method, package_token, threads, tables, as_json, devices_file):
    """Predicted latency of MODEL under a plan on DEVICE, from its latency table, with a breakdown."""
    import time

    from ..models import create_model
    from ..predictor import PlanLatency

    device = device_for(devices_file, device_name, threads)
    model = create_model(model_name)
    plan = build_plan(model, model_name, keep, locations, method, package_token)
    latency = PlanLatency.for_device(device, model, model_name, root=tables, methods=(plan.method,))
    start = time.perf_counter()
    pred = latency.predict(plan)
    cost_ms = (time.perf_counter() - start) * 1e3
    if as_json:
        out = {"model": model_name, "device": device.name, "plan": plan.to_dict(), **pred.as_dict(),
               "table": str(latency.table.path), "prediction_cost_ms": round(cost_ms, 3)}  # fmt: skip
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"{model_name} {plan.method} keep={list(plan.keep)} at {list(plan.locations)} on {device.name} "
               f"({device.runtime}, {device.threads} thread(s)), table {latency.table.path}")  # fmt: skip
    click.echo(f"  {prediction_line(pred)}")
    grids = [stage.start for stage in latency.layout.stages]
    stages = sorted({0, *plan.locations, *grids, len(pred.blocks_ms)})
    pooling = f" | downsampling {pred.downsample_ms:.3f} ms" if len(grids) > 1 else ""
    click.echo(f"  stem {pred.stem_ms:.3f} ms{pooling} | head {pred.head_ms:.3f} ms | selectors "
               + ", ".join(f"{s:.3f}" for s in pred.selectors_ms) + " ms")  # fmt: skip
    for a, b in itertools.pairwise(stages):
        if b > a:
            click.echo(f"  blocks {a:2d}-{b - 1:2d} at {pred.tokens_per_block[a]:4d} tokens: "
                       f"{sum(pred.blocks_ms[a:b]):8.3f} ms")  # fmt: skip


@main.command()
@click.option("--device", "device_name", default="local", show_default=True)
@click.option("--model", "model_name", default=None, help="timm model (dense unless --keep)")
@click.option("--keep", default=None, help="cumulative keep ratios, e.g. 0.7,0.49,0.343")
@click.option("--locations", default=None)
@click.option("--method", default="spvit", show_default=True)
@click.option("--package-token/--no-package-token", default=None)
@click.option("--plan", "plan_file", default=None, type=click.Path(dir_okay=False), help="a plan.yaml")
@click.option("--onnx", "onnx_file", default=None, type=click.Path(dir_okay=False), help="an ONNX file to time")
@click.option("--checkpoint", default=None, type=click.Path(dir_okay=False), help="weights for the model")
@click.option("--threads", type=int, default=None)
@click.option("--rounds", type=int, default=10, show_default=True)
@click.option("--runs", type=int, default=10, show_default=True)
@click.option("--tables", default="latency_tables", show_default=True, type=click.Path(file_okay=False))
@click.option("--calibrate", is_flag=True, help="record this measurement in the table's calibration")
@click.option("--json", "as_json", is_flag=True)
@devices_option
@user_errors
def measure(device_name, model_name, keep, locations, method, package_token, plan_file, onnx_file, checkpoint,
            threads, rounds, runs, tables, calibrate, as_json, devices_file):  # fmt: skip
    """Export and time a whole model end to end on DEVICE; print measured vs predicted."""
    from pathlib import Path

    from profilers import MeasureSettings

    from .. import prune
    from ..errors import SpvitError
    from ..latency import LatencyTableError
    from ..measure import measure_models
    from ..models import build_model, create_model
    from ..plan import PruningPlan
    from ..predictor import PlanLatency

    if sum(x is not None for x in (model_name, plan_file, onnx_file)) == 0:
        raise click.UsageError("give --model (with --keep for a pruned one), --plan or --onnx")
    if plan_file and (model_name is None) and keep is None:
        plan = PruningPlan.load(plan_file)
        model_name = plan.model
        if model_name is None:
            raise SpvitError(f"{plan_file} names no model; add 'model:' or pass --model")
    elif plan_file:
        raise click.UsageError("--plan already holds the model and keep ratios: drop --model/--keep")
    else:
        plan = None
    device = device_for(devices_file, device_name, threads)
    model = None
    if model_name is not None:
        if plan is not None:  # a plan file: a fine-tuned checkpoint's selectors load with it
            model = build_model(model_name, checkpoint, plan).eval()
        else:
            model = create_model(model_name, checkpoint=checkpoint).eval()
        if plan is None:
            from ..pruning import family_for

            dense = PruningPlan(locations=family_for(model).default_locations(model, 1), keep=(1.0,), model=model_name)
            plan = build_plan(model, model_name, keep, locations, method, package_token) if keep is not None else dense
        prune(model, plan)  # keep 1 too: nothing acts, and a Swin runs with its exact-zero shift masks
    target = Path(onnx_file) if onnx_file else model
    timings, version = measure_models(device, {"model": target}, MeasureSettings(rounds=rounds, runs=runs))
    timing = timings["model"]
    pred, why = None, None
    if model is not None:
        try:
            latency = PlanLatency.for_device(device, model, model_name, root=tables, methods=(plan.method,))
            pred = latency.predict(plan)
        except LatencyTableError as err:
            why = str(err)
    if calibrate:
        if pred is None:
            raise SpvitError(f"--calibrate needs a prediction: {why or 'give --model or --plan'}")
        latency.add_calibration_points([(plan, timing.median_ms)])
        pred = latency.predict(plan)
    error = None if pred is None else (pred.total_ms - timing.median_ms) / timing.median_ms * 100
    if as_json:
        out = {"model": model_name, "onnx": onnx_file, "device": device.name, "runtime_version": version,
               "threads": device.threads, "plan": plan.to_dict() if plan else None, "measured": timing.as_dict(),
               "prediction": pred.as_dict() if pred else None, "error_pct": None if error is None else round(error, 2),
               "no_prediction_because": why}  # fmt: skip
        click.echo(json.dumps(out, indent=2))
        return
    what = onnx_file or f"{model_name} " + ("dense" if plan.is_dense else f"{plan.method} keep={list(plan.keep)}")
    click.echo(f"{what} on {device.name} ({version}, {device.threads} thread(s))")
    click.echo(f"  measured  {timing.median_ms:8.2f} ms  (median of {timing.rounds} rounds; "
               f"p10 {timing.p10_ms:.2f}, p90 {timing.p90_ms:.2f})")  # fmt: skip
    if pred is not None:
        click.echo(f"  {prediction_line(pred)}   error {error:+.1f}%")
    elif why:
        click.echo(f"  no prediction: {why}")


@main.command()
@click.option("--device", "device_name", default="local", show_default=True)
@click.option("--model", "model_name", required=True)
@click.option("--points", type=int, default=5, show_default=True, help="dense + plans spread down to ~35% latency")
@click.option("--checkpoint", default=None, type=click.Path(dir_okay=False))
@click.option("--threads", type=int, default=None)
@click.option("--rounds", type=int, default=8, show_default=True)
@click.option("--tables", default="latency_tables", show_default=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True)
@devices_option
@user_errors
def calibrate(device_name, model_name, points, checkpoint, threads, rounds, tables, as_json, devices_file):
    """Fit MODEL's calibration (measured ≈ scale·sum of parts + offset) from whole-model runs."""
    from profilers import MeasureSettings

    from ..measure import calibrate as run_calibration

    if points < 2:
        raise click.BadParameter("at least 2 points", param_hint="--points")
    device = device_for(devices_file, device_name, threads)
    latency, measured, cal, version = run_calibration(
        device, model_name, tables, points, MeasureSettings(rounds=rounds, runs=5), checkpoint
    )
    rows = [{"method": p.method, "keep": list(p.keep), "measured_ms": round(ms, 3),
             "sum_of_parts_ms": round(latency.predict(p).parts_ms, 3),
             "calibrated_ms": round(latency.predict(p).total_ms, 3)} for p, ms in measured]  # fmt: skip
    if as_json:
        click.echo(json.dumps({"model": model_name, "device": device.name, "runtime_version": version,
                               "scale": cal.scale, "offset_ms": cal.offset_ms, "points": rows}, indent=2))  # fmt: skip
        return
    click.echo(f"{model_name} on {device.name} ({version}, {device.threads} thread(s)): {cal.describe()}")
    for r in rows:
        click.echo(f"  {r['method']:6} keep={r['keep']!s:24} measured {r['measured_ms']:8.2f} ms   "
                   f"sum of parts {r['sum_of_parts_ms']:8.2f}   calibrated {r['calibrated_ms']:8.2f}")  # fmt: skip
    click.echo(f"stored in {latency.table.meta_path}")
