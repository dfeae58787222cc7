"""spvit-search flops: the cost of a model under a plan."""

from __future__ import annotations

import json

import click

from . import main
from ._common import (
    build_plan,
    plan_options,
    user_errors,
)


@main.command()
@plan_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@user_errors
def flops(model_name, keep, locations, method, package_token, as_json):
    """FLOPs of MODEL dense and under a pruning plan (attention counted)."""
    from .. import count_flops, prune
    from ..models import create_model

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
