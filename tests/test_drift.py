"""A table from another day (×0.75, ×1.25): `optimize`'s drift check catches it before the search,
the plan ships measured within −5%…0 of the target, at most two measurements dearer than fresh.

The shipped Fashion-MNIST model (trained, 87.8% top-1), scored by top-1 on 256 calibration images
at optimize's default 3 candidates a round. Not random-weight DeiT-T scored by agreement: there a
plan at 0.78-0.93 of the target can score more than the tie band above every slower plan (32
images), and the search rightly ships it, so the window would test the objective, not the drift.

Each scenario gets three attempts (``_in_attempts``): this host's speed has spells within a
minute (seen here: the unpruned model measured 2.08 ms a minute after 1.02 ms, and a CI machine
34% apart between two checks), which no one run of a timed search can tell from staleness. A
search without the drift check fails every attempt (a slower-day table ships at 0.79-0.82).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from click.testing import CliRunner

import spvit_search as sp
from spvit_search.cli import main
from spvit_search.devices import DeviceRegistry
from spvit_search.latency import table_path, write_rescaled
from spvit_search.models import build_model
from spvit_search.predictor import PlanLatency

MODEL = "vit_demo_fashion"
T = TypeVar("T")
CHECKPOINT = Path(__file__).resolve().parents[1] / "benchmarks" / "checkpoints" / "vit_demo_fashion.pt"


def _in_attempts(scenario: Callable[[int], T], attempts: int = 3) -> T:
    """``scenario(attempt)``'s result from the first attempt that raised no AssertionError."""
    failures = []
    for attempt in range(attempts):
        try:
            return scenario(attempt)
        except AssertionError as err:
            failures.append(f"attempt {attempt + 1}: {str(err)[:1500]}")
    raise AssertionError("\n".join(failures))


def _table(root: Path) -> Path:
    return table_path(root, "local", "onnxruntime", 1, 1)


def _predicted_unpruned_ms(tables: Path) -> float:
    """The unpruned model's latency as the (calibrated) table under ``tables`` predicts it."""
    model = build_model(MODEL)
    latency = PlanLatency.for_device(DeviceRegistry.load().get("local"), model, MODEL, root=tables)
    return latency.predict(sp.PruningPlan(locations=(len(model.blocks) - 1,), keep=(1.0,))).total_ms


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """The model profiled and calibrated here and now, a target at 80% of its dense prediction, and
    the search on this table as measured (the baseline)."""
    root = tmp_path_factory.mktemp("fashion")
    runner = CliRunner()
    for args in (
        ["profile", "--model", MODEL, "--out", str(root / "fresh"), "--rounds", "4", "--runs", "5"],
        ["calibrate", "--model", MODEL, "--tables", str(root / "fresh"), "--points", "5", "--rounds", "4"],
    ):
        done = runner.invoke(main, args)
        assert done.exit_code == 0, done.output
    target = round(0.8 * _predicted_unpruned_ms(root / "fresh"), 4)

    def baseline_search(attempt: int) -> dict:
        shutil.copytree(root / "fresh", root / f"baseline-{attempt}")
        return _optimize(root / f"baseline-{attempt}", target)[0]

    baseline = _in_attempts(baseline_search)
    return {"root": root, "target": target, "baseline": baseline}


def _optimize(tables: Path, target: float):
    out = tables / "plan.yaml"
    args = ["optimize", "--model", MODEL, "--tables", str(tables), "--checkpoint", str(CHECKPOINT), "--data", "fashion",
            "--target-ms", str(target), "--trials", "40", "--out", str(out), "--json"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output), sp.PruningPlan.load(out)


@pytest.mark.parametrize("factor", [0.75, 1.25], ids=["faster-day", "slower-day"])
def test_a_stale_table_is_caught_before_the_search(fresh, factor):
    _in_attempts(lambda attempt: _stale_search(fresh, factor, attempt))


def _stale_search(fresh: dict, factor: float, attempt: int) -> None:
    stale = fresh["root"] / f"stale-{factor}-{attempt}"
    write_rescaled(_table(fresh["root"] / "fresh"), _table(stale), factor)
    predicted_unpruned = _predicted_unpruned_ms(stale)
    summary, plan = _optimize(stale, fresh["target"])
    target, baseline = fresh["target"], fresh["baseline"]
    rows = [(c["keep"], c["predicted_ms"], c["measured_ms"], c["raw_ms"], c["reference_ms"])
            for c in summary["candidates"]]  # fmt: skip
    # the goal is −5%…0 (benchmarks/drift.py: 32 of 32 stale runs of this model, 0.950-0.998, each
    # candidate judged by its ratio to the unpruned model measured alongside it). Before that, a CI
    # machine's slow spell in the first round (every candidate +22-28% over its prediction, the
    # next round normal) shipped a plan at 0.825; the test takes −10%. Without the check a
    # slower-day table ships at 0.79-0.82 (the benchmark), which this still tells apart
    assert 0.90 * target <= plan.measured_ms <= target, (target, rows)
    # the check measured the staleness the search then met: its measured/predicted of the unpruned
    # model agrees with that of the unpruned model measured alongside the candidates, minutes later
    # in the same run (one taken against the fresh table would be ×1.25 or ×0.75 off). Not
    # against the baseline run's check: a CI machine's speed moved 34% between the two (the check
    # here ×1.07 the baseline's on a slower-day table, yet the plan shipped within the target)
    references = sorted({c["reference_ms"] for c in summary["candidates"]})
    later = float(np.median(references)) / predicted_unpruned
    assert summary["table_off_by"] == pytest.approx(later, rel=0.2), (summary["table_off_by"], references, rows)
    # the goal is two more: benchmarks/drift.py met it in every stale run of this model (one round
    # each, like the fresh table's); a round of misses on either side costs 2-4, hence +4
    assert summary["measurements"] <= baseline["measurements"] + 4, (rows, baseline["candidates"])


def test_the_drift_check_is_reported(fresh, tmp_path):
    _in_attempts(lambda attempt: _reported_search(fresh, tmp_path / str(attempt)))


def _reported_search(fresh: dict, tmp_path: Path) -> None:
    stale = tmp_path / "stale"
    write_rescaled(_table(fresh["root"] / "fresh"), _table(stale), 1.25)
    # 0.9 of the unpruned prediction, not 0.8: this test reads the report, and a host's slow spell
    # (seen: every candidate 15-30% over 0.8) would fail the search before it reported anything
    target = round(fresh["target"] / 0.8 * 0.9, 4)
    args = ["optimize", "--model", MODEL, "--tables", str(stale), "--checkpoint", str(CHECKPOINT), "--data",
            "fashion", "--calib-images", "64", "--target-ms", str(target), "--trials", "12", "--out",
            str(tmp_path / "plan.yaml")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "the table predicted the unpruned model" in result.output and "% slow" in result.output, result.output
    assert "whole-model measurements on the device:" in result.output
