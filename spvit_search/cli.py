"""The ``spvit-search`` command line: one sub-command per step of the data flow."""

from __future__ import annotations

import functools
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


if __name__ == "__main__":
    main()
