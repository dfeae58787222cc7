"""`spvit-search profile` on this host: a complete table, resumed runs, the plot and metadata."""

import json

from click.testing import CliRunner

from spvit_search.blocks import model_parts
from spvit_search.cli import main
from spvit_search.latency import COLUMNS, LatencyTable
from spvit_search.models import create_model

MODEL = "deit_tiny_patch16_224"


def test_profile_builds_complete_table_then_resumes(tmp_path):
    runner = CliRunner()
    args = ["profile", "--device", "local", "--model", MODEL, "--out", str(tmp_path), "--rounds", "2", "--runs", "3"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    path = tmp_path / "local" / "onnxruntime-t1-b1.csv"
    table = LatencyTable.open(path)
    parts = model_parts(create_model(MODEL))
    expected = {(p.signature, n) for p in parts for n in p.grid}
    assert {(r.signature, r.tokens) for r in table.rows.itertuples()} == expected
    assert list(table.rows.columns) == list(COLUMNS)
    assert (table.rows["median_ms"] > 0).all() and (table.rows["runtime"] == "onnxruntime").all()
    # every block signature once: DeiT-T's 12 blocks are one signature
    assert sum(p.kind == "block" for p in parts) == 1
    assert path.with_suffix(".png").stat().st_size > 10_000
    meta = json.loads(path.with_suffix(".meta.json").read_text())
    assert meta["sessions"][-1]["status"] == "complete" and meta["device"]["name"] == "local"

    again = runner.invoke(main, args)
    assert again.exit_code == 0 and f"0 points measured, {len(expected)} already there" in again.output
    forced = runner.invoke(main, [*args, "--force", "--tokens", "50,100"])
    assert forced.exit_code == 0 and "points measured" in forced.output


def test_profile_refuses_bad_input(tmp_path):
    runner = CliRunner()
    out = runner.invoke(main, ["profile", "--device", "phone", "--model", MODEL, "--out", str(tmp_path)])
    assert out.exit_code == 2 and "unknown device 'phone'" in out.output
    out = runner.invoke(main, ["profile", "--model", "resnet18", "--out", str(tmp_path)])
    assert out.exit_code == 2 and "not supported" in out.output
    out = runner.invoke(main, ["profile", "--model", MODEL, "--tokens", "5000", "--out", str(tmp_path)])
    assert out.exit_code == 2 and "outside" in out.output


def test_profile_local_litert_runtime(tmp_path):
    devices = tmp_path / "devices.yaml"
    devices.write_text("lite:\n  transport: local\n  runtime: tflite\n  threads: 1\n")
    args = ["profile", "--device", "lite", "--devices", str(devices), "--model", MODEL, "--out", str(tmp_path),
            "--methods", "evit", "--tokens", "70,197", "--rounds", "2", "--runs", "3"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    table = LatencyTable.open(tmp_path / "lite" / "tflite-t1-b1.csv")
    assert len(table.rows) == 1 + 2 + 2 + 2  # stem, block, evit selector, head
    assert table.rows.runtime_version.iloc[0].startswith("ai-edge-litert")
    assert (table.rows.median_ms > 0).all()


def test_profile_pit_measures_its_grids_then_predicts_and_measures(tmp_path):
    """A PiT: blocks and selectors at each grid's width, the pooling layers, a class-token head;
    then `predict` reads that table and refuses a plan whose ratios rise within a grid."""
    name = "pit_demo_digits"
    runner = CliRunner()
    common = ["--device", "local", "--model", name, "--out", str(tmp_path)]
    result = runner.invoke(main, ["profile", *common, "--rounds", "2", "--runs", "3"])
    assert result.exit_code == 0, result.output
    table = LatencyTable.open(tmp_path / "local" / "onnxruntime-t1-b1.csv")
    parts = model_parts(create_model(name))
    expected = {(p.signature, n) for p in parts for n in p.grid}
    assert {(r.signature, r.tokens) for r in table.rows.itertuples()} == expected
    assert {p.kind for p in parts} == {"stem", "block", "downsample", "selector", "head"}
    plan = ["--keep", "0.6,0.5,0.75", "--locations", "1,3,6", "--tables", str(tmp_path)]
    predicted = runner.invoke(main, ["predict", "--model", name, *plan, "--json"])
    assert predicted.exit_code == 0, predicted.output
    data = json.loads(predicted.output)
    assert data["tokens_per_block"] == [226, 137, 137, 35, 35, 35, 16]
    assert data["breakdown_ms"]["downsample"] > 0 and len(data["breakdown_ms"]["selectors"]) == 3
    rising = runner.invoke(main, ["predict", "--model", name, "--keep", "0.5,0.7", "--locations", "3,4",
                                  "--tables", str(tmp_path)])  # fmt: skip
    assert rising.exit_code == 2 and "must not increase within stage 1 (blocks 3..5)" in rising.output
