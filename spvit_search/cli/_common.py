"""What the command modules share: option sets, list parsing, error handling, the device registry."""

from __future__ import annotations

import functools
import sys

import click

from ..errors import SpvitError


def parse_list(text: str | None, kind: type, name: str):
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
        click.option("--method", default="spvit", show_default=True, help="spvit | hard | evit | tome | norm (Swin)"),
        click.option("--package-token/--no-package-token", default=None, help="default: the method's"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def build_plan(model, model_name: str, keep: str, locations: str | None, method: str, package_token: bool | None):
    from ..plan import PruningPlan
    from ..pruning import family_for

    keep_t = parse_list(keep, float, "--keep")
    locs = parse_list(locations, int, "--locations") or family_for(model).default_locations(model, len(keep_t))
    plan = PruningPlan(locations=locs, keep=keep_t, method=method, package_token=package_token, model=model_name)
    family_for(model).check(model, plan)  # the model's own rules (token grids, what each method needs)
    return plan


def devices_option(fn):
    return click.option(
        "--devices", "devices_file", default=None, type=click.Path(dir_okay=False),
        help="device registry (default: $SPVIT_DEVICES, else ./devices.yaml, else only 'local')",
    )(fn)  # fmt: skip


def registry(devices_file):
    from ..devices import DeviceRegistry

    return DeviceRegistry.load(devices_file)


def device_for(devices_file, name: str, threads: int | None):
    device = registry(devices_file).get(name)
    return device if threads is None else device.model_copy(update={"threads": threads})


def prediction_line(pred) -> str:
    return f"predicted {pred.total_ms:8.2f} ms  (sum of parts {pred.parts_ms:.2f} ms, {pred.calibration.describe()})"


def train_options(fn):
    """Options shared by train and finetune."""
    options = [
        click.option(
            "--data",
            default="demo",
            show_default=True,
            help="'demo' (digits), 'fashion' (Fashion-MNIST), an idx folder or an ImageFolder root",
        ),
        click.option(
            "--train-subset",
            type=int,
            default=None,
            help="train on a fixed subset of this many training images (the same for every seed)",
        ),
        click.option("--batch-size", type=int, default=64, show_default=True, help="global batch"),
        click.option("--weight-decay", type=float, default=0.05, show_default=True),
        click.option("--augment/--no-augment", default=True, show_default=True),
        click.option("--resume/--no-resume", default=True, show_default=True, help="continue from OUT/last.pt"),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--workers", type=int, default=0, show_default=True, help="data loader processes"),
        click.option("--device", "torch_device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True),
        click.option(
            "--final-test/--no-final-test",
            "final_test_on",
            default=True,
            show_default=True,
            help="top-1 on the test split at the end (a harness that evaluates the weights itself skips it)",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def final_test(model, data: str, result, enabled: bool = True) -> float:
    """Top-1 on the test split, printed once (rank 0); NaN, with the weights' path, if not ``enabled``."""
    import os

    import torch

    from ..data import build_dataset
    from ..train import evaluate

    if int(os.environ.get("RANK", "0")) != 0:
        return float("nan")
    if not enabled:
        click.echo(f"test split not evaluated (--no-final-test; eval split {result.eval_acc:.2f}%); "
                   f"weights: {result.model_file}")  # fmt: skip
        return float("nan")
    acc, _ = evaluate(model, build_dataset(data, "test", model), torch.device("cpu") if not next(
        model.parameters()).is_cuda else next(model.parameters()).device)  # fmt: skip
    click.echo(f"test top-1 {acc:.2f}% (eval split {result.eval_acc:.2f}%); weights: {result.model_file}")
    return acc
