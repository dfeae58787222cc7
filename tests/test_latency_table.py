"""Latency tables: append-as-measured CSV, schema checks, fits."""

import json

import numpy as np
import pytest

from spvit_search.latency import COLUMNS, LatencyTable, LatencyTableError, fit_curve


def _row(sig, n, ms, at="2026-01-01T00:00:00+00:00"):
    return {"signature": sig, "tokens": n, "median_ms": ms, "p10_ms": ms * 0.9, "p90_ms": ms * 1.1, "mean_ms": ms,
            "std_ms": 0.01, "runs": 50, "rounds": 5, "runtime": "onnxruntime", "runtime_version": "onnxruntime 1",
            "threads": 1, "batch": 1, "measured_at": at}  # fmt: skip


def test_rows_are_written_at_once_and_reloaded(tmp_path):
    path = tmp_path / "local" / "onnxruntime-t1-b1.csv"
    table = LatencyTable.open(path)
    table.append([_row("b", 10, 1.0), _row("b", 20, 2.0)])
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    table.append([_row("b", 10, 1.5, at="2026-01-02T00:00:00+00:00")])  # re-measured: the newest wins
    again = LatencyTable.open(path)
    assert again.has("b", 10) and again.has("b", 20) and not again.has("b", 30)
    assert again.points("b")["median_ms"].tolist() == [1.5, 2.0]
    table.meta["sessions"].append({"status": "complete"})
    table.save_meta()
    assert json.loads(path.with_suffix(".meta.json").read_text())["schema_version"] == 1


def test_quadratic_fit_recovers_shape():
    n = np.array([10, 40, 80, 120, 160, 197])
    fit = fit_curve(n, 0.1 + 0.04 * n + 2e-5 * n**2)
    assert fit(100) == pytest.approx(0.1 + 4 + 0.2)
    assert fit_curve([197], [3.0])(50) == pytest.approx(3.0)  # one point: a constant (the stem)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("signature,tokens\nb,10\n", "missing columns"),
        (
            ",".join(COLUMNS) + "\n" + "b,ten,1,1,1,1,0,5,5,onnxruntime,v,1,1,t\n",
            "line 2: column tokens is not a number",
        ),
    ],
)
def test_malformed_tables_are_refused_with_the_reason(tmp_path, content, message):
    path = tmp_path / "t.csv"
    path.write_text(content)
    with pytest.raises(LatencyTableError, match=message):
        LatencyTable.open(path)


def test_meta_schema_version_is_checked(tmp_path):
    path = tmp_path / "t.csv"
    path.with_suffix(".meta.json").write_text('{"schema_version": 99}')
    with pytest.raises(LatencyTableError, match="schema version 99"):
        LatencyTable.open(path)
