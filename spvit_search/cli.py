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


if __name__ == "__main__":
    main()
