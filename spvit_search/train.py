"""One training loop for the dense model and the soft-pruning fine-tune, in one process or DDP.

Loss = label-smoothed cross-entropy + ratio loss (kept fraction vs target per stage) +
distillation from the dense teacher (logits KL and MSE on the kept tokens) + optionally the
latency penalty. The first ``selector_warmup_epochs`` train only the selectors (the backbone's
learning rate is held at zero, which keeps every parameter registered with DDP). AdamW with a
per-step linear warm-up and cosine decay.

Every epoch writes ``last.pt`` (model, optimizer, epoch, step, RNG) atomically, a row of
``metrics.csv`` and ``curve.png``; ``steps.csv`` logs the global loss of every step. Running the
same command again resumes from ``last.pt``. Under ``torchrun`` (gloo on CPU, nccl on GPU) the
data are split by a ``DistributedSampler`` that is also used in a single process, so one
process and N processes see the same global batches in the same order.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from .data import build_dataset
from .densities import check_densities, step_paths
from .errors import SpvitError
from .losses import HandedGridMSE, SelectorHint, distillation_kl, kept_token_mse, patch_token_mse, ratio_loss
from .plan import PlanError, PruningPlan
from .pruning import family_for, pruning_state, set_keep
from .records import append_csv_rows

METRIC_FIELDS = (
    "epoch", "lr", "loss", "task", "ratio", "distill", "tokens", "latency", "hint", "kept", "eval_acc", "eval_loss",
    "seconds",
)  # fmt: skip
LOSS_TERMS = ("loss", "task", "ratio", "distill", "tokens", "latency", "hint")


class TrainError(SpvitError):
    """A training run that cannot start or resume, with the reason."""


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64  # global, over all processes
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    selector_warmup_epochs: int = 0
    selector_lr_scale: float = 1.0  # fresh selectors learn faster than a trained backbone is nudged
    ratio_weight: float = 2.0
    distill_weight: float = 0.5
    token_distill_weight: float = 0.5
    distill_tau: float = 1.0
    latency_weight: float = 0.0
    selector_hint_weight: float = 0.0  # learned selectors: the teacher's class-attention top-k as their target
    train_count: str = "exact"  # learned selectors in training: the plan's exact top-k, or "sampled" (Gumbel)
    #: weight-shared operating points (keep vectors over the plan's locations): each step trains the
    #: dense path and these, the sparse ones distilled from the dense one (see densities.py)
    densities: tuple[tuple[float, ...], ...] = ()
    densities_per_step: int = 0  # sparse paths per step: 0 = every density; else the sparsest + random others
    augment: bool = True
    train_subset: int | None = None  # train on a fixed subset (the same for every seed) of this many images
    eval_split: str = "calib"
    seed: int = 0
    workers: int = 0
    device: str = "cpu"
    resume: bool = True


@dataclass
class TrainResult:
    out_dir: Path
    model_file: Path
    eval_acc: float
    epochs: int
    resumed_from: int | None
    history: list[dict] = field(default_factory=list)


class _WithFeatures(nn.Module):
    """(logits, final token features) from one forward call, so DDP sees every parameter used."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        features = self.model.forward_features(x)
        return self.model.forward_head(features), features


def _token_layout(features: torch.Tensor, state) -> bool:
    """True if the features are the whole token sequence of the last grid (a ViT's), which the
    kept-token loss matches; a PiT's are its class tokens only (its grids are matched where they
    enter the pooling layers instead: ``HandedGridMSE``)."""
    return features.dim() == 3 and features.shape[1] == state.num_prefix + state.num_patches + state.num_packages


def _distributed(device_kind: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("--device cuda, but no CUDA device is available")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return rank, world, device


def evaluate(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 200) -> tuple[float, float]:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` in eval mode on ``dataset``."""
    was_training = model.training
    model.eval()
    correct, loss, seen = 0, 0.0, 0
    with torch.no_grad():
        for images, labels in DataLoader(dataset, batch_size=batch_size):
            logits = model(images.to(device))
            labels = labels.to(device)
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(dim=1) == labels).sum().item()
            seen += len(labels)
    model.train(was_training)
    return 100.0 * correct / max(1, seen), loss / max(1, seen)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    groups = {"selector": [], "decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "token_selector" in name:
            groups["selector"].append(p)
        elif p.ndim <= 1 or name.endswith(".bias") or name in skip:
            groups["no_decay"].append(p)
        else:
            groups["decay"].append(p)
    return [
        {"params": groups["decay"], "weight_decay": weight_decay, "backbone": True},
        {"params": groups["no_decay"], "weight_decay": 0.0, "backbone": True},
        {"params": groups["selector"], "weight_decay": weight_decay, "backbone": False},
    ]


def _lr_at(step: int, total: int, warmup: int, cfg: TrainConfig) -> float:
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


_NOT_IDENTITY = ("resume", "workers", "device")  # how a run is executed, not what it computes


def _weights_digest(module: nn.Module | None) -> str | None:
    """sha256 of a module's state (names and bytes): what a run starts from, or learns from."""
    if module is None:
        return None
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _run_identity(
    model: nn.Module, teacher: nn.Module | None, model_name: str, plan: PruningPlan | None, data: str,
    cfg: TrainConfig, latency_penalty: nn.Module | None,
) -> dict:  # fmt: skip
    """What a resumed run must share with the one in ``last.pt``: resuming a run that started from
    other weights, distils another teacher or trains with other settings would silently finish
    that other run (seen: a benchmark rerun after its teacher changed reused the old fine-tunes)."""
    config = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IDENTITY}
    identity = {"model_name": model_name, "plan": plan.to_dict() if plan else None, "data": data, "config": config,
                "initial_weights": _weights_digest(model), "teacher_weights": _weights_digest(teacher)}  # fmt: skip
    if latency_penalty is not None:  # the latency loss's target is part of what the run optimises
        identity["latency_target_ms"] = float(latency_penalty.target_ms)
    return identity


def _identity_differences(old: dict | None, new: dict) -> str:
    """The parts of two run identities that differ, as a short readable list."""
    if not old:
        return "no identity recorded"
    diffs = []
    for key in new:
        a, b = old.get(key), new[key]
        if key == "config" and isinstance(a, dict):
            diffs += [f"{k} {a.get(k)!r} there, {b[k]!r} now" for k in b if a.get(k) != b[k]]
        elif a != b:
            what = key.replace("_", " ")
            diffs.append(f"{what} differ" if key.endswith("weights") else f"{what} {a!r} there, {b!r} now")
    return "; ".join(diffs)


def _keep_rows(path: Path, upto_epoch: int) -> list[dict]:
    """Rows of an earlier run's CSV up to ``upto_epoch`` (a resumed run rewrites the rest)."""
    if not path.exists():
        return []
    with path.open() as fh:
        return [r for r in csv.DictReader(fh) if int(float(r.get("epoch", 0))) <= upto_epoch]


def _write_rows(path: Path, fields: tuple[str, ...], rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_curve(metrics: Path, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with metrics.open() as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in LOSS_TERMS:
        values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
        if values and any(v != 0 for v in values):
            ax1.plot(epochs[: len(values)], values, label=key)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss (mean over the epoch)")
    ax1.set_yscale("log")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.plot(epochs, [float(r["eval_acc"]) for r in rows], "o-", ms=3)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("eval top-1 (%)")
    ax2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _path_losses(cfg: TrainConfig, model: nn.Module, logits: torch.Tensor, features: torch.Tensor,
                 labels: torch.Tensor, state, sparse: bool, dense: bool, reference, hint,
                 latency_penalty, grids: HandedGridMSE | None = None) -> dict:  # fmt: skip
    """Loss terms of one forward: task, ratio, distillation from ``reference`` = (logits, final
    features) of the teacher or, for a sparse path of weight-shared training, of the dense path.
    ``sparse``: learned selectors acted; ``dense``: no token was removed (the teacher's layout);
    ``grids``: the handed grids of this step's forwards, where the final features hold no patches."""
    parts = {"task": F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)}
    if sparse and state.kept_fraction and not cfg.densities:  # weight-shared: see densities.py
        parts["ratio"] = cfg.ratio_weight * ratio_loss(state)
    if reference is not None:
        t_logits, t_features = reference
        parts["distill"] = cfg.distill_weight * distillation_kl(logits, t_logits, cfg.distill_tau)
        if hint is not None and sparse and state.keep_logp:
            parts["hint"] = cfg.selector_hint_weight * hint(state)
        if grids is not None:
            parts["tokens"] = cfg.token_distill_weight * grids.loss()
        elif sparse and state.patch_policy is not None and cfg.token_distill_weight and _token_layout(features, state):
            parts["tokens"] = cfg.token_distill_weight * kept_token_mse(features, t_features, state)
        elif sparse and cfg.token_distill_weight and features.dim() == 4 == t_features.dim():
            # a Swin's last grid: every token is there (pruned windows are carried), so all are matched
            parts["tokens"] = cfg.token_distill_weight * patch_token_mse(features, t_features, 0)
        elif dense and cfg.token_distill_weight and features.shape == t_features.shape:
            prefix = getattr(model, "num_prefix_tokens", 1)
            parts["tokens"] = cfg.token_distill_weight * patch_token_mse(features, t_features, prefix)
    if latency_penalty is not None and sparse and state.kept_fraction:
        parts["latency"] = cfg.latency_weight * latency_penalty(state.differentiable_fraction)
    return parts


def fit(
    model: nn.Module,
    data: str,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    model_name: str,
    plan: PruningPlan | None = None,
    teacher: nn.Module | None = None,
    latency_penalty: nn.Module | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` (pruned by ``plan`` already, or dense) on ``data``; resumable."""
    rank, world, device = _distributed(cfg.device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last, metrics_csv, steps_csv = out / "last.pt", out / "metrics.csv", out / "steps.csv"
    if cfg.batch_size % world:
        raise TrainError(f"--batch-size {cfg.batch_size} does not split over {world} processes")
    torch.manual_seed(cfg.seed)

    if cfg.train_subset is not None and cfg.train_subset < cfg.batch_size:
        raise TrainError(f"--train-subset {cfg.train_subset} makes no batch of {cfg.batch_size}")
    train_set = build_dataset(data, "train", model, augment=cfg.augment)
    if cfg.train_subset is not None and cfg.train_subset < len(train_set):
        pick = np.random.default_rng(0).permutation(len(train_set))[: cfg.train_subset]
        train_set = Subset(train_set, sorted(pick.tolist()))
    eval_set = build_dataset(data, cfg.eval_split, model)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(train_set, batch_size=cfg.batch_size // world, sampler=sampler, drop_last=True,
                        num_workers=cfg.workers)  # fmt: skip
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise TrainError(f"{len(train_set)} training images make no batch of {cfg.batch_size}")
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)

    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    identity = _run_identity(model, teacher, model_name, plan, data, cfg, latency_penalty)
    start_epoch, step, resumed = 0, 0, None
    if cfg.resume and last.exists():
        state = torch.load(last, map_location=device, weights_only=True)
        if state.get("identity") != identity:
            raise TrainError(
                f"{out} holds another run ({_identity_differences(state.get('identity'), identity)}): "
                "use another --out, or --no-resume to start this one over"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, resumed = state["epoch"], state["step"], state["epoch"]
        torch.set_rng_state(state["rng"])
        if rank == 0:
            _write_rows(metrics_csv, METRIC_FIELDS, _keep_rows(metrics_csv, start_epoch))
            _write_rows(steps_csv, ("step", "epoch", "loss", "lr"), [
                r for r in _keep_rows(steps_csv, start_epoch) if int(r["step"]) <= step
            ])  # fmt: skip
    elif rank == 0:
        for stale in (metrics_csv, steps_csv):
            stale.unlink(missing_ok=True)

    pruned = plan is not None and not plan.is_dense
    learned = pruned and plan.spec.learned_selector
    if cfg.train_count not in ("exact", "sampled"):
        raise TrainError(f"train_count must be 'exact' or 'sampled', not {cfg.train_count!r}")
    if learned:
        pruning_state(model).train_count = cfg.train_count
    unused = learned and any(k >= 1.0 for k in plan.keep)
    if cfg.densities:
        if not learned:
            raise TrainError("--densities trains learned selectors: give a plan of method spvit (or hard)")
        try:
            cfg.densities = check_densities(cfg.densities, plan)
        except PlanError as err:
            raise TrainError(str(err)) from None
        unused = True  # the dense path leaves the selectors idle
    dense_keep = (1.0,) * len(plan.keep) if plan is not None else ()
    plan_keep = cfg.densities[-1] if cfg.densities else (plan.keep if plan is not None else None)
    hint = None
    if learned and cfg.selector_hint_weight:
        if teacher is None:
            raise TrainError("the selector hint reads the teacher's class attention: give a teacher")
        if family_for(model).training_free != "evit":
            raise TrainError(f"the selector hint reads the teacher's class attention; {family_for(model).name} "
                             "models have no class token: train without --selector-hint")  # fmt: skip
        before = plan.previous_keep(model)
        acting = [loc for loc, k, b in zip(plan.locations, plan.keep, before, strict=True) if k < b]
        hint = SelectorHint(teacher, tuple(acting))
    grids = None  # PiT: its final features are class tokens; the grids handed to pooling are distilled
    if learned and teacher is not None and cfg.token_distill_weight and not cfg.densities:
        handed = family_for(model).handed_grids(model)
        if handed:
            grids = HandedGridMSE(handed, family_for(teacher).handed_grids(teacher))
    student: nn.Module = _WithFeatures(model)
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        student = nn.parallel.DistributedDataParallel(student, device_ids=ids, find_unused_parameters=unused)

    history: list[dict] = []
    eval_acc = float("nan")
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        model.train()
        backbone_frozen = learned and epoch < cfg.selector_warmup_epochs
        sums: dict[str, float] = {}
        kept_sum: list[float] = []
        started = time.perf_counter()
        desc = f"epoch {epoch + 1}/{cfg.epochs}" + (" (selectors only)" if backbone_frozen else "")
        bar = tqdm(loader, disable=not progress or rank != 0, leave=False, desc=desc)
        for images, labels in bar:
            images, labels = images.to(device), labels.to(device)
            path_rng, fracs = random.Random(cfg.seed * 1_000_003 + step), []  # the same draws when resumed
            lr = _lr_at(step, total_steps, warmup_steps, cfg)
            for group in optimizer.param_groups:
                if group["backbone"]:
                    group["lr"] = 0.0 if backbone_frozen else lr
                else:
                    group["lr"] = lr * cfg.selector_lr_scale
            reference = None
            if grids is not None:
                grids.start()
            if teacher is not None:
                with torch.no_grad():
                    t_features = teacher.forward_features(images)
                    reference = (teacher.forward_head(t_features), t_features)
            optimizer.zero_grad(set_to_none=True)
            paths = step_paths(cfg.densities, cfg.densities_per_step, path_rng) if cfg.densities else [plan_keep]
            loss = torch.zeros((), device=device)
            for i, keep in enumerate(paths):
                if cfg.densities:
                    set_keep(model, keep or dense_keep)
                sync = student.no_sync() if world > 1 and i < len(paths) - 1 else contextlib.nullcontext()
                with sync:
                    logits, features = student(images)
                    state = pruning_state(model) if pruned else None
                    sparse = keep is not None and learned
                    dense = not pruned or (bool(cfg.densities) and keep is None)
                    parts = _path_losses(cfg, model, logits, features, labels, state, sparse, dense, reference,
                                         hint, latency_penalty if sparse else None, grids)  # fmt: skip
                    path_loss = sum(parts.values())
                    if cfg.densities and keep is not None:  # the dense path weighs as much as all sparse ones
                        path_loss = path_loss / (len(paths) - 1)
                    path_loss.backward()
                loss = loss + path_loss.detach()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                if cfg.densities and keep is None:  # the sparse paths learn from this step's dense path
                    reference = (logits.detach(), features.detach())
                if keep == plan_keep and sparse and state.kept_fraction:
                    fracs = [float(f.detach().mean()) for f in state.kept_fraction]
            optimizer.step()
            step += 1

            logged = loss.detach().clone()
            if world > 1:
                dist.all_reduce(logged)
                logged /= world
            sums["loss"] = sums.get("loss", 0.0) + float(logged)
            if fracs:
                kept_sum = [a + b for a, b in zip(kept_sum, fracs, strict=True)] if kept_sum else fracs
                bar.set_postfix(loss=f"{float(logged):.3f}", kept="/".join(f"{f:.2f}" for f in fracs))
            else:
                bar.set_postfix(loss=f"{float(logged):.3f}")
            if rank == 0:
                step_row = {"step": step, "epoch": epoch + 1, "loss": f"{float(logged):.6f}", "lr": f"{lr:.6g}"}
                append_csv_rows(steps_csv, ("step", "epoch", "loss", "lr"), [step_row])
        bar.close()

        if rank == 0:
            eval_acc, eval_loss = evaluate(model, eval_set, device)
            row = {
                "epoch": epoch + 1,
                "lr": f"{lr:.6g}",
                "eval_acc": f"{eval_acc:.3f}",
                "eval_loss": f"{eval_loss:.5f}",
                "seconds": f"{time.perf_counter() - started:.1f}",
                "kept": "/".join(f"{k / steps_per_epoch:.3f}" for k in kept_sum),
            }
            for key in LOSS_TERMS:
                row[key] = f"{sums.get(key, 0.0) / steps_per_epoch:.5f}"
            history.append(row)
            append_csv_rows(metrics_csv, METRIC_FIELDS, [row])
            _save_atomic({"identity": identity, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "epoch": epoch + 1, "step": step, "rng": torch.get_rng_state(),
                          "config": asdict(cfg)}, last)  # fmt: skip
            what = f"{plan.method} keep={list(plan.keep)}" if pruned else "dense"
            plot_curve(metrics_csv, out / "curve.png", f"{model_name} {what}")
            if progress:
                print(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['loss']} eval top-1 {eval_acc:.2f}%"
                      + (f" kept {row['kept']}" if row["kept"] else ""), flush=True)  # fmt: skip
        if world > 1:
            dist.barrier()

    if grids is not None:
        grids.remove()
    if cfg.densities:  # saved and returned at the plan's own operating point
        set_keep(model, plan.keep)
    model_file = out / "model.pt"
    if rank == 0:
        if math.isnan(eval_acc):
            eval_acc, _ = evaluate(model, eval_set, device)
        _save_atomic({"model": model.state_dict(), **identity, "eval_acc": eval_acc, "eval_split": cfg.eval_split},
                     model_file)  # fmt: skip
    if world > 1:
        dist.barrier()
    return TrainResult(out, model_file, eval_acc, cfg.epochs, resumed, history)
