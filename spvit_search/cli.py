"""The ``spvit-search`` command line: one sub-command per step of the data flow."""

from __future__ import annotations

import functools
import itertools
import json
import sys

import click

from .errors import SpvitError


def _parse_list(text: str | None, kind: type, name: str):
    if text is None:
        return None
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated {kind.__name__}s, got {text!r}", param_hint=name) from None


def user_errors(fn):
    """Turn a SpvitError into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SpvitError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)

    return wrapper


def plan_options(fn):
    """--model/--keep/--locations/--method/--package-token, shared by commands that build a plan."""
    options = [
        click.option("--model", "model_name", required=True, help="timm model name, e.g. deit_small_patch16_224"),
        click.option("--keep", required=True, help="cumulative keep ratios per stage, e.g. 0.7,0.49,0.343"),
        click.option("--locations", default=None, help="selector block indices (default: evenly spaced)"),
        click.option("--method", default="spvit", show_default=True, help="spvit | hard | evit"),
        click.option("--package-token/--no-package-token", default=None, help="default: the method's"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def build_plan(model, model_name: str, keep: str, locations: str | None, method: str, package_token: bool | None):
    from .plan import PruningPlan, default_locations
    from .pruning import family_for

    depth = family_for(model).depth(model)
    keep_t = _parse_list(keep, float, "--keep")
    locs = _parse_list(locations, int, "--locations") or default_locations(depth, len(keep_t))
    return PruningPlan(locations=locs, keep=keep_t, method=method, package_token=package_token, model=model_name)


@click.group()
@click.version_option(package_name="spvit-search")
def main() -> None:
    """Make vision transformers meet a device's latency budget with the least accuracy loss."""


@main.command()
@plan_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@user_errors
def flops(model_name, keep, locations, method, package_token, as_json):
    """FLOPs of MODEL dense and under a pruning plan (attention counted)."""
    from . import count_flops, prune
    from .models import create_model

    model = create_model(model_name).eval()
    plan = build_plan(model, model_name, keep, locations, method, package_token)
    dense = count_flops(model)
    prune(model, plan)
    pruned = count_flops(model)
    result = {
        "model": model_name,
        "method": plan.method,
        "locations": list(plan.locations),
        "keep": list(plan.keep),
        "package_token": plan.package_token,
        "dense_gmacs": round(dense.gmacs, 4),
        "pruned_gmacs": round(pruned.gmacs, 4),
        "reduction": round(dense.macs / pruned.macs, 4),
        "tokens_per_block": list(plan.tokens_per_block(model)),
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{model_name}  method={plan.method}  locations={list(plan.locations)}  keep={list(plan.keep)}")
    click.echo(f"  dense   {dense.gmacs:8.3f} GMACs ({dense.gflops:.3f} GFLOPs)")
    click.echo(f"  pruned  {pruned.gmacs:8.3f} GMACs ({pruned.gflops:.3f} GFLOPs)")
    click.echo(f"  reduction {result['reduction']:.3f}x   tokens per block {result['tokens_per_block']}")


def devices_option(fn):
    return click.option(
        "--devices", "devices_file", default=None, type=click.Path(dir_okay=False),
        help="device registry (default: $SPVIT_DEVICES, else ./devices.yaml, else only 'local')",
    )(fn)  # fmt: skip


def _registry(devices_file):
    from .devices import DeviceRegistry

    return DeviceRegistry.load(devices_file)


@main.group(invoke_without_command=True)
@devices_option
@click.pass_context
@user_errors
def devices(ctx, devices_file):
    """List the devices of the registry (or check one: devices check NAME)."""
    ctx.obj = devices_file
    if ctx.invoked_subcommand is not None:
        return
    registry = _registry(devices_file)
    click.echo(f"devices in {registry.source}:")
    for name in registry.names:
        raw = registry.raw(name)
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
@click.pass_obj
@user_errors
def devices_check(devices_file, name):
    """Reachability, runtime presence and version, CPU and thermal state of device NAME."""
    from profilers import make_profiler

    device = _registry(devices_file).get(name)
    profiler = make_profiler(device)
    failed = False
    try:
        profiler.open()
    except Exception as err:  # the one place that reports instead of raising: say what failed
        click.echo(f"  {'reach':12} FAIL  {err}")
        sys.exit(2)
    try:
        for item in profiler.check():
            failed |= not item.ok
            click.echo(f"  {item.what:12} {'ok  ' if item.ok else 'FAIL'}  {item.detail}")
    finally:
        profiler.close()
    if failed:
        sys.exit(2)


@main.command()
@click.option("--device", "device_name", default="local", show_default=True, help="device name in the registry")
@click.option("--model", "model_name", required=True, help="timm model name")
@click.option("--tokens", default=None, help="token counts to measure (default: a sparse grid per part)")
@click.option("--threads", type=int, default=None, help="override the device's thread count")
@click.option("--rounds", type=int, default=10, show_default=True, help="interleaved rounds per point")
@click.option("--runs", type=int, default=10, show_default=True, help="runs per point per round")
@click.option("--force", is_flag=True, help="re-measure points already in the table")
@click.option("--out", "root", default="latency_tables", show_default=True, type=click.Path(file_okay=False))
@click.option("--methods", default="spvit,hard,evit", show_default=True, help="selectors to measure")
@devices_option
@user_errors
def profile(device_name, model_name, tokens, threads, rounds, runs, force, root, methods, devices_file):
    """Measure per-part latency vs token count of MODEL on DEVICE into latency_tables/."""
    from .plan import METHODS
    from .profile import profile_model

    device = _registry(devices_file).get(device_name)
    if threads is not None:
        device = device.model_copy(update={"threads": threads})
    chosen = _parse_list(methods, str, "--methods")
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise click.BadParameter(f"unknown methods {unknown}; known: {list(METHODS)}", param_hint="--methods")
    result = profile_model(
        device, model_name, root=root, tokens=_parse_list(tokens, int, "--tokens"), rounds=rounds, runs=runs,
        force=force, methods=chosen,
    )  # fmt: skip
    click.echo(
        f"{result.table}: {result.measured} points measured, {result.skipped} already there, "
        f"{result.parts} parts, {result.seconds:.1f} s"
    )
    if result.plot:
        click.echo(f"plot: {result.plot}")


def _device(devices_file, name: str, threads: int | None):
    device = _registry(devices_file).get(name)
    return device if threads is None else device.model_copy(update={"threads": threads})


def _prediction_line(pred) -> str:
    return f"predicted {pred.total_ms:8.2f} ms  (sum of parts {pred.parts_ms:.2f} ms, {pred.calibration.describe()})"


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

    from .models import create_model
    from .predictor import PlanLatency

    device = _device(devices_file, device_name, threads)
    model = create_model(model_name)
    plan = build_plan(model, model_name, keep, locations, method, package_token)
    latency = PlanLatency.for_device(device, model, model_name, root=tables)
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
    click.echo(f"  {_prediction_line(pred)}")
    stages = [0, *plan.locations, len(pred.blocks_ms)]
    click.echo(f"  stem {pred.stem_ms:.3f} ms | head {pred.head_ms:.3f} ms | selectors "
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

    from . import prune
    from .errors import SpvitError
    from .latency import LatencyTableError
    from .measure import measure_models
    from .models import create_model
    from .plan import PruningPlan
    from .predictor import PlanLatency

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
    device = _device(devices_file, device_name, threads)
    model = None
    if model_name is not None:
        model = create_model(model_name, checkpoint=checkpoint).eval()
        if plan is None:
            from .plan import default_locations
            from .pruning import family_for

            depth = family_for(model).depth(model)
            plan = (build_plan(model, model_name, keep, locations, method, package_token) if keep is not None
                    else PruningPlan(locations=default_locations(depth, 1), keep=(1.0,), model=model_name))  # fmt: skip
        if not plan.is_dense:
            prune(model, plan)
    target = Path(onnx_file) if onnx_file else model
    timings, version = measure_models(device, {"model": target}, MeasureSettings(rounds=rounds, runs=runs))
    timing = timings["model"]
    pred, why = None, None
    if model is not None:
        try:
            latency = PlanLatency.for_device(device, model, model_name, root=tables)
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
        click.echo(f"  {_prediction_line(pred)}   error {error:+.1f}%")
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

    from .measure import calibrate as run_calibration

    if points < 2:
        raise click.BadParameter("at least 2 points", param_hint="--points")
    device = _device(devices_file, device_name, threads)
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


def train_options(fn):
    """Options shared by train and finetune."""
    options = [
        click.option("--data", default="demo", show_default=True, help="'demo' or an ImageFolder root"),
        click.option("--batch-size", type=int, default=64, show_default=True, help="global batch"),
        click.option("--weight-decay", type=float, default=0.05, show_default=True),
        click.option("--augment/--no-augment", default=True, show_default=True),
        click.option("--resume/--no-resume", default=True, show_default=True, help="continue from OUT/last.pt"),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--workers", type=int, default=0, show_default=True, help="data loader processes"),
        click.option("--device", "torch_device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _final_test(model, data: str, result) -> float:
    """Top-1 on the test split, printed once (rank 0)."""
    import os

    import torch

    from .data import build_dataset
    from .train import evaluate

    if int(os.environ.get("RANK", "0")) != 0:
        return float("nan")
    acc, _ = evaluate(model, build_dataset(data, "test", model), torch.device("cpu") if not next(
        model.parameters()).is_cuda else next(model.parameters()).device)  # fmt: skip
    click.echo(f"test top-1 {acc:.2f}% (eval split {result.eval_acc:.2f}%); weights: {result.model_file}")
    return acc


@main.command()
@click.option("--model", "model_name", default="vit_demo_digits", show_default=True, help="timm model name")
@click.option("--checkpoint", default=None, type=click.Path(dir_okay=False), help="initial weights")
@click.option("--out", default="runs/dense", show_default=True, type=click.Path(file_okay=False))
@click.option("--epochs", type=int, default=50, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--warmup-epochs", type=float, default=3.0, show_default=True)
@train_options
@user_errors
def train(model_name, checkpoint, out, epochs, lr, warmup_epochs, data, batch_size, weight_decay, augment, resume,
          seed, workers, torch_device):  # fmt: skip
    """Train a dense model (the demo's model and teacher by default) from scratch or a checkpoint."""
    import torch

    from .data import num_classes
    from .models import build_model
    from .train import TrainConfig, fit

    torch.manual_seed(seed)  # the same initial weights in every process and every rerun
    model = build_model(model_name, checkpoint, num_classes=num_classes(data))
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      warmup_epochs=warmup_epochs, augment=augment, seed=seed, workers=workers, device=torch_device,
                      resume=resume)  # fmt: skip
    result = fit(model, data, cfg, out, model_name=model_name)
    _final_test(model, data, result)


@main.command()
@click.option("--plan", "plan_file", required=True, type=click.Path(dir_okay=False), help="plan.yaml (from optimize)")
@click.option("--checkpoint", default=None, type=click.Path(dir_okay=False), help="dense weights of plan.model")
@click.option(
    "--teacher", default=None, type=click.Path(dir_okay=False), help="teacher weights (default: --checkpoint)"
)
@click.option("--out", default="runs/finetune", show_default=True, type=click.Path(file_okay=False))
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True, help="backbone learning rate")
@click.option(
    "--selector-lr-scale", type=float, default=10.0, show_default=True, help="selectors learn this much faster"
)
@click.option("--warmup-epochs", type=float, default=1.0, show_default=True)
@click.option("--selector-warmup", type=int, default=1, show_default=True, help="epochs training only the selectors")
@click.option("--ratio-weight", type=float, default=50.0, show_default=True, help="kept fraction vs target")
@click.option("--distill-weight", type=float, default=0.5, show_default=True, help="logits KL to the teacher")
@click.option("--token-weight", type=float, default=0.5, show_default=True, help="MSE on kept tokens")
@click.option("--latency-weight", type=float, default=0.0, show_default=True, help="latency-aware loss weight")
@click.option("--target-ms", type=float, default=None, help="latency target of the latency-aware loss")
@click.option("--latency-device", default=None, help="device whose table the latency loss reads (default: plan's)")
@click.option("--tables", default="latency_tables", show_default=True, type=click.Path(file_okay=False))
@train_options
@devices_option
@user_errors
def finetune(plan_file, checkpoint, teacher, out, epochs, lr, selector_lr_scale, warmup_epochs, selector_warmup,
             ratio_weight,
             distill_weight, token_weight, latency_weight, target_ms, latency_device, tables, data, batch_size,
             weight_decay, augment, resume, seed, workers, torch_device, devices_file):  # fmt: skip
    """Soft-pruning fine-tune of plan.model under PLAN: task + ratio + distillation (+ latency) loss."""
    from pathlib import Path

    import torch

    from .data import num_classes
    from .errors import SpvitError
    from .losses import LatencyPenalty
    from .models import build_model
    from .plan import PruningPlan
    from .train import TrainConfig, fit

    plan = PruningPlan.load(plan_file)
    if plan.model is None:
        raise SpvitError(f"{plan_file} names no model (key 'model')")
    classes = num_classes(data)
    torch.manual_seed(seed)  # the same fresh selectors in every process and every rerun
    teacher_model = None
    if teacher or checkpoint:
        teacher_model = build_model(plan.model, teacher or checkpoint, num_classes=classes).eval()
    else:
        click.echo("warning: no --checkpoint or --teacher: fine-tuning from random weights without distillation")
    model = build_model(plan.model, checkpoint, plan, num_classes=classes)
    penalty = None
    if latency_weight > 0:
        target_ms = target_ms or plan.target_ms
        if target_ms is None:
            raise SpvitError("--latency-weight needs --target-ms (or a plan with target_ms)")
        from .predictor import PlanLatency

        device = _registry(devices_file).get(latency_device or plan.device or "local")
        latency = PlanLatency.for_device(device, build_model(plan.model, num_classes=classes), plan.model, root=tables)
        penalty = LatencyPenalty(latency, plan, target_ms)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      warmup_epochs=warmup_epochs, selector_warmup_epochs=selector_warmup, ratio_weight=ratio_weight,
                      selector_lr_scale=selector_lr_scale,
                      distill_weight=distill_weight if teacher_model is not None else 0.0,
                      token_distill_weight=token_weight if teacher_model is not None else 0.0,
                      latency_weight=latency_weight, augment=augment, seed=seed, workers=workers,
                      device=torch_device, resume=resume)  # fmt: skip
    result = fit(model, data, cfg, out, model_name=plan.model, plan=plan, teacher=teacher_model,
                 latency_penalty=penalty)  # fmt: skip
    plan.save(Path(out) / "plan.yaml")
    _final_test(model, data, result)


@main.command()
@click.option("--plan", "plan_file", default=None, type=click.Path(dir_okay=False), help="plan.yaml of the model")
@click.option("--model", "model_name", default=None, help="timm model (a dense export, without --plan)")
@click.option("--checkpoint", default=None, type=click.Path(dir_okay=False), help="weights (fine-tuned or dense)")
@click.option("--format", "fmt", type=click.Choice(["onnx", "tflite"]), default="onnx", show_default=True)
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="output file (default: beside --checkpoint)")
@click.option("--data", default="demo", show_default=True, help="data whose test split verifies the export")
@click.option("--verify/--no-verify", default=True, show_default=True, help="compare top-1 with torch on test")
@user_errors
def export(plan_file, model_name, checkpoint, fmt, out, data, verify):
    """Export a (fine-tuned) pruned model to ONNX or TFLite and check it agrees with torch."""
    from pathlib import Path

    from .errors import SpvitError
    from .export import export_onnx, export_tflite, verify_export
    from .models import build_model
    from .plan import PruningPlan

    plan = PruningPlan.load(plan_file) if plan_file else None
    name = model_name or (plan.model if plan else None)
    if name is None:
        raise SpvitError("give --plan (with a model) or --model")
    model = build_model(name, checkpoint, plan).eval()
    if out is None:
        base = Path(checkpoint).with_suffix("") if checkpoint else Path(name)
        out = base.with_name(base.name + ("-pruned" if plan and not plan.is_dense else "")).with_suffix(f".{fmt}")
    path = (export_onnx if fmt == "onnx" else export_tflite)(model, out)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if verify:
        report = verify_export(model, path, data)
        click.echo(f"test split: torch top-1 {report['torch_acc']:.2f}%, {fmt} top-1 {report['export_acc']:.2f}%, "
                   f"same top-1 on {report['agree']}/{report['images']} images")  # fmt: skip
        if report["agree"] != report["images"]:
            raise SpvitError(f"{report['images'] - report['agree']} test images get another top-1 from {path}")


@main.command()
@click.option("--device", "device_name", default="local", show_default=True)
@click.option("--model", "model_name", required=True, help="timm model name")
@click.option("--target-ms", type=float, required=True, help="latency budget on the device")
@click.option("--checkpoint", default=None, type=click.Path(dir_okay=False), help="plain (evit) or fine-tuned weights")
@click.option("--data", default="demo", show_default=True, help="calibration images: 'demo' or an ImageFolder root")
@click.option("--calib-images", type=int, default=256, show_default=True)
@click.option("--objective", type=click.Choice(["accuracy", "agreement"]), default="accuracy", show_default=True,
              help="top-1 vs labels, or vs the dense model's top-1 (no labels needed)")  # fmt: skip
@click.option("--method", "methods", default="evit", show_default=True, help="method(s), e.g. evit or spvit")
@click.option("--locations", default=None, help="selector locations (default: evenly spaced / the checkpoint's)")
@click.option("--search-locations", is_flag=True, help="search the locations too (training-free methods)")
@click.option("--stages", type=int, default=3, show_default=True)
@click.option("--trials", type=int, default=300, show_default=True)
@click.option("--min-keep-factor", type=float, default=0.3, show_default=True, help="smallest per-stage keep factor")
@click.option("--step", type=float, default=0.05, show_default=True, help="grid of the keep factors")
@click.option("--storage", default=None, help="journal:FILE, sqlite:///FILE or a PostgreSQL URL (resumable)")
@click.option("--study", "study_name", default=None, help="study name in the storage")
@click.option("--workers", type=int, default=1, show_default=True, help="processes on the shared storage")
@click.option("--sampler", type=click.Choice(["tpe", "random"]), default="tpe", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--multi-objective", is_flag=True, help="accuracy vs latency Pareto front")
@click.option(
    "--verify-top", type=int, default=3, show_default=True, help="candidates measured on the device (0: none)"
)
@click.option("--threads", type=int, default=None)
@click.option("--tables", default="latency_tables", show_default=True, type=click.Path(file_okay=False))
@click.option("--out", default="plan.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--plot", "plot_file", default=None, type=click.Path(dir_okay=False), help="PNG (default: beside --out)")
@click.option("--json", "as_json", is_flag=True)
@click.option("--worker", is_flag=True, hidden=True)
@devices_option
@click.pass_context
@user_errors
def optimize(ctx, device_name, model_name, target_ms, checkpoint, data, calib_images, objective, methods, locations,
             search_locations, stages, trials, min_keep_factor, step, storage, study_name, workers, sampler, seed,
             multi_objective, verify_top, threads, tables, out, plot_file, as_json, worker, devices_file):  # fmt: skip
    """Search keep ratios that meet --target-ms on DEVICE with the best accuracy; write plan.yaml."""
    from pathlib import Path

    from .optimize import OptimizeSettings, plot_trials, run_study
    from .optimize import optimize as run_optimize

    chosen = _parse_list(methods, str, "--method")
    unknown = [m for m in chosen if m not in __import__("spvit_search").METHODS]
    if unknown:
        raise click.BadParameter(f"unknown method(s) {unknown}", param_hint="--method")
    device = _device(devices_file, device_name, threads)
    settings = OptimizeSettings(
        target_ms=target_ms, checkpoint=checkpoint, data=data, calib_images=calib_images, objective=objective,
        methods=chosen, locations=_parse_list(locations, int, "--locations"), search_locations=search_locations,
        stages=stages, trials=trials, min_factor=min_keep_factor, step=step, storage=storage, study=study_name,
        workers=workers, sampler=sampler, seed=None if worker else seed, multi_objective=multi_objective,
        verify_top=verify_top, tables=tables, progress=not as_json,
    )  # fmt: skip
    if worker:
        run_study(model_name, device, settings, worker_only=True)
        return
    argv = [a for a in sys.argv[1:] if a != "--worker"]
    result = run_optimize(model_name, device, settings, out, worker_argv=argv)
    png = plot_trials(result, settings, plot_file or Path(out).with_suffix(".png"),
                      f"{model_name} on {device.name}, target {target_ms:g} ms")  # fmt: skip
    plan = result.plan
    summary = {
        "plan_file": str(out), "plot": str(png), "plan": plan.to_dict(), "accuracy": result.accuracy,
        "target_ms": target_ms, "predicted_ms": result.predicted_ms, "measured_ms": result.measured_ms,
        "fastest_ms": result.fastest_ms, "trials": result.counts, "seconds": round(result.seconds, 1),
        "candidates": result.candidates,
    }  # fmt: skip
    if multi_objective:
        summary["pareto_front"] = [
            {"trial": t.number, "accuracy": t.values[0], "predicted_ms": t.values[1], "keep": t.user_attrs["keep"],
             "method": t.user_attrs["method"], "locations": t.user_attrs["locations"]}
            for t in sorted(result.study.best_trials, key=lambda t: t.values[1])
        ]  # fmt: skip
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    c = result.counts
    measured = "not measured" if result.measured_ms is None else f"measured {result.measured_ms:.3f} ms"
    click.echo(f"{out}: {model_name} {plan.method} keep={list(plan.keep)} at {list(plan.locations)}, "
               f"calibration top-1 {result.accuracy:.2f}%")  # fmt: skip
    click.echo(f"  target {target_ms:g} ms | predicted {result.predicted_ms:.3f} ms | {measured} "
               f"on {device.name} ({device.runtime}, {device.threads} thread(s)); fastest possible "
               f"{result.fastest_ms:.3f} ms")  # fmt: skip
    click.echo(f"  {c['trials']} trials: {c['evaluated']} evaluated, {c['duplicates']} duplicates reused, "
               f"{c['pruned']} pruned early, {c['infeasible']} infeasible (not evaluated); "
               f"{result.seconds:.1f} s")  # fmt: skip
    if result.candidates:
        click.echo("  measured on the device:   trial  method  keep                    top-1   predicted  measured")
        for r in result.candidates:
            flag = "  over target, dropped" if r["over_target"] else ""
            click.echo(f"  {'':24}{r['trial']:5d}  {r['method']:6}  {r['keep']!s:22} {r['accuracy']:6.2f}%  "
                       f"{r['predicted_ms']:8.3f}  {r['measured_ms']:8.3f}{flag}")  # fmt: skip
    if multi_objective:
        click.echo(f"  Pareto front: {len(summary['pareto_front'])} plans (see --json)")
    click.echo(f"  plot: {png}")


if __name__ == "__main__":
    main()
