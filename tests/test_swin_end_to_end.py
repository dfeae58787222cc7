"""Every step of the data flow on a Swin: train, profile, predict, calibrate, optimize (training-free and
with trained selectors), fine-tune (ratio, distillation, latency loss; two DDP processes), export, measure."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peers.net import free_port

import spvit_search as sp
from spvit_search.blocks import model_parts
from spvit_search.cli import main
from spvit_search.devices import DeviceRegistry
from spvit_search.latency import LatencyTable
from spvit_search.models import build_model, create_model
from spvit_search.predictor import PlanLatency
from spvit_search.search import SearchSpace

MODEL = "swin_demo_digits"  # grids 16², 8² = 16, 4 windows of 4×4; blocks 0-3 | 4-5
CLI = [sys.executable, "-m", "spvit_search.cli"]


def _ok(args: list[str]) -> str:
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    return done.output


@pytest.fixture(scope="module")
def swin(tmp_path_factory):
    """A briefly trained Swin demo model and its profiled, calibrated local table."""
    root = tmp_path_factory.mktemp("swin")
    _ok(["train", "--model", MODEL, "--out", str(root / "dense"), "--epochs", "3", "--no-augment"])
    _ok(["profile", "--model", MODEL, "--out", str(root / "tables"), "--rounds", "3", "--runs", "5"])
    _ok(["calibrate", "--model", MODEL, "--tables", str(root / "tables"), "--points", "3", "--rounds", "3"])
    return {"root": root, "checkpoint": root / "dense" / "model.pt", "tables": root / "tables"}


def test_profile_measures_window_blocks_selectors_merges_and_predicts(swin):
    table = LatencyTable.open(swin["tables"] / "local" / "onnxruntime-t1-b1.csv")
    parts = model_parts(create_model(MODEL))
    assert {(r.signature, r.tokens) for r in table.rows.itertuples()} >= {
        (p.signature, n) for p in parts for n in p.grid
    }
    assert {p.kind for p in parts} == {"stem", "block", "downsample", "selector", "head"}
    blocks = {p.signature: p.grid for p in parts if p.kind == "block"}
    assert blocks["swin_block-d48-h2-w4x4-mlp3"][-1] == 256 and all(n % 16 == 0 for g in blocks.values() for n in g)
    assert {p.signature for p in parts if p.kind == "selector"} >= {
        "selector-spvit-d48-h2-p0",
        "selector-norm-d48-h2-p0",
    }
    out = _ok(["predict", "--model", MODEL, "--keep", "0.5,0.5", "--locations", "1,4", "--method", "norm",
               "--tables", str(swin["tables"]), "--json"])  # fmt: skip
    data = json.loads(out)
    assert data["tokens_per_block"] == [256, 128, 128, 128, 32, 32]  # windows kept × 16 tokens
    assert data["breakdown_ms"]["downsample"] > 0 and data["calibration"]["points"] == 3
    refused = CliRunner().invoke(main, ["predict", "--model", MODEL, "--keep", "0.5,0.75", "--locations", "2,3",
                                        "--tables", str(swin["tables"])])  # fmt: skip
    assert refused.exit_code == 2 and "must not increase within stage 0 (blocks 0..3)" in refused.output


def test_optimize_places_spvit_with_norm_then_finetune_and_search_its_selectors(tmp_path, swin):
    device = DeviceRegistry.load().get("local")
    latency = PlanLatency.for_device(device, build_model(MODEL), MODEL, root=swin["tables"], methods=("spvit",))
    dense_ms = latency.predict(sp.PruningPlan(locations=(1,), keep=(1.0,), method="norm")).total_ms
    # 0.9 of dense, or halfway down to the fastest plan where that is nearer: some tables price the
    # selectors so high that the fastest plan saves only 7% (seen in CI: fastest 2.35, dense 2.53 ms)
    fastest_ms, _ = SearchSpace(((1, 2, 4),), ("spvit",), layout=latency.layout).fastest(latency)
    target = round(max(dense_ms * 0.9, (fastest_ms + dense_ms) / 2), 4)
    common = ["--model", MODEL, "--tables", str(swin["tables"]), "--calib-images", "128", "--trials", "20",
              "--verify-top", "0", "--target-ms", str(target), "--locations", "1,2,4", "--json"]  # fmt: skip
    plan_file = tmp_path / "plan.yaml"
    out = json.loads(_ok(["optimize", *common, "--method", "spvit", "--checkpoint", str(swin["checkpoint"]),
                          "--out", str(plan_file)]))  # fmt: skip
    plan = sp.PruningPlan.load(plan_file)
    assert out["scored_by"] == "norm" and plan.method == "spvit" and min(plan.keep) < 1.0
    assert plan.locations == (1, 2, 4)
    assert latency.predict(plan).total_ms <= target

    ft = tmp_path / "ft"
    _ok(["finetune", "--plan", str(plan_file), "--checkpoint", str(swin["checkpoint"]), "--out", str(ft),
         "--epochs", "1", "--selector-warmup", "0", "--train-subset", "128", "--batch-size", "32",
         "--latency-weight", "1", "--target-ms", str(target), "--tables", str(swin["tables"])])  # fmt: skip
    with (ft / "metrics.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    windows_at = {1: 16, 2: 16, 4: 4}  # windows of the grid each location prunes
    before = plan.previous_keep(create_model(MODEL))
    acting = [(k, windows_at[loc]) for loc, k, b in zip(plan.locations, plan.keep, before, strict=True) if k < b]
    kept = [float(v) for v in row["kept"].split("/")]
    expected = [round(k * n) / n for k, n in acting]
    assert kept == pytest.approx(expected, abs=5.1e-4)  # metrics.csv rounds to 3 decimals (7/16: 0.438)
    assert float(row["ratio"]) > 0 and float(row["distill"]) > 0 and float(row["tokens"]) > 0
    assert row["latency"] != ""

    # the trained selectors score a new search at the locations they were trained at (finetune
    # drops a stage that keeps as much as reaches it: the search may leave one idle, seen in CI)
    trained_at = plan.without_idle_stages(create_model(MODEL)).locations
    searched = tmp_path / "again.yaml"
    again = json.loads(_ok(["optimize", *common, "--method", "spvit", "--checkpoint", str(ft / "model.pt"),
                            "--out", str(searched)]))  # fmt: skip
    assert again["scored_by"] == "spvit" and sp.PruningPlan.load(searched).locations == trained_at

    onnx = tmp_path / "m.onnx"
    # 1%: a model trained for 3 epochs (near chance) has windows whose mean keep probabilities tie to
    # float precision, and ORT may rank them otherwise (seen once in CI: 1 of 400 images)
    exported = _ok(["export", "--plan", str(searched), "--checkpoint", str(ft / "model.pt"), "--format", "onnx",
                    "--out", str(onnx), "--allow-disagree", "4"])  # fmt: skip
    assert "same top-1 on" in exported
    measured = json.loads(_ok(["measure", "--plan", str(searched), "--checkpoint", str(ft / "model.pt"),
                               "--tables", str(swin["tables"]), "--rounds", "3", "--json"]))  # fmt: skip
    assert measured["measured"]["median_ms"] > 0 and measured["prediction"]["predicted_ms"] > 0
    assert measured["prediction"]["tokens_per_block"] == list(
        sp.PruningPlan.load(searched).tokens_per_block(create_model(MODEL))
    )


def test_two_process_ddp_finetune_matches_one_process(tmp_path, swin):
    plan = sp.PruningPlan(locations=(1, 4), keep=(0.5, 0.5), model=MODEL).save(tmp_path / "plan.yaml")
    losses = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        args = ["finetune", "--plan", str(plan), "--checkpoint", str(swin["checkpoint"]), "--out", str(out),
                "--epochs", "1", "--train-subset", "128", "--batch-size", "32", "--no-augment"]  # fmt: skip
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}",
                    f"--master-port={free_port()}", "-m", "spvit_search.cli"] if procs > 1 else CLI  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(2 // procs)}
        done = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        with (out / "steps.csv").open() as fh:
            losses[procs] = [float(r["loss"]) for r in csv.DictReader(fh)]
    assert len(losses[1]) == len(losses[2]) == 4
    assert losses[1] == pytest.approx(losses[2], rel=2e-3)


def test_fine_tuned_swin_exports_to_tflite_matching_torch(tmp_path, swin):
    from spvit_search.export import export_tflite, tflite_runner

    plan = sp.PruningPlan(locations=(1, 4), keep=(0.5, 0.75), model=MODEL)
    model = build_model(MODEL, swin["checkpoint"], plan).eval()
    images = torch.randn(1, *sp.models.input_shape(model))
    with torch.no_grad():
        expected = model(images).numpy()
    out = tflite_runner(export_tflite(model, Path(tmp_path) / "m.tflite"))(images.numpy())
    assert abs(out - expected).max() <= 1e-4
