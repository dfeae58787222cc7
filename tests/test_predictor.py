"""Latency prediction from a table: exact token counts, vectorised, refusals, calibration."""

import json
import random

import numpy as np
import pytest
from click.testing import CliRunner

import spvit_search as sp
from spvit_search.blocks import model_parts
from spvit_search.cli import main
from spvit_search.devices import DeviceRegistry
from spvit_search.latency import LatencyTable, LatencyTableError, table_path
from spvit_search.models import create_model
from spvit_search.predictor import PlanLatency, fit_calibration

MODEL = "deit_tiny_patch16_224"


def _synthetic_table(tmp_path, model, threads=1, batch=1, runtime="onnxruntime", device="local", parts=None):
    """A table with known curves: every part costs 0.5 + 0.01·N + 1e-5·N² ms (× 2 for ``-propattn`` blocks)."""
    rows = []
    for part in model_parts(model, parts or tuple(sp.METHODS)):
        for n in part.grid:
            ms = (0.5 + 0.01 * n + 1e-5 * n * n) * (2 if part.signature.endswith("-propattn") else 1)
            rows.append({"signature": part.signature, "tokens": n, "median_ms": ms, "p10_ms": ms, "p90_ms": ms,
                         "mean_ms": ms, "std_ms": 0.0, "runs": 10, "rounds": 5, "runtime": runtime,
                         "runtime_version": "test", "threads": threads, "batch": batch,
                         "measured_at": "2026-01-01T00:00:00+00:00"})  # fmt: skip
    path = table_path(tmp_path, device, runtime, threads, batch)
    table = LatencyTable.open(path)
    table.append(rows)
    table.save_meta()
    return path


def _random_plans(n, depth=12, seed=0):
    rng = random.Random(seed)
    plans = []
    for _ in range(n):
        locs = tuple(sorted(rng.sample(range(1, depth), rng.randint(1, 4))))
        keep, k = [], 1.0
        for _ in locs:
            k *= rng.choice([1.0, rng.uniform(0.2, 1.0)])
            keep.append(round(k, 3))
        plans.append(sp.PruningPlan(locations=locs, keep=tuple(keep), method=rng.choice(list(sp.METHODS))))
    return plans


@pytest.fixture(scope="module")
def model():
    return create_model(MODEL)


def test_vectorised_token_counts_equal_the_pruning_mechanism(tmp_path, model):
    latency = PlanLatency(LatencyTable.open(_synthetic_table(tmp_path, model)), model, MODEL)
    for plan in _random_plans(200):
        tokens, _ = latency.tokens(np.array([plan.keep]), plan.locations, plan.package_token)
        assert tuple(tokens[0]) == plan.tokens_per_block(model), plan


def test_prediction_is_the_sum_of_parts_and_batches_agree(tmp_path, model):
    latency = PlanLatency(LatencyTable.open(_synthetic_table(tmp_path, model)), model, MODEL)
    curve = lambda n: 0.5 + 0.01 * n + 1e-5 * n * n  # noqa: E731
    plan = sp.PruningPlan(locations=(3, 6, 9), keep=(0.7, 0.49, 0.343))
    pred = latency.predict(plan)
    tokens = plan.tokens_per_block(model)
    assert pred.blocks_ms == pytest.approx([curve(n) for n in tokens])
    assert pred.selectors_ms == pytest.approx([curve(197), curve(tokens[5]), curve(tokens[8])])
    assert pred.total_ms == pytest.approx(curve(197) + sum(pred.blocks_ms) + sum(pred.selectors_ms) + curve(tokens[-1]))
    dense = latency.predict(sp.PruningPlan(locations=(6,), keep=(1.0,)))
    assert dense.selectors_ms == (0.0,) and dense.total_ms == pytest.approx(curve(197) * 14)
    for method in sp.METHODS:
        same = [p.replace(method=method, package_token=None) for p in _random_plans(30) if len(p.locations) == 3]
        many = latency.predict_many(np.array([p.keep for p in same]), same[0].locations, method)
        fixed = [p.replace(locations=same[0].locations) for p in same]
        assert many == pytest.approx([latency.predict(p).total_ms for p in fixed])


def test_tome_predicts_merge_rounds_and_proportional_blocks_after_the_first_merge(tmp_path, model):
    latency = PlanLatency(LatencyTable.open(_synthetic_table(tmp_path, model)), model, MODEL)
    curve = lambda n: 0.5 + 0.01 * n + 1e-5 * n * n  # noqa: E731
    plan = sp.PruningPlan(locations=(3, 6, 9), keep=(1.0, 0.49, 0.2), method="tome")
    pred = latency.predict(plan)
    tokens = plan.tokens_per_block(model)
    assert tokens == (197,) * 6 + (97,) * 3 + (40,) * 3
    assert pred.blocks_ms == pytest.approx([curve(n) * (2 if i >= 6 else 1) for i, n in enumerate(tokens)])
    # stage 1 idle; 196 → 96 patches in rounds of 98 and 2; 96 → 39 in rounds of 48 and 9
    assert pred.selectors_ms == pytest.approx([0.0, curve(197) + curve(99), curve(97) + curve(49)])
    many = latency.predict_many(np.array([plan.keep, (0.7, 0.49, 0.2)]), plan.locations, "tome", calibrated=False)
    assert many[0] == pytest.approx(pred.parts_ms)


def test_a_method_without_its_parts_in_the_table_names_the_profile_command(tmp_path, model):
    table = LatencyTable.open(_synthetic_table(tmp_path, model, parts=("spvit", "evit")))
    latency = PlanLatency(table, model, MODEL)
    assert latency.predict(sp.PruningPlan(method="evit")).total_ms > 0
    with pytest.raises(LatencyTableError, match=r"selector-tome.*proportional attention.*profile --methods tome"):
        latency.predict(sp.PruningPlan(method="tome"))
    with pytest.raises(LatencyTableError, match=r"selector-hard"):
        PlanLatency(table, model, MODEL, methods=("hard",))


@pytest.mark.parametrize(
    ("setting", "message"),
    [({"threads": 2}, "threads 2; this device runs threads 1"), ({"batch": 4}, "batch 4; this device runs batch 1")],
)
def test_tables_of_other_threads_or_batch_are_refused(tmp_path, model, setting, message):
    path = _synthetic_table(tmp_path, model, **setting)
    table = LatencyTable.open(path)
    with pytest.raises(LatencyTableError, match=message):
        table.check_setting("onnxruntime", 1, 1)
    with pytest.raises(LatencyTableError, match="runtime onnxruntime; this device runs runtime tflite"):
        table.check_setting("tflite", setting.get("threads", 1), setting.get("batch", 1))


def test_table_of_other_signatures_is_refused(tmp_path, model):
    other = create_model("deit_small_patch16_224")
    table = LatencyTable.open(_synthetic_table(tmp_path, model))
    with pytest.raises(
        LatencyTableError, match=r"no rows for .*vit_block-d384-h6-mlp4 \(blocks\).*spvit-search profile"
    ):
        PlanLatency(table, other, "deit_small_patch16_224")


def test_missing_table_names_the_profile_command(tmp_path, model):
    device = DeviceRegistry.load().get("local").model_copy(update={"threads": 2})
    with pytest.raises(LatencyTableError, match=f"spvit-search profile --device local --model {MODEL} --threads 2"):
        PlanLatency.for_device(device, model, MODEL, root=tmp_path)


def test_merging_tables(tmp_path, model):
    a = _synthetic_table(tmp_path / "a", model)
    b = _synthetic_table(tmp_path / "b", model, threads=2)
    with pytest.raises(LatencyTableError, match="cannot merge"):
        LatencyTable.merged([a, b])
    c = _synthetic_table(tmp_path / "c", model)
    merged = LatencyTable.merged([a, c])
    assert len(merged.rows) == len(LatencyTable.open(a).rows)


def test_calibration_is_fitted_stored_and_reported(tmp_path, model):
    assert fit_calibration([10.0], [11.0]).scale == pytest.approx(1.1)
    # a falling line (points measured under load) is not a device's behaviour: the scale alone
    noisy = fit_calibration([2.0, 3.0, 4.0], [6.0, 5.5, 5.0])
    assert noisy.scale == pytest.approx(5.5 / 3.0) and noisy.offset_ms == 0.0
    cal = fit_calibration([10.0, 20.0, 40.0], [12.0, 22.0, 42.0])
    assert cal.scale == pytest.approx(1.0) and cal.offset_ms == pytest.approx(2.0) and cal.points == 3
    path = _synthetic_table(tmp_path, model)
    latency = PlanLatency(LatencyTable.open(path), model, MODEL)
    plans = _random_plans(3, seed=4)
    for plan in plans:
        latency.add_calibration_points([(plan, latency.predict(plan).parts_ms * 1.05 + 0.3)])
    again = PlanLatency(LatencyTable.open(path), model, MODEL)  # read back from the metadata
    assert again.calibration.scale == pytest.approx(1.05) and again.calibration.offset_ms == pytest.approx(0.3)
    pred = again.predict(plans[0])
    assert pred.total_ms == pytest.approx(pred.parts_ms * 1.05 + 0.3)
    assert "calibrated ×1.050 +0.30 ms from 3" in again.calibration.describe()
    assert json.loads(path.with_suffix(".meta.json").read_text())["calibration"][MODEL]["points"][0]["measured_ms"] > 0


def test_a_session_drift_factor_scales_every_prediction_and_stays_in_the_session(tmp_path, model):
    path = _synthetic_table(tmp_path, model)
    latency = PlanLatency(LatencyTable.open(path), model, MODEL)
    plans = _random_plans(5, seed=7)
    base = [latency.predict(p).total_ms for p in plans]
    # the device runs 10%, 20% and 30% slower on three measured plans: the median says 20%
    factor = latency.correct_drift([(p, ms * r) for p, ms, r in zip(plans, base, (1.1, 1.3, 1.2), strict=False)])
    assert factor == pytest.approx(1.2)
    assert [latency.predict(p).total_ms for p in plans] == pytest.approx([1.2 * b for b in base])
    keep = np.array([plans[4].keep])
    assert latency.predict_many(keep, plans[4].locations, plans[4].method)[0] == pytest.approx(1.2 * base[4])
    assert latency.predict(plans[0]).drift == pytest.approx(1.2)
    # refitted from its own (uncorrected) predictions: correcting again does not compound
    assert latency.correct_drift([(plans[0], base[0] * 1.2)]) == pytest.approx(1.2)
    assert PlanLatency(LatencyTable.open(path), model, MODEL).drift == 1.0  # nothing written to the table
    assert latency.correct_drift([]) == 1.0 and latency.predict(plans[0]).total_ms == pytest.approx(base[0])


def test_predict_cli_breakdown_and_errors(tmp_path, model):
    _synthetic_table(tmp_path, model)
    runner = CliRunner()
    args = ["predict", "--model", MODEL, "--keep", "0.7,0.49,0.343", "--tables", str(tmp_path)]
    out = runner.invoke(main, [*args, "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["tokens_per_block"][-1] == 71 and len(data["breakdown_ms"]["blocks"]) == 12
    assert data["prediction_cost_ms"] < 5
    human = runner.invoke(main, args)
    assert "blocks  9-11 at   71 tokens" in human.output
    wrong = runner.invoke(main, [*args, "--threads", "2"])
    assert wrong.exit_code == 2 and "no latency table" in wrong.output


def test_measure_locally_with_calibration(tmp_path, model):
    runner = CliRunner()
    prof = runner.invoke(main, ["profile", "--model", MODEL, "--out", str(tmp_path), "--rounds", "3", "--runs", "3"])
    assert prof.exit_code == 0, prof.output
    args = [
        "measure",
        "--model",
        MODEL,
        "--keep",
        "0.7,0.49",
        "--tables",
        str(tmp_path),
        "--rounds",
        "3",
        "--runs",
        "3",
    ]
    out = runner.invoke(main, [*args, "--calibrate", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["measured"]["median_ms"] > 0 and data["prediction"]["calibration"]["points"] == 1
    # one point: the calibrated prediction reproduces that measurement
    assert data["error_pct"] == pytest.approx(0.0, abs=1e-6)
    plan = sp.PruningPlan(locations=(4, 8), keep=(0.7, 0.49), model=MODEL)
    plan_file = plan.save(tmp_path / "plan.yaml")
    by_plan = runner.invoke(main, ["measure", "--plan", str(plan_file), "--tables", str(tmp_path), "--rounds", "2"])
    assert by_plan.exit_code == 0 and "predicted" in by_plan.output and "error" in by_plan.output
    onnx = sp.export_onnx(create_model(MODEL).eval(), tmp_path / "dense.onnx")
    by_file = runner.invoke(main, ["measure", "--onnx", str(onnx), "--rounds", "2"])
    assert by_file.exit_code == 0 and "measured" in by_file.output
    assert runner.invoke(main, ["measure"]).exit_code == 2
    bad = runner.invoke(main, ["measure", "--onnx", str(tmp_path / "plan.yaml")])
    assert bad.exit_code == 2 and "not a readable ONNX model" in bad.output


def test_calibrate_command_measures_spread_plans_and_stores_them(tmp_path, model):
    runner = CliRunner()
    prof = runner.invoke(main, ["profile", "--model", MODEL, "--out", str(tmp_path), "--rounds", "2", "--runs", "3"])
    assert prof.exit_code == 0, prof.output
    out = runner.invoke(main, ["calibrate", "--model", MODEL, "--tables", str(tmp_path), "--points", "3",
                               "--rounds", "2", "--json"])  # fmt: skip
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    measured = [p["measured_ms"] for p in data["points"]]
    assert len(measured) == 3 and measured[0] == max(measured)  # the dense model first, the slowest
    assert data["points"][0]["keep"] == [1.0, 1.0, 1.0]
    meta = json.loads((tmp_path / "local" / "onnxruntime-t1-b1.meta.json").read_text())
    assert len(meta["calibration"][MODEL]["points"]) == 3 and meta["calibration"][MODEL]["scale"] > 0
    pred = runner.invoke(main, ["predict", "--model", MODEL, "--keep", "0.7", "--tables", str(tmp_path)])
    assert "calibrated ×" in pred.output


def test_pit_parts_tokens_and_prediction_follow_its_grids(tmp_path):
    """PiT: one block signature per stage, the pooling layers at a fixed cost, selectors at each
    stage's width, a head on the class tokens; counts restart at every grid and packages carry."""
    name, methods = "pit_demo_digits", ("spvit", "hard", "evit")
    model = create_model(name).eval()
    kinds = [p.kind for p in model_parts(model, methods)]
    assert {k: kinds.count(k) for k in set(kinds)} == {"stem": 1, "block": 3, "downsample": 2, "selector": 9,
                                                        "head": 1}  # fmt: skip
    latency = PlanLatency(LatencyTable.open(_synthetic_table(tmp_path, model, parts=methods)), model, name)
    layout, rng = latency.layout, random.Random(0)
    images = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    import torch

    for _ in range(25):
        locs = tuple(sorted(rng.sample(range(1, 7), rng.randint(1, 4))))
        keep = layout.cumulative_keep(locs, [rng.choice([1.0, rng.uniform(0.2, 1.0)]) for _ in locs])
        plan = sp.PruningPlan(locations=locs, keep=keep, method=rng.choice(["spvit", "hard"]))
        with torch.no_grad():
            sp.prune(model, plan)(torch.from_numpy(images))
        tokens, _ = latency.tokens(np.array([plan.keep]), plan.locations, plan.package_token)
        assert sp.pruning_state(model).token_counts == list(tokens[0]), plan
    curve = lambda n: 0.5 + 0.01 * n + 1e-5 * n * n  # noqa: E731
    plan = sp.PruningPlan(locations=(1, 3, 6), keep=(0.6, 0.5, 0.75))
    pred = latency.predict(plan)
    tokens = plan.tokens_per_block(sp.unprune(model))
    # class token + patches (+ this grid's package) | the packages of earlier grids ride in the prefix
    assert tokens == (226, 1 + 135 + 1, 1 + 135 + 1, 2 + 32 + 1, 2 + 32 + 1, 2 + 32 + 1, 3 + 12 + 1)
    assert pred.selectors_ms == pytest.approx([curve(226), curve(66), curve(19)])
    assert pred.downsample_ms == pytest.approx(2 * curve(1))
    expected = curve(226) + 2 * curve(1) + sum(curve(n) for n in tokens) + sum(pred.selectors_ms) + curve(1)
    assert pred.total_ms == pytest.approx(expected)
    many = latency.predict_many(np.array([plan.keep, (1.0, 1.0, 1.0)]), plan.locations, "spvit", calibrated=False)
    assert many[0] == pytest.approx(pred.parts_ms)
    assert many[1] == pytest.approx(curve(226) + 2 * curve(1) + curve(1) + sum(curve(n) for n in (226,) * 3 + (65,) * 3
                                                                                   + (17,)))  # fmt: skip


@pytest.mark.parametrize("name", ["vit_demo_digits", "pit_demo_digits", "swin_demo_digits"])
def test_calibration_plans_are_plans_each_family_accepts(name):
    """Spread plans whose locations every method of the family can take (EViT never at a PiT grid's
    first block, where the block before works on another grid) and that prune something."""
    from spvit_search.models import create_model
    from spvit_search.predictor import calibration_plans

    plans = calibration_plans(create_model(name), name)
    assert plans[0].is_dense and all(min(p.keep) < 1.0 for p in plans[1:])
    assert {p.method for p in plans[1:]} == set(sp.pruning.family_for(create_model(name)).methods) - {"tome"}
    for plan in plans:
        sp.prune(create_model(name), plan)  # refused with a PlanError if a location does not fit
