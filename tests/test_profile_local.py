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
