"""Commands that search and run everything: optimize, demo."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import click

from . import main
from ._common import (
    device_for,
    devices_option,
    parse_list,
    registry,
    user_errors,
)

_METHOD_HELP = "method(s), e.g. evit or spvit (default: the model's training-free method, evit; norm on Swin)"


@main.command()
@click.option("--device", "device_name", default="local", show_default=True)
@click.option("--model", "model_name", required=True, help="timm model name")
@click.option("--target-ms", type=float, default=None, help="latency budget on the device")
@click.option("--targets", default=None,
              help="several budgets in ms, e.g. 20,26,35: one search and plan per target (plan-26ms.yaml beside "
              "--out), e.g. the operating points of one weight-shared checkpoint (finetune --densities)")  # fmt: skip
@click.option("--target-share", type=float, default=None,
              help="budget as a share of the unpruned model, e.g. 0.7: judged against it measured in the same "
                   "session as each candidate (robust to a device whose speed drifts)")  # fmt: skip
@click.option("--target-flops", type=float, default=None,
              help="budget as a share of the unpruned model's FLOPs, e.g. 0.7: the same on every device, so "
                   "nothing is measured (latency is still predicted)")  # fmt: skip
@click.option("--percentile", type=float, default=None,
              help="per-image (adaptive) counts: the budget holds at this percentile of the calibration images' "
                   "predicted latencies, e.g. 95 (a fine-tuned spvit/hard checkpoint of a flat ViT)")  # fmt: skip
@click.option("--adaptive-scale", type=float, default=1.0, show_default=True,
              help="with --percentile: each image keeps scale x the sum of its keep probabilities")  # fmt: skip
@click.option("--percentile-images", type=int, default=100, show_default=True,
              help="with --percentile on the local device: calibration images each candidate's file is measured "
                   "on, one by one, beside the unpruned model (--verify-top candidates first)")  # fmt: skip
@click.option("--checkpoint", default=None, type=click.Path(dir_okay=False), help="plain (evit) or fine-tuned weights")
@click.option("--data", default="demo", show_default=True, help="calibration images: 'demo' or an ImageFolder root")
@click.option("--calib-images", type=int, default=256, show_default=True)
@click.option("--objective", type=click.Choice(["accuracy", "agreement"]), default="accuracy", show_default=True,
              help="top-1 vs labels, or vs the dense model's top-1 (no labels needed)")  # fmt: skip
@click.option("--method", "methods", default=None, help=_METHOD_HELP)
@click.option("--locations", default=None, help="selector locations (default: evenly spaced / the checkpoint's)")
@click.option("--search-locations", is_flag=True, help="search the locations too (training-free methods)")
@click.option("--stages", type=int, default=3, show_default=True)
@click.option("--trials", type=int, default=300, show_default=True)
@click.option("--min-keep-factor", type=float, default=0.3, show_default=True, help="smallest per-stage keep factor")
@click.option("--step", type=float, default=0.05, show_default=True, help="grid of the keep factors")
@click.option("--storage", default=None, help="journal:FILE, sqlite:///FILE or a PostgreSQL URL (resumable)")
@click.option("--study", "study_name", default=None, help="study name in the storage")
@click.option("--workers", type=int, default=1, show_default=True, help="processes on the shared storage")
@click.option("--heartbeat", "heartbeat_s", type=int, default=10, show_default=True,
              help="seconds between heartbeats (PostgreSQL, SQLite); 3 missed: failed, retried")  # fmt: skip
@click.option("--sampler", type=click.Choice(["tpe", "random"]), default="tpe", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--multi-objective", is_flag=True, help="accuracy vs latency Pareto front")
@click.option("--proxy", type=click.Choice(["evit", "tome", "norm"]), default=None,
              help="training-free scorer that places a learned method (spvit, hard) on a plain checkpoint "
                   "(default: evit; norm on Swin)")  # fmt: skip
@click.option(
    "--verify-top", type=int, default=3, show_default=True, help="candidates measured on the device (0: none)"
)
@click.option("--threads", type=int, default=None)
@click.option("--tables", default="latency_tables", show_default=True, type=click.Path(file_okay=False))
@click.option("--out", default="plan.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--plot", "plot_file", default=None, type=click.Path(dir_okay=False), help="PNG (default: beside --out)")
@click.option("--json", "as_json", is_flag=True)
@click.option("--drift-check/--no-drift-check", default=True, show_default=True,
              help="measure the unpruned model first; scale a stale table by it (with --verify-top > 0)")  # fmt: skip
@click.option("--worker", is_flag=True,
              help="only run trials of the shared --storage/--study (another machine's share of the search); "
                   "the lead, run without it, verifies and writes the plan")  # fmt: skip
@devices_option
@click.pass_context
@user_errors
def optimize(ctx, device_name, model_name, target_ms, targets, target_share, target_flops, percentile, adaptive_scale,
             percentile_images,
             checkpoint, data,
             calib_images, objective, methods, locations, search_locations, stages, trials, min_keep_factor, step,
             storage, study_name, workers, heartbeat_s, sampler, seed, multi_objective, proxy, verify_top, threads,
             tables, out, plot_file, as_json, drift_check, worker, devices_file):  # fmt: skip
    """Search keep ratios that meet the target on DEVICE with the best accuracy; write plan.yaml."""
    from pathlib import Path

    from ..optimize import OptimizeSettings, run_study
    from ..optimize import optimize as run_optimize

    given = [o for o, v in (("--target-ms", target_ms), ("--target-share", target_share),
                            ("--target-flops", target_flops)) if v is not None]  # fmt: skip
    if targets is None and len(given) != 1:
        raise click.UsageError("give one target: --target-ms (absolute), --target-share (of the unpruned model), "
                               "--target-flops (a share of its FLOPs) or several in ms with --targets"
                               + (f"; got {' and '.join(given)}" if given else ""))  # fmt: skip
    if methods is None or proxy is None:
        from ..models import create_model
        from ..pruning import UnsupportedModelError, family_for

        try:
            training_free = family_for(create_model(model_name)).training_free
        except UnsupportedModelError as err:
            raise click.BadParameter(str(err), param_hint="--model") from None
        methods, proxy = methods or training_free, proxy or training_free
    chosen = parse_list(methods, str, "--method")
    unknown = [m for m in chosen if m not in __import__("spvit_search").METHODS]
    if unknown:
        raise click.BadParameter(f"unknown method(s) {unknown}", param_hint="--method")
    device = device_for(devices_file, device_name, threads)
    settings = OptimizeSettings(
        target_ms=target_ms, checkpoint=checkpoint, data=data, calib_images=calib_images, objective=objective,
        methods=chosen, locations=parse_list(locations, int, "--locations"), search_locations=search_locations,
        stages=stages, trials=trials, min_factor=min_keep_factor, step=step, storage=storage, study=study_name,
        workers=workers, heartbeat_s=heartbeat_s, sampler=sampler, seed=None if worker else seed,
        multi_objective=multi_objective, proxy=proxy, verify_top=verify_top, target_share=target_share,
        target_flops=target_flops, percentile=percentile, adaptive_scale=adaptive_scale,
        percentile_images=percentile_images,
        tables=tables, progress=not as_json, drift_check=drift_check,
    )  # fmt: skip
    argv = [a for a in sys.argv[1:] if a != "--worker"]
    if worker:
        if settings.storage is None:
            raise click.UsageError("--worker joins a shared study: give its --storage (and --study)")
        study = run_study(model_name, device, settings, worker_argv=argv, worker_only=True)[0]
        ran = sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get("pid") == os.getpid())
        click.echo(f"worker: ran {ran} trial(s) of study {study.study_name!r}", err=True)
        return
    budgets = [None] if targets is None else parse_list(targets, float, "--targets")
    if targets is not None and (given or workers > 1):
        raise click.UsageError("--targets runs one search per target: give it instead of --target-ms/--target-share/"
                               "--target-flops, without --workers")  # fmt: skip
    summaries = []
    for budget in budgets:
        each, plan_out, plot_out = settings, out, plot_file
        if budget is not None:  # one plan per target for the one checkpoint: plan-26ms.yaml beside --out
            each = dataclasses.replace(settings, target_ms=budget)
            plan_out = Path(out).with_name(f"{Path(out).stem}-{budget:g}ms{Path(out).suffix}")
            plot_out = None
        result = run_optimize(model_name, device, each, plan_out, worker_argv=argv)
        summaries.append(_report(result, each, model_name, device, plan_out, plot_out, multi_objective, as_json))
    if as_json:
        click.echo(json.dumps(summaries[0] if targets is None else summaries, indent=2, default=str))


def _report(result, settings, model_name, device, out, plot_file, multi_objective: bool, as_json: bool) -> dict:
    """Plot one search, print its summary (unless ``as_json``) and return it as a dict."""
    from pathlib import Path

    from ..optimize import plot_trials

    target_ms = settings.target_ms  # with --target-share: the budget the chosen plan was measured against
    target = f"{target_ms:g} ms" if target_ms is not None else f"{settings.target_flops:g} of the unpruned FLOPs"
    png = plot_trials(result, settings, plot_file or Path(out).with_suffix(".png"),
                      f"{model_name} on {device.name}, target {target}")  # fmt: skip
    plan = result.plan
    summary = {
        "plan_file": str(out), "plot": str(png), "plan": plan.to_dict(), "accuracy": result.accuracy,
        "target_ms": target_ms, "predicted_ms": result.predicted_ms, "measured_ms": result.measured_ms,
        "fastest_ms": result.fastest_ms, "trials": result.counts, "seconds": round(result.seconds, 1),
        "candidates": result.candidates, "scored_by": result.proxy or plan.method, "drift": result.drift,
        "table_off_by": round(result.stale, 4), "measurements": result.measurements,
        "unpruned_session_ms": result.anchor_ms,
        "target_flops": settings.target_flops, "flops_share": result.flops_share, "adaptive": result.adaptive,
        "warning": result.warning,
    }  # fmt: skip
    if multi_objective:
        summary["pareto_front"] = [
            {"trial": t.number, "accuracy": t.values[0], "predicted_ms": t.values[1], "keep": t.user_attrs["keep"],
             "method": t.user_attrs["method"], "locations": t.user_attrs["locations"]}
            for t in sorted(result.study.best_trials, key=lambda t: t.values[1])
        ]  # fmt: skip
    if as_json:
        return summary
    c = result.counts
    measured = "not measured" if result.measured_ms is None else f"measured {result.measured_ms:.3f} ms"
    click.echo(f"{out}: {model_name} {plan.method} keep={list(plan.keep)} at {list(plan.locations)}, "
               f"calibration top-1 {result.accuracy:.2f}%")  # fmt: skip
    if result.proxy:
        click.echo(f"  placed with {result.proxy}'s training-free scores (the checkpoint has no trained selectors); "
                   f"fine-tune {plan.method} at this plan: spvit-search finetune --plan {out}")  # fmt: skip
    if result.adaptive is not None:
        a, q, images = result.adaptive, f"p{settings.percentile:g}", result.study.user_attrs.get("calib_images")
        click.echo(f"  adaptive counts (scale {a['scale']:g}), predicted over {images} calibration images: "
                   f"{q} {a[f'predicted_{q}_ms']:.3f} ms against the target {target}, p50 {a['predicted_p50_ms']:.3f}, "
                   f"mean {a['predicted_mean_ms']:.3f} (the plan's fixed counts: {a['fixed_counts_ms']:.3f}); "
                   f"mean tokens kept per stage {a['mean_counts']}")  # fmt: skip
        if f"measured_{q}_ms" in a:
            click.echo(f"  measured image by image over {a['measured_images']} calibration images on "
                       f"{device.name}: {q} {a[f'measured_{q}_ms']:.3f} ms, p50 {a['measured_p50_ms']:.3f}, "
                       f"mean {a['measured_mean_ms']:.3f}; the unpruned model alongside "
                       f"{a['unpruned_measured_ms']:.3f} ms")  # fmt: skip
            for r in result.candidates:
                flag = "  over its budget, dropped" if r["over_target"] else ""
                click.echo(f"  {'':4}trial {r['trial']:4d} keep {r['keep']!s:22} {r['accuracy']:6.2f}%  "
                           f"predicted {q} {r['predicted_ms']:.3f}, measured {r['measured_ms']:.3f} "
                           f"of {r['budget_ms']:.3f}{flag}")  # fmt: skip
        else:
            click.echo(f"  not measured: {a['not_measured']}; run it with set_adaptive(model, "
                       f"AdaptiveCount(scale={a['scale']:g})) (export_onnx_adaptive)")  # fmt: skip
    elif result.flops_share is not None:
        click.echo(f"  target {target} | the plan's FLOPs {result.flops_share:.3f} of the unpruned model's")
        click.echo(f"  predicted {result.predicted_ms:.3f} ms on {device.name} ({device.runtime}, {device.threads} "
                   "thread(s)); not measured: a FLOPs budget has nothing to verify on a device")  # fmt: skip
    else:
        click.echo(f"  target {target} | predicted {result.predicted_ms:.3f} ms | {measured} "
                   f"on {device.name} ({device.runtime}, {device.threads} thread(s)); fastest possible "
                   f"{result.fastest_ms:.3f} ms")  # fmt: skip
    click.echo(f"  {c['trials']} trials: {c['evaluated']} evaluated, {c['duplicates']} duplicates reused, "
               f"{c['pruned']} pruned early, {c['infeasible']} infeasible (not evaluated); "
               f"{result.seconds:.1f} s")  # fmt: skip
    if result.candidates and result.adaptive is None:
        click.echo("  measured on the device:   trial  method  keep                    top-1   predicted  measured"
                   "  (raw, unpruned alongside)")  # fmt: skip
        for r in result.candidates:
            flag = "  over target, dropped" if r["over_target"] else ""
            click.echo(f"  {'':24}{r['trial']:5d}  {r['method']:6}  {r['keep']!s:22} {r['accuracy']:6.2f}%  "
                       f"{r['predicted_ms']:8.3f}  {r['measured_ms']:8.3f}  ({r['raw_ms']:.3f}, "
                       f"{r['reference_ms']:.3f}){flag}")  # fmt: skip
        click.echo(
            "  measured = raw / the unpruned model measured alongside × its latency this session "
            f"({result.anchor_ms:.3f} ms): sessions of the device differ, ratios within one hold"
        )
    if abs(result.stale - 1.0) >= 0.03 or abs(result.drift - 1.0) >= 0.03:
        off = result.stale
        way = "fast" if off > 1 else "slow"
        what = "the unpruned model" if settings.drift_check else "the first candidates"
        click.echo(f"  the table predicted {what} {abs(off - 1) * 100:.0f}% {way} "
                   f"(measured ×{off:.3f}; stale, or measured in another state of the device): ranked with this "
                   f"session's measurements (×{result.drift:.3f}); re-profile the device if "
                   "this persists")  # fmt: skip
    if result.measurements:
        click.echo(f"  whole-model measurements on the device: {result.measurements}")
    if result.warning:
        click.echo(f"  warning: {result.warning}")
    if multi_objective:
        click.echo(f"  Pareto front: {len(summary['pareto_front'])} plans (see --json)")
    click.echo(f"  plot: {png}")
    return summary


@main.command()
@click.option("--device", "device_name", default="local", show_default=True)
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--target-ratio", type=float, default=0.85, show_default=True, help="target = ratio × dense latency")
@click.option("--target-ms", type=float, default=None, help="an absolute target instead")
@click.option("--dense-epochs", type=int, default=50, show_default=True)
@click.option("--finetune-epochs", type=int, default=30, show_default=True)
@click.option("--trials", type=int, default=300, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@devices_option
@user_errors
def demo(device_name, out, target_ratio, target_ms, dense_epochs, finetune_epochs, trials, as_json, devices_file):
    """End to end on this host: train, profile, optimize, fine-tune, export, measure."""
    from pathlib import Path

    from ..demo import DemoSettings, run_demo

    settings = DemoSettings(Path(out), target_ratio, target_ms, dense_epochs, finetune_epochs, trials, not as_json)
    s = run_demo(registry(devices_file).get(device_name), settings)
    if as_json:
        click.echo(json.dumps(s, indent=2, default=str))
        return
    d, p = s["dense"], s["pruned"]
    plan = p["plan"]
    click.echo(f"\n{'':24}{'test top-1':>11}{'GMACs':>9}{'latency (ms)':>15}   on {s['device']}, {s['runtime']}, "
               f"{s['threads']} thread(s)")  # fmt: skip
    click.echo(f"{'dense vit_demo_digits':24}{d['test_top1']:10.2f}%{d['gmacs']:9.4f}{d['measured_ms']:12.3f} "
               "measured, beside the exported file")  # fmt: skip
    share = p["exported_onnx_ms"] / d["measured_ms"]
    click.echo(f"{'SPViT ' + plan['method'] + ' pruned':24}{p['test_top1']:10.2f}%{p['gmacs']:9.4f}"
               f"{p['exported_onnx_ms']:12.3f} measured, the exported file ({share:.2f} × dense)")  # fmt: skip
    click.echo(f"target {s['target_ms']:g} ms | predicted {p['predicted_ms']:.3f} ms | verified in optimize "
               f"{p['measured_ms']:.3f} ms | keep {plan['keep']} before blocks {plan['locations']} | ONNX same "
               f"top-1 {p['onnx_same_top1']}")  # fmt: skip
    click.echo(f"done in {s['seconds']:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in s["steps_seconds"].items()))
    click.echo(f"files: {s['files']['plan']}, {s['files']['onnx']}, plots {', '.join(s['files']['plots'])}")


@main.command()
@click.option("--device", "device_name", default="local", show_default=True)
@click.option("--model", "model_name", required=True, help="timm model name (a flat ViT)")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="the dense teacher's weights")
@click.option("--target-ms", type=float, default=None, help="latency budget: the deepest model measured within it")
@click.option("--depth", type=int, default=None, help="take this many blocks instead (no measurement of others)")
@click.option("--threads", type=int, default=None)
@click.option("--rounds", type=int, default=8, show_default=True)
@click.option("--runs", type=int, default=10, show_default=True)
@click.option("--out", default="runs/shrink/model.pt", show_default=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@devices_option
@user_errors
def shrink(device_name, model_name, checkpoint, target_ms, depth, threads, rounds, runs, out, as_json, devices_file):
    """The smaller-dense baseline: the teacher with fewer blocks, the deepest one measured within --target-ms.

    Writes the shallower model initialised from the teacher's blocks; distil it with
    `spvit-search train --checkpoint OUT --teacher CHECKPOINT`.
    """
    from pathlib import Path

    from profilers import MeasureSettings

    from ..smaller import measure_depths, pick_depth, save_shallower, shallower

    if (target_ms is None) == (depth is None):
        raise click.UsageError("give --target-ms (measure every depth, take the deepest that fits) or --depth")
    device = device_for(devices_file, device_name, threads)
    candidates = []
    if depth is None:
        candidates = measure_depths(device, model_name, checkpoint, MeasureSettings(rounds=rounds, runs=runs))
        depth = pick_depth(candidates, target_ms).depth
    model, blocks = shallower(model_name, checkpoint, depth)
    path = save_shallower(model, out)
    summary = {"checkpoint": str(path), "model": model_name, "teacher": str(checkpoint), "depth": depth,
               "blocks": list(blocks), "target_ms": target_ms, "device": device.name,
               "candidates": [c.as_dict() for c in candidates]}  # fmt: skip
    Path(path).with_suffix(".json").write_text(json.dumps(summary, indent=1))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    if candidates:
        click.echo(f"measured on {device.name} ({device.runtime}, {device.threads} thread(s)), target {target_ms:g} ms")
        click.echo("  depth  blocks                 GMACs   measured ms")
        for c in candidates:
            mark = "  <- chosen" if c.depth == depth else ("  over target" if c.measured_ms > target_ms else "")
            click.echo(f"  {c.depth:5d}  {list(c.blocks)!s:20} {c.gmacs:7.4f}  {c.measured_ms:10.3f}{mark}")
    click.echo(
        f"{path}: {model_name} with {depth} blocks (teacher's {list(blocks)}); distil it with\n"
        f"  spvit-search train --model {model_name} --checkpoint {path} --teacher {checkpoint}"
    )
