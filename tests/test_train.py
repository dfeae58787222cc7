"""Demo data, the training loop (single process and DDP), resume, export, and their errors."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peers.net import free_port

import spvit_search as sp
from spvit_search.cli import main
from spvit_search.data import DEMO_SIZES, DataError, build_dataset
from spvit_search.models import create_model

CLI = [sys.executable, "-m", "spvit_search.cli"]
PLAN = sp.PruningPlan(locations=(2, 4), keep=(0.6, 0.36), model="vit_demo_digits")


def _rows(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_demo_splits_are_fixed_and_disjoint():
    splits = {s: build_dataset("demo", s) for s in ("train", "calib", "test")}
    assert {s: len(d) for s, d in splits.items()} == DEMO_SIZES
    assert splits["train"][0][0].shape == (3, 32, 32)
    flat = {s: {tuple(x.flatten()[::7].tolist()) for x in d.images} for s, d in splits.items()}
    assert not flat["train"] & flat["test"] and not flat["calib"] & flat["test"]
    again = build_dataset("demo", "test")
    assert torch.equal(again.images, splits["test"].images)
    shifted = build_dataset("demo", "train", augment=True)
    assert any(not torch.equal(shifted[i][0], splits["train"][i][0]) for i in range(10))


def test_image_folder_data_and_bad_paths(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = tmp_path / "imgs" / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                    folder / f"{i}.png"
                )
    model = create_model("vit_demo_digits", num_classes=2)
    train = build_dataset(str(tmp_path / "imgs"), "train", model, augment=True)
    assert len(train) == 6 and train[0][0].shape == (3, 32, 32)
    assert len(build_dataset(str(tmp_path / "imgs"), "calib", model)) == 6
    assert len(build_dataset(str(tmp_path / "imgs"), "test", model)) == 6
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(str(tmp_path / "nowhere"), "train")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match=r"has no train/ folder: expected .*/train/<class>"):
        build_dataset(str(tmp_path / "flat"), "train")
    out = CliRunner().invoke(main, ["train", "--data", str(tmp_path / "nowhere"), "--epochs", "1"])
    assert out.exit_code == 2 and "does not exist" in out.output


def _train(out: Path, *extra: str, env=None, torchrun: int = 0) -> subprocess.CompletedProcess:
    args = ["train", "--out", str(out), "--epochs", "1", "--batch-size", "32", "--no-augment", *extra]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
               f"--master_port={free_port()}", "-m", "spvit_search.cli", *args]  # fmt: skip
    else:
        cmd = [*CLI, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def test_two_process_ddp_matches_one_process(tmp_path):
    one = _train(tmp_path / "one", env={"OMP_NUM_THREADS": "2"})
    assert one.returncode == 0, one.stderr[-2000:]
    two = _train(tmp_path / "two", torchrun=2, env={"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-2000:]
    a = [float(r["loss"]) for r in _rows(tmp_path / "one" / "steps.csv")]
    b = [float(r["loss"]) for r in _rows(tmp_path / "two" / "steps.csv")]
    assert len(a) == len(b) == DEMO_SIZES["train"] // 32
    assert a[0] == pytest.approx(b[0], rel=1e-5)  # same initial weights, same first global batch
    assert np.allclose(a, b, rtol=2e-3), list(zip(a, b, strict=True))
    assert a[-1] < a[0]  # and it learns


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dense")
    done = _train(out, "--epochs", "3", "--lr", "2e-3")
    assert done.returncode == 0, done.stderr[-2000:]
    return out / "model.pt"


def test_finetune_killed_mid_epoch_resumes_from_last_checkpoint(tmp_path, dense_checkpoint):
    plan = PLAN.save(tmp_path / "plan.yaml")
    out = tmp_path / "ft"
    args = [*CLI, "finetune", "--plan", str(plan), "--checkpoint", str(dense_checkpoint), "--out", str(out),
            "--epochs", "3", "--selector-warmup", "1"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (out / "metrics.csv").exists():
        time.sleep(0.05)
    time.sleep(1.0)  # well into epoch 2
    assert proc.poll() is None, proc.stdout.read()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [r["epoch"] for r in _rows(out / "metrics.csv")] == ["1"]
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "epoch 1/3" not in again.stdout and "epoch 2/3" in again.stdout
    rows = _rows(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert all(float(r["ratio"]) > 0 for r in rows) and rows[-1]["kept"].count("/") == 1
    steps = [int(r["step"]) for r in _rows(out / "steps.csv")]
    assert steps == list(range(1, steps[-1] + 1))  # no step lost or repeated
    assert (out / "curve.png").stat().st_size > 5000 and (out / "plan.yaml").exists()

    # The same --out with other settings or other starting weights is another run: refused, not resumed.
    other_lr = CliRunner().invoke(main, [*args[3:], "--lr", "1e-3"])
    assert other_lr.exit_code != 0 and "lr 0.0002 there, 0.001 now" in other_lr.output, other_lr.output
    state = torch.load(dense_checkpoint, weights_only=True)
    state["model"]["head.bias"] = state["model"]["head.bias"] + 0.01
    torch.save(state, tmp_path / "other.pt")
    other_weights = [*args[3:6], "--checkpoint", str(tmp_path / "other.pt"), *args[8:]]
    refused = CliRunner().invoke(main, other_weights)
    assert refused.exit_code != 0, refused.output
    assert "initial weights differ; teacher weights differ" in refused.output and "--no-resume" in refused.output


@pytest.mark.parametrize("method", ["spvit", "hard"])
def test_short_finetune_ends_with_the_plans_kept_fractions(tmp_path, dense_checkpoint, method):
    """Training keeps what inference keeps: every epoch's mean training-mode kept fraction is the
    plan's count per stage (±0.01), whatever the selector learned — the fault this guards against
    is a count that drifts with the selector (Gumbel decisions under a ratio loss)."""
    plan = sp.PruningPlan(locations=(2, 4), keep=(0.55, 0.3), method=method, model="vit_demo_digits")
    out = tmp_path / "ft"
    done = CliRunner().invoke(main, ["finetune", "--plan", str(plan.save(tmp_path / "p.yaml")), "--checkpoint",
                                     str(dense_checkpoint), "--out", str(out), "--epochs", "2", "--selector-warmup",
                                     "1", "--train-subset", "192", "--batch-size", "32", "--no-resume"])  # fmt: skip
    assert done.exit_code == 0, done.output
    rows = _rows(out / "metrics.csv")
    assert len(rows) == 2
    for row in rows:
        kept = [float(v) for v in row["kept"].split("/")]
        assert kept == pytest.approx(list(plan.keep), abs=0.01), row


def test_export_agrees_with_torch_and_bad_checkpoints_are_refused(tmp_path, dense_checkpoint):
    plan = PLAN.save(tmp_path / "plan.yaml")
    runner = CliRunner()
    ft = runner.invoke(main, ["finetune", "--plan", str(plan), "--checkpoint", str(dense_checkpoint), "--out",
                              str(tmp_path / "ft"), "--epochs", "1", "--selector-warmup", "0"])  # fmt: skip
    assert ft.exit_code == 0, ft.output
    weights = tmp_path / "ft" / "model.pt"
    for fmt in ("onnx", "tflite"):
        out = runner.invoke(main, ["export", "--plan", str(plan), "--checkpoint", str(weights), "--format", fmt])
        assert out.exit_code == 0, out.output
        assert "same top-1 on 400/400 images" in out.output
    # a fine-tuned checkpoint without its plan, or for another model, is refused with the reason
    no_plan = runner.invoke(main, ["export", "--model", "vit_demo_digits", "--checkpoint", str(weights)])
    assert no_plan.exit_code == 2 and "holds token selectors before blocks [2, 4]" in no_plan.output
    other = runner.invoke(main, ["train", "--model", "deit_tiny_patch16_224", "--checkpoint", str(dense_checkpoint)])
    assert other.exit_code == 2 and "does not fit deit_tiny_patch16_224" in other.output
    moved = sp.PruningPlan(locations=(1, 3), keep=(0.6, 0.36), model="vit_demo_digits").save(tmp_path / "p2.yaml")
    wrong = runner.invoke(main, ["export", "--plan", str(moved), "--checkpoint", str(weights)])
    assert wrong.exit_code == 2 and "the plan puts them at [1, 3]" in wrong.output


def test_latency_penalty_follows_the_table(tmp_path):
    from test_predictor import _synthetic_table

    from spvit_search.latency import LatencyTable
    from spvit_search.losses import LatencyPenalty
    from spvit_search.predictor import PlanLatency

    model = create_model("deit_tiny_patch16_224")
    latency = PlanLatency(LatencyTable.open(_synthetic_table(tmp_path, model)), model, "deit_tiny_patch16_224")
    plan = sp.PruningPlan(locations=(3, 6, 9), keep=(0.7, 0.49, 0.343))
    exact = latency.predict(plan).total_ms
    fracs = [torch.full((4,), k, requires_grad=True) for k in plan.keep]
    penalty = LatencyPenalty(latency, plan, target_ms=exact * 0.9)
    assert float(penalty.predicted_ms(fracs).detach()) == pytest.approx(
        exact, rel=0.01
    )  # rounding of kept counts aside
    loss = penalty(fracs)
    loss.backward()
    assert loss.item() > 0 and all(float(f.grad.sum()) > 0 for f in fracs)  # fewer tokens -> less latency
    assert LatencyPenalty(latency, plan, target_ms=exact * 1.2)(fracs).item() == 0.0


def test_selector_hint_teaches_the_teachers_class_attention_ranking():
    """The hint alone moves fresh selectors' top-k onto the teacher's class-attention top-k."""
    from spvit_search.losses import SelectorHint

    torch.manual_seed(0)
    teacher = create_model("vit_demo_digits").eval()
    student = create_model("vit_demo_digits")
    student.load_state_dict(teacher.state_dict())
    plan = sp.PruningPlan(locations=(2, 4), keep=(0.5, 0.25), method="spvit")
    sp.prune(student, plan)
    hint = SelectorHint(teacher, plan.locations)
    selectors = [p for n, p in student.named_parameters() if "token_selector" in n]
    optimizer = torch.optim.Adam(selectors, lr=3e-3)
    images = torch.randn(16, 3, 32, 32)

    losses, overlaps = [], []
    for _ in range(60):
        with torch.no_grad():
            teacher(images)
        student.train()(images)
        state = sp.pruning_state(student)
        k = sp.plan.kept_count(0.5, state.num_patches)
        chosen = state.keep_logp[0].detach().topk(k, dim=1).indices
        qkv = hint.readers[0]._qkv
        loss = hint(state)
        hint.readers[0]._qkv = qkv  # read the same teacher attention again for the overlap
        wanted = hint.readers[0].class_attention(state.num_patches).topk(k, dim=1).indices
        overlaps.append(
            np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(chosen, wanted, strict=True)])
        )
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    hint.remove()
    assert losses[-1] < 0.5 * losses[0]
    assert overlaps[0] < 0.75 and np.mean(overlaps[-5:]) > 0.9, (overlaps[0], overlaps[-5:])


def test_pit_fine_tune_distils_the_grids_handed_to_pooling(tmp_path):
    """On PiT the final features are class tokens, so its token distillation term is the grids
    entering the pooling layers: logged (non-zero) with the default weight, absent with 0."""
    model = "pit_demo_digits"
    teacher = create_model(model)
    checkpoint = tmp_path / "dense.pt"
    torch.save({"model": teacher.state_dict(), "model_name": model}, checkpoint)
    plan = sp.PruningPlan(locations=(1, 4), keep=(0.5, 0.5), method="spvit", model=model)
    plan_file = str(plan.save(tmp_path / "p.yaml"))
    tokens = {}
    for weight in ("0.5", "0"):
        out = tmp_path / f"tw{weight}"
        done = CliRunner().invoke(main, ["finetune", "--plan", plan_file, "--checkpoint", str(checkpoint), "--out",
                                         str(out), "--epochs", "1", "--selector-warmup", "0", "--train-subset", "64",
                                         "--batch-size", "32", "--token-weight", weight, "--no-resume"])  # fmt: skip
        assert done.exit_code == 0, done.output
        tokens[weight] = float(_rows(out / "metrics.csv")[0]["tokens"])
    assert tokens["0.5"] > 0 and tokens["0"] == 0
