"""Commands of the training side: train, finetune, export."""

from __future__ import annotations

import click

from . import main
from ._common import (
    devices_option,
    final_test,
    registry,
    train_options,
    user_errors,
)


@main.command()
@click.option("--model", "model_name", default="vit_demo_digits", show_default=True, help="timm model name")
@click.option("--checkpoint", default=None, type=click.Path(dir_okay=False), help="initial weights")
@click.option("--out", default="runs/dense", show_default=True, type=click.Path(file_okay=False))
@click.option("--epochs", type=int, default=50, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--warmup-epochs", type=float, default=3.0, show_default=True)
@click.option("--teacher", default=None, type=click.Path(dir_okay=False),
              help="distil from these weights of --model (e.g. a shallower model from `shrink`)")  # fmt: skip
@click.option("--distill-weight", type=float, default=0.5, show_default=True, help="logits KL to the teacher")
@click.option("--token-weight", type=float, default=0.5, show_default=True, help="MSE on the patch tokens")
@train_options
@user_errors
def train(model_name, checkpoint, out, epochs, lr, warmup_epochs, teacher, distill_weight, token_weight, data,
          train_subset, batch_size, weight_decay, augment, resume, seed, workers, torch_device,
          final_test_on):  # fmt: skip
    """Train a dense model (the demo's model and teacher by default) from scratch or a checkpoint."""
    import torch

    from ..data import num_classes
    from ..models import build_model
    from ..train import TrainConfig, fit

    torch.manual_seed(seed)  # the same initial weights in every process and every rerun
    model = build_model(model_name, checkpoint, num_classes=num_classes(data))
    teacher_model = None if teacher is None else build_model(model_name, teacher, num_classes=num_classes(data))
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      warmup_epochs=warmup_epochs, augment=augment, train_subset=train_subset, seed=seed,
                      distill_weight=distill_weight, token_distill_weight=token_weight,
                      workers=workers, device=torch_device, resume=resume)  # fmt: skip
    result = fit(model, data, cfg, out, model_name=model_name, teacher=teacher_model)
    final_test(model, data, result, final_test_on)


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
@click.option(
    "--train-count",
    type=click.Choice(["exact", "sampled"]),
    default="exact",
    show_default=True,
    help="tokens kept in training: the plan's exact top-k per image (as at inference), or Gumbel-sampled "
    "decisions steered by the ratio loss (SPViT as published)",
)
@click.option("--ratio-weight", type=float, default=50.0, show_default=True, help="kept fraction vs target")
@click.option("--distill-weight", type=float, default=0.5, show_default=True, help="logits KL to the teacher")
@click.option("--token-weight", type=float, default=0.5, show_default=True, help="MSE on kept tokens")
@click.option("--latency-weight", type=float, default=0.0, show_default=True, help="latency-aware loss weight")
@click.option("--selector-hint", type=float, default=0.0, show_default=True,
              help="weight of the teacher's class-attention top-k as each learned selector's target")  # fmt: skip
@click.option("--densities", default=None,
              help="weight-shared operating points: keep vectors over the plan's locations, ';' between them "
              "(e.g. '0.8,0.64,0.51;0.5,0.25,0.125'); the plan's keep is added; dense path always runs")  # fmt: skip
@click.option("--densities-per-step", type=int, default=0, show_default=True,
              help="sparse paths per step: 0 = every density; else the sparsest plus random others")  # fmt: skip
@click.option("--target-ms", type=float, default=None, help="latency target of the latency-aware loss")
@click.option("--latency-device", default=None, help="device whose table the latency loss reads (default: plan's)")
@click.option("--tables", default="latency_tables", show_default=True, type=click.Path(file_okay=False))
@train_options
@devices_option
@user_errors
def finetune(plan_file, checkpoint, teacher, out, epochs, lr, selector_lr_scale, warmup_epochs, selector_warmup,
             train_count, ratio_weight, distill_weight, token_weight, latency_weight, selector_hint, densities,
             densities_per_step, target_ms, latency_device, tables, data, train_subset, batch_size, weight_decay,
             augment, resume, seed, workers, torch_device, final_test_on, devices_file):  # fmt: skip
    """Soft-pruning fine-tune of plan.model under PLAN: task + ratio + distillation (+ latency) loss."""
    from pathlib import Path

    import torch

    from ..data import num_classes
    from ..errors import SpvitError
    from ..losses import LatencyPenalty
    from ..models import build_model, create_model
    from ..plan import PruningPlan
    from ..train import TrainConfig, fit

    given = PruningPlan.load(plan_file)
    if given.model is None:
        raise SpvitError(f"{plan_file} names no model (key 'model')")
    plan = given if densities else given.without_idle_stages(create_model(given.model))
    operating_points = ()
    if densities:
        from ..densities import parse_densities

        wanted = parse_densities(densities, plan)
        operating_points = wanted if plan.is_dense else tuple({*wanted, plan.keep})
        click.echo(f"weight-shared: the dense path and {len(set(operating_points))} densities each step")
    if plan != given:
        click.echo(f"stages that prune nothing dropped: selectors before blocks {list(plan.locations)}")
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
        from ..predictor import PlanLatency

        device = registry(devices_file).get(latency_device or plan.device or "local")
        shape = build_model(plan.model, num_classes=classes)  # a dense model of the same structure
        latency = PlanLatency.for_device(device, shape, plan.model, root=tables, methods=(plan.method,))
        penalty = LatencyPenalty(latency, plan, target_ms)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      warmup_epochs=warmup_epochs, selector_warmup_epochs=selector_warmup, ratio_weight=ratio_weight,
                      train_count=train_count,
                      selector_lr_scale=selector_lr_scale,
                      distill_weight=distill_weight if teacher_model is not None else 0.0,
                      token_distill_weight=token_weight if teacher_model is not None else 0.0,
                      latency_weight=latency_weight, selector_hint_weight=selector_hint, augment=augment,
                      train_subset=train_subset, seed=seed, workers=workers, densities=operating_points,
                      densities_per_step=densities_per_step, device=torch_device, resume=resume)  # fmt: skip
    result = fit(model, data, cfg, out, model_name=plan.model, plan=plan, teacher=teacher_model,
                 latency_penalty=penalty)  # fmt: skip
    plan.save(Path(out) / "plan.yaml")
    final_test(model, data, result, final_test_on)


@main.command()
@click.option("--plan", "plan_file", default=None, type=click.Path(dir_okay=False), help="plan.yaml of the model")
@click.option("--model", "model_name", default=None, help="timm model (a dense export, without --plan)")
@click.option("--checkpoint", default=None, type=click.Path(dir_okay=False), help="weights (fine-tuned or dense)")
@click.option("--format", "fmt", type=click.Choice(["onnx", "tflite"]), default="onnx", show_default=True)
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="output file (default: beside --checkpoint)")
@click.option("--data", default="demo", show_default=True, help="data whose test split verifies the export")
@click.option("--verify/--no-verify", default=True, show_default=True, help="compare top-1 with torch on test")
@click.option("--switchable", is_flag=True,
              help="ONNX with the keep ratios as a second input ('keep', float32, one per stage): one file "
              "for every density of a weight-shared checkpoint (finetune --densities)")  # fmt: skip
@click.option("--operating-points", "points_text", default=None, metavar="K1;K2;…",
              help="with --switchable: densities the checkpoint was trained for (as finetune --densities), "
                   "each run by a static graph in the file (a static export's speed there)")  # fmt: skip
@click.option("--allow-disagree", type=int, default=0, show_default=True,
              help="test images whose top-1 may differ from torch's (ties aside): more refuse the export")  # fmt: skip
@user_errors
def export(plan_file, model_name, checkpoint, fmt, out, data, verify, switchable, points_text, allow_disagree):
    """Export a (fine-tuned) pruned model to ONNX or TFLite and check it agrees with torch."""
    from pathlib import Path

    from ..densities import parse_densities
    from ..errors import SpvitError
    from ..export import export_onnx, export_onnx_switchable, export_tflite, verify_export
    from ..models import build_model
    from ..plan import PruningPlan

    plan = PruningPlan.load(plan_file) if plan_file else None
    name = model_name or (plan.model if plan else None)
    if name is None:
        raise SpvitError("give --plan (with a model) or --model")
    model = build_model(name, checkpoint, plan).eval()
    if out is None:
        base = Path(checkpoint).with_suffix("") if checkpoint else Path(name)
        out = base.with_name(base.name + ("-pruned" if plan and not plan.is_dense else "")).with_suffix(f".{fmt}")
    if switchable:
        if fmt != "onnx" or plan is None:
            raise SpvitError("--switchable writes ONNX (TFLite needs static shapes) of a pruned model: give --plan")
        points = parse_densities(points_text, plan) if points_text else None
        path = export_onnx_switchable(model, out, operating_points=points)
        static = f"; static graphs for {len(points)} of them" if points else ""
        click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): input 'keep' takes {len(plan.keep)} "
                   f"cumulative keep ratios, one per stage{static}")  # fmt: skip
    elif points_text:
        raise click.UsageError("--operating-points goes with --switchable")
    else:
        path = (export_onnx if fmt == "onnx" else export_tflite)(model, out)
        click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if verify:
        report = verify_export(model, path, data)
        ties = f" ({report['ties']} more are ties: every logit within 1e-4)" if report["ties"] else ""
        click.echo(f"test split: torch top-1 {report['torch_acc']:.2f}%, {fmt} top-1 {report['export_acc']:.2f}%, "
                   f"same top-1 on {report['agree']}/{report['images']} images{ties}")  # fmt: skip
        wrong = report["images"] - report["agree"] - report["ties"]
        if wrong > allow_disagree:
            raise SpvitError(f"{wrong} test images get another top-1 from {path} (logits differ by more than 1e-4)")
