"""`spvit-search optimize`: constrained search, verification on the device, storage, workers, resume."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner

import spvit_search as sp
from spvit_search.cli import main
from spvit_search.devices import DeviceRegistry
from spvit_search.models import build_model
from spvit_search.optimize import OptimizeSettings, _space
from spvit_search.predictor import PlanLatency
from spvit_search.search import tie_band

MODEL = "vit_demo_digits"
CLI = [sys.executable, "-m", "spvit_search.cli"]


def _args(demo, *extra: str) -> list[str]:
    return ["optimize", "--model", MODEL, "--checkpoint", str(demo["checkpoint"]), "--tables", str(demo["tables"]),
            "--calib-images", "200", *extra]  # fmt: skip


def test_optimize_meets_the_target_on_the_device(tmp_path, demo):
    # 0.8 of the table's dense, not 0.7: the drift check scales the fastest plan (0.6-0.7 of dense)
    # by the host's speed now, and a host a few % slower than at profiling left 0.7 out of reach
    target = round(demo["dense_ms"] * 0.8, 3)
    out = tmp_path / "plan.yaml"
    result = CliRunner().invoke(main, _args(demo, "--target-ms", str(target), "--trials", "60", "--verify-top", "2",
                                            "--out", str(out), "--json"))  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    plan = sp.PruningPlan.load(out)
    assert plan.model == MODEL and plan.device == "local" and plan.target_ms == target
    assert plan.measured_ms is not None and plan.measured_ms <= target
    # predicted_ms is re-predicted with this session's drift factor: it may sit either side of the
    # target; the measurement is what must meet it
    assert plan.predicted_ms > 0 and plan.lut["sha256"] and len(plan.block_tokens) == 6
    assert summary["trials"]["trials"] in (60, 90, 120)  # more when every candidate missed and it searched again
    assert summary["trials"]["infeasible"] > 0
    assert (
        summary["trials"]["evaluated"] < summary["trials"]["trials"]
    )  # infeasible, pruned and duplicate trials cost no evaluation
    assert summary["candidates"] and all(c["measured_ms"] > 0 for c in summary["candidates"])
    assert Path(summary["plot"]).stat().st_size > 10_000
    # the drift check's and the candidates' measurements are recorded in the table's metadata
    meta = json.loads((demo["tables"] / "local" / "onnxruntime-t1-b1.meta.json").read_text())
    assert len(meta["calibration"][MODEL]["points"]) > 3


def test_a_target_share_is_judged_against_the_unpruned_model_measured_alongside(tmp_path, demo):
    out = tmp_path / "plan.yaml"
    # 0.8, not 0.7: on some days this host runs the small demo model's pruned plans slower than its table
    # says, and at 0.7 every verified candidate then missed (seen 2026-12-01, quiet host); the test is
    # about the share being judged against the unpruned model measured alongside, not about its tightness
    args = _args(demo, "--target-share", "0.8", "--trials", "40", "--verify-top", "2", "--out", str(out), "--json")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary, plan = json.loads(result.output), sp.PruningPlan.load(out)
    # the budget is 0.8 of the unpruned model as measured this session (its median over the drift
    # check and every round, each candidate measured alongside it), not of the table
    for c in summary["candidates"]:  # each judged by its ratio to the unpruned model of its own round
        anchor = c["session_unpruned_ms"]
        assert c["budget_ms"] == pytest.approx(0.8 * anchor, abs=2e-3)
        assert c["measured_ms"] == pytest.approx(c["raw_ms"] / c["reference_ms"] * anchor, abs=2e-3)
        if c["measured_ms"] != c["budget_ms"]:  # both rounded to 3 decimals: a tie says nothing (seen in CI)
            assert c["over_target"] == (c["measured_ms"] > c["budget_ms"])
    chosen = [c for c in summary["candidates"] if c["keep"] == list(plan.keep) and not c["over_target"]]
    assert chosen and plan.measured_ms <= plan.target_ms == summary["target_ms"]
    assert 0.35 * demo["dense_ms"] < plan.target_ms < 1.4 * demo["dense_ms"]  # 0.7 of a measurement, not of 0
    both = CliRunner().invoke(main, _args(demo, "--target-share", "0.7", "--target-ms", "9"))
    assert both.exit_code == 2 and "one target" in both.output
    whole = CliRunner().invoke(main, _args(demo, "--target-share", "1.5"))
    assert whole.exit_code != 0 and "share 1.5" in whole.output


@pytest.mark.parametrize("method", ["spvit", "hard"])
def test_a_learned_method_on_a_plain_checkpoint_is_placed_by_the_evit_proxy(tmp_path, demo, method):
    """Before its fine-tune, spvit's budget is placed with EViT's scores but spvit's own latency."""
    from spvit_search.evaluate import PlanEvaluator
    from spvit_search.optimize import calibration_tensors

    target = round(demo["dense_ms"] * 0.75, 3)
    out = tmp_path / "plan.yaml"
    done = CliRunner().invoke(main, _args(demo, "--method", method, "--target-ms", str(target), "--trials", "25",
                                          "--verify-top", "0", "--out", str(out), "--json"))  # fmt: skip
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output)
    plan = sp.PruningPlan.load(out)
    assert plan.method == method and summary["scored_by"] == "evit" and min(plan.keep) < 1.0
    assert plan.package_token == (method == "spvit")
    latency = PlanLatency.for_device(DeviceRegistry.load().get("local"), build_model(MODEL), MODEL,
                                     root=demo["tables"])  # fmt: skip
    assert latency.predict(plan).total_ms <= target  # the method's own latency (with its selector MLPs)
    # the reported accuracy is EViT's at the same ratios (fused token for spvit, dropped for hard)
    model = build_model(MODEL, demo["checkpoint"]).eval()
    images, labels = calibration_tensors("demo", 200, model)
    proxy = plan.replace(method="evit", package_token=method == "spvit")
    assert PlanEvaluator(model, images, labels, 0).evaluate(proxy) == pytest.approx(summary["accuracy"])


def test_a_flops_budget_places_the_plan_by_counted_flops_and_measures_nothing(tmp_path, demo):
    """--target-flops: feasibility is the plan's FLOPs as it runs (spvit: with its selector MLPs)."""
    out = tmp_path / "plan.yaml"
    done = CliRunner().invoke(main, _args(demo, "--method", "spvit", "--target-flops", "0.7", "--trials", "30",
                                          "--storage", f"journal:{tmp_path / 'study.log'}", "--study", "f",
                                          "--out", str(out), "--json"))  # fmt: skip
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output)
    plan = sp.PruningPlan.load(out)
    dense = sp.count_flops(build_model(MODEL)).macs
    share = sp.count_flops(sp.prune(build_model(MODEL), plan)).macs / dense
    assert plan.method == "spvit" and summary["scored_by"] == "evit"
    assert summary["flops_share"] == pytest.approx(share) and share <= 0.7
    # verify-top's default of 3 does not apply: a FLOPs count has nothing to measure on a device
    assert summary["measured_ms"] is None and summary["candidates"] == [] and summary["measurements"] == 0
    trials = [t for t in _load(tmp_path / "study.log", "f").trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert {t.user_attrs["evaluated"] for t in trials} == {True, False}  # both sides of the budget were tried
    for t in trials:
        assert t.user_attrs["evaluated"] == (t.user_attrs["flops_share"] <= 0.7)

    runner = CliRunner()
    small = runner.invoke(main, _args(demo, "--target-flops", "0.05", "--trials", "5"))
    assert small.exit_code == 2 and "below the smallest in the space" in small.output
    both = runner.invoke(main, _args(demo, "--target-flops", "0.7", "--target-ms", "1"))
    assert both.exit_code == 2 and "--target-ms and --target-flops" in both.output


def test_optimize_merges_tokens_with_tome_on_a_plain_checkpoint(tmp_path, demo):
    runner = CliRunner()
    args = ["--method", "tome", "--trials", "30", "--verify-top", "0", "--out", str(tmp_path / "plan.yaml"), "--json"]
    missing = runner.invoke(main, [*_args(demo, *args), "--target-ms", str(round(demo["dense_ms"] * 0.9, 3))])
    assert missing.exit_code == 2 and "selector-tome" in missing.output and "--methods tome" in missing.output
    # A table of its own, every part measured in the same interleaved rounds: seen on CI, ToMe's parts
    # added to the shared table in a slow spell put its fastest plan at 1.16x a dense model measured earlier.
    tables = str(tmp_path / "tables")
    profiled = runner.invoke(main, ["profile", "--model", MODEL, "--out", tables, "--rounds", "3", "--runs", "5",
                                    "--methods", "tome"])  # fmt: skip
    assert profiled.exit_code == 0, profiled.output
    # halfway between ToMe's fastest plan and the dense model, both as this table predicts them: merging's
    # own cost on this tiny model leaves its fastest plan at 0.75-0.85 of dense, depending on the host
    device = DeviceRegistry.load().get("local")
    tome = PlanLatency.for_device(device, build_model(MODEL), MODEL, root=tables, methods=("tome",))
    space = _space(OptimizeSettings(target_ms=None, methods=("tome",)), tome.layout, None, None)
    dense_ms = tome.predict(sp.PruningPlan(locations=(2,), keep=(1.0,), method="tome")).total_ms
    target = round((space.fastest(tome)[0] + dense_ms) / 2, 3)
    optimize = ["optimize", "--model", MODEL, "--checkpoint", str(demo["checkpoint"]), "--tables", tables,
                "--calib-images", "200", *args, "--target-ms", str(target)]  # fmt: skip
    done = runner.invoke(main, optimize)
    assert done.exit_code == 0, done.output
    plan = sp.PruningPlan.load(tmp_path / "plan.yaml")
    assert plan.method == "tome" and not plan.package_token and min(plan.keep) < 1.0
    assert tome.predict(plan).total_ms <= target


def test_infeasible_target_and_unknown_device_are_refused(demo):
    runner = CliRunner()
    tiny = runner.invoke(main, _args(demo, "--target-ms", "0.001", "--trials", "5"))
    assert tiny.exit_code == 2 and "below the minimum achievable" in tiny.output and "ms on local" in tiny.output
    nodev = runner.invoke(main, _args(demo, "--target-ms", "1", "--device", "phone"))
    assert nodev.exit_code == 2 and "unknown device 'phone'" in nodev.output
    noshare = runner.invoke(main, _args(demo, "--target-ms", str(demo["dense_ms"]), "--workers", "2"))
    assert noshare.exit_code == 2 and "--workers needs a shared --storage" in noshare.output
    noweights = runner.invoke(main, ["optimize", "--model", MODEL, "--tables", str(demo["tables"]), "--target-ms",
                                     str(demo["dense_ms"]), "--method", "spvit"])  # fmt: skip
    assert noweights.exit_code == 2 and "needs a --checkpoint" in noweights.output


COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _load(storage: Path, name: str) -> optuna.Study:
    from spvit_search.sharing import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(f"journal:{storage}"))


def test_two_workers_share_one_study_without_duplicated_trials(tmp_path, demo):
    journal = tmp_path / "study.log"
    target = demo["dense_ms"] * 0.75
    # 120 trials, not 40: the helper process starts from scratch (imports, model, calibration images)
    # while the lead is ready; 40 trials were sometimes over before it joined (CI, 2026-12-02)
    args = _args(demo, "--target-ms", f"{target:.3f}", "--trials", "120", "--workers", "2", "--verify-top", "0",
                 "--storage", f"journal:{journal}", "--study", "shared",
                 "--out", str(tmp_path / "plan.yaml"))  # fmt: skip
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    study = _load(journal, "shared")
    trials = [t for t in study.trials if t.state in COUNTED]
    assert 120 <= len(trials) <= 121  # the last trials may finish together
    assert len({t.number for t in study.trials}) == len(study.trials)
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both processes ran trials
    evaluated = [t.user_attrs["plan_key"] for t in trials
                 if t.user_attrs.get("evaluated") and "duplicate_of" not in t.user_attrs]  # fmt: skip
    assert len(evaluated) == len(set(evaluated))  # no plan was evaluated twice


def test_a_worker_judges_feasibility_by_the_leads_budget(tmp_path, demo):
    """With --target-share the lead's budget is a share of the unpruned model as the lead measured it;
    a worker's own table would put it elsewhere. The worker takes the budget the lead published."""
    journal = tmp_path / "study.log"
    worker = _args(demo, "--target-share", "0.9", "--trials", "8", "--worker", "--storage", f"journal:{journal}")
    from spvit_search.sharing import open_storage

    for name, lead_ms in (("lead-published", 0.01), ("no-lead-yet", None)):
        study = optuna.create_study(study_name=name, storage=open_storage(f"journal:{journal}"), direction="maximize")
        if lead_ms is not None:
            study.set_user_attr("target_ms", lead_ms)  # as the lead publishes it (optimize.publish_budget)
        done = CliRunner().invoke(main, [*worker, "--study", name])
        assert done.exit_code == 0, done.output
        trials = [t for t in _load(journal, name).trials if t.state in COUNTED]
        assert len(trials) >= 8
        if lead_ms is not None:  # every plan is over 0.01 ms: none evaluated, each constraint from that budget
            assert not any(t.user_attrs["evaluated"] for t in trials)
            for t in trials:
                assert t.system_attrs["constraints:latency_ms"] == pytest.approx(t.user_attrs["predicted_ms"] - lead_ms)
        else:  # its own 0.9 of its table's unpruned model: some plans fit and are evaluated
            assert any(t.user_attrs["evaluated"] for t in trials)


def test_killed_study_resumes_with_its_trials(tmp_path, demo):
    journal = tmp_path / "study.log"
    target = demo["dense_ms"] * 0.8
    extra = ["--target-ms", f"{target:.3f}", "--trials", "60", "--verify-top", "0", "--storage", f"journal:{journal}",
             "--study", "resume", "--out", str(tmp_path / "p.yaml")]  # fmt: skip
    args = [*CLI, *_args(demo, *extra)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    first: list = []
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if journal.exists():
            first = [t for t in _load(journal, "resume").trials if t.state.is_finished()]
            if len(first) >= 10:
                break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 10 <= len(first) < 60
    again = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    study = _load(journal, "resume")
    finished = [
        t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ]
    assert len(finished) == 60
    kept = {
        t.number: t.params
        for t in first
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    }
    assert all(study.trials[n].params == params for n, params in kept.items())  # the first run's trials are kept
    # the trial the kill interrupted (its process gone) was failed on resume and its plan run again
    assert not [t.number for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    for dead in [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]:
        retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
        # (a trial killed before it suggested all its factors is retried with those it had)
        assert len(retries) == 1 and all(retries[0].params[k] == v for k, v in dead.params.items())


def test_multi_objective_front(tmp_path, demo):
    result = CliRunner().invoke(main, _args(demo, "--target-ms", f"{demo['dense_ms'] * 0.8:.3f}", "--trials", "30",
                                            "--multi-objective", "--verify-top", "0", "--out",
                                            str(tmp_path / "plan.yaml"), "--json"))  # fmt: skip
    assert result.exit_code == 0, result.output
    front = json.loads(result.output)["pareto_front"]
    assert front and all(a["predicted_ms"] <= b["predicted_ms"] for a, b in itertools.pairwise(front))
    assert all(a["accuracy"] <= b["accuracy"] for a, b in itertools.pairwise(front))


def test_optimize_for_the_ssh_board(tmp_path, demo):
    sys.path.insert(0, str(Path(__file__).parent))
    from peers.sshd import OpenSshServer

    server = OpenSshServer(tmp_path / "sshd")
    try:
        known = tmp_path / "known_hosts"
        known.write_text(server.known_hosts_line())
        ssh = {"host": "127.0.0.1", "port": server.port, "user": server.user, "key": str(server.client_key),
               "known_hosts": str(known)}  # fmt: skip
        # pinned like the local device: on a VM whose cores differ, an unpinned runner's latency
        # depends on where the scheduler puts it
        mask = format(1 << max(os.sched_getaffinity(0)), "x")
        board = {"transport": "ssh", "runtime": "onnxruntime", "threads": 1, "workdir": str(tmp_path / "board"),
                 "python": sys.executable, "affinity": mask, "ssh": ssh}  # fmt: skip
        devices = tmp_path / "devices.yaml"
        devices.write_text(yaml.safe_dump({"board": board}))
        runner = CliRunner()
        tables = tmp_path / "tables"
        on_board = ["--device", "board", "--devices", str(devices), "--model", MODEL]
        calibrate = ["calibrate", *on_board, "--points", "3", "--rounds", "4", "--tables", str(tables)]
        for args in (["profile", *on_board, "--rounds", "4", "--runs", "5", "--out", str(tables)], calibrate):
            done = runner.invoke(main, args)
            assert done.exit_code == 0, done.output

        def measured(*what: str) -> tuple[float, float]:
            """(measured, predicted) ms of a model on the board, exported and timed end to end now."""
            done = runner.invoke(main, ["measure", *on_board[:4], *what, "--checkpoint", str(demo["checkpoint"]),
                                        "--tables", str(tables), "--json"])  # fmt: skip
            assert done.exit_code == 0, done.output
            out = json.loads(done.output)
            return out["measured"]["median_ms"], out["prediction"]["predicted_ms"]

        # the target is 75% of the board's own dense latency, measured now: the host drifts between
        # tests (CI saw this board 2x slower than the local device measured by the fixture)
        target = round(measured("--model", MODEL)[0] * 0.75, 3)
        plan_file = tmp_path / "plan.yaml"
        search = ["optimize", *on_board, "--checkpoint", str(demo["checkpoint"]), "--tables", str(tables),
                  "--target-ms", str(target), "--trials", "100", "--verify-top", "2", "--out", str(plan_file),
                  "--json"]  # fmt: skip
        result = runner.invoke(main, search)
        burst = ("slower than its table", "below the minimum achievable")  # table and board disagree on speed
        if result.exit_code != 0 and any(sign in result.output for sign in burst):
            # the product's own advice when a burst of host load slows the board during verification
            # (seen on CI: 2x for a minute): recalibrate and search again — once
            done = runner.invoke(main, calibrate)
            assert done.exit_code == 0, done.output
            result = runner.invoke(main, search)
        assert result.exit_code == 0, result.output
        plan = sp.PruningPlan.load(plan_file)
        assert plan.device == "board" and plan.measured_ms <= target
        # the chosen plan, exported on its own and measured end to end again next to the dense model:
        # it is faster. How close the predicted speed-up is, is benchmarks/latency_truth.py's to show
        # (a unit test on this noisy 2-core host cannot time that to a few percent)
        (plan_ms, plan_pred), (dense_ms, dense_pred) = measured("--plan", str(plan_file)), measured("--model", MODEL)
        assert plan_ms < dense_ms and plan_pred < dense_pred, (plan_ms, dense_ms, plan_pred, dense_pred)
    finally:
        server.stop()


def test_several_targets_give_one_plan_each(tmp_path, demo):
    targets = [round(demo["dense_ms"] * r, 3) for r in (0.75, 0.9)]
    out = tmp_path / "plan.yaml"
    args = _args(demo, "--targets", ",".join(map(str, targets)), "--trials", "25", "--verify-top", "0",
                 "--out", str(out), "--json")  # fmt: skip
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    summaries = json.loads(done.output)
    assert [s["target_ms"] for s in summaries] == targets
    latency = PlanLatency.for_device(DeviceRegistry.load().get("local"), build_model(MODEL), MODEL,
                                     root=demo["tables"])  # fmt: skip
    predicted = []
    for target in targets:
        plan = sp.PruningPlan.load(tmp_path / f"plan-{target:g}ms.yaml")
        assert plan.target_ms == target and latency.predict(plan).total_ms <= target
        predicted.append(latency.predict(plan).total_ms)
    assert predicted[0] < predicted[1]  # the looser budget buys a plan that keeps more
    both = CliRunner().invoke(main, [*args, "--target-ms", "1"])
    assert both.exit_code == 2 and "--targets runs one search per target" in both.output


def test_a_flat_objective_is_reported_with_what_to_pass():
    from spvit_search.optimize import flat_objective

    def study(scores):
        st = optuna.create_study(direction="maximize")
        for i, acc in enumerate(scores):
            attrs = {"evaluated": True, "accuracy": acc}
            st.add_trial(optuna.trial.create_trial(value=acc + 1e-6 * i, user_attrs=attrs))
        st.add_trial(optuna.trial.create_trial(value=0.0, user_attrs={"evaluated": False}))  # infeasible: not scored
        return st

    flat = flat_objective(study([0.0] * 12), "accuracy")
    assert "every one of the 12 evaluated plans scored 0.00%" in flat and "--objective agreement" in flat
    assert "--checkpoint" in flat_objective(study([50.0] * 5), "agreement")
    assert flat_objective(study([0.0, 0.0, 0.5]), "accuracy") is None  # plans that differ: ranked
    assert flat_objective(study([0.0, 0.0]), "accuracy") is None  # too few to say


def test_plans_tied_within_the_calibration_noise_are_ranked_slowest_first():
    from spvit_search.optimize import candidate_batch, safe_candidates
    from spvit_search.search import rank_within_noise, tie_band

    assert tie_band(50.0, 100) == pytest.approx(5.0)  # one standard error of a 50% estimate on 100 images
    assert tie_band(100.0, 32) == pytest.approx(100 / 32)  # at least one image
    assert tie_band(80.0, None) == 0.0
    plans = [("a", 90.0, 10.0), ("b", 88.0, 14.5), ("c", 80.0, 14.9), ("d", 89.5, 12.0)]
    ranked = rank_within_noise(plans, lambda p: p[1], lambda p: p[2], images=100)  # band: 3 points
    assert [p[0] for p in ranked] == ["b", "d", "a", "c"]
    assert [p[0] for p in rank_within_noise(plans, lambda p: p[1], lambda p: p[2], None)] == ["a", "d", "b", "c"]
    # a round: the best, and the best predicted at least 3% under the target (15 ms: 14.55 ms)
    rows = [("b", None, 14.9), ("c", None, 14.8), ("d", None, 12.0), ("a", None, 10.0)]
    assert [r[0] for r in candidate_batch(rows, 2, 15.0)] == ["b", "d"]
    assert [r[0] for r in candidate_batch(rows, 3, 15.0)] == ["b", "c", "d"]
    assert [r[0] for r in candidate_batch(rows, 2, 16.0)] == ["b", "c"]  # b is safe already: the next best
    assert [r[0] for r in candidate_batch(rows, 1, 15.0)] == ["b"]  # --verify-top 1: the best
    # a round after misses: the safe one, else the best
    assert [r[0] for r in safe_candidates(rows, 1, 15.0)] == ["d"]
    assert [r[0] for r in safe_candidates(rows, 1, 16.0)] == ["b"]
    assert [r[0] for r in safe_candidates(rows[:2], 1, 15.0)] == ["b"]


def test_the_unpruned_models_session_latency_is_a_median_weighted_by_rounds():
    """A round caught in a slow spell does not move it; three rounds that agree tie with the check."""
    from spvit_search.optimize import SessionMeasurements

    dense = sp.PruningPlan(locations=(5,), keep=(1.0,))
    session = SessionMeasurements()
    session.add_reference(dense, 1.0, 24)
    assert session.anchor_ms() == 1.0
    session.add_reference(dense, 1.3, 8)  # the first round, in a slow spell
    assert session.anchor_ms() == 1.0
    session.add_reference(dense, 1.2, 8)
    assert session.anchor_ms() == 1.0  # 24 of 40 rounds at 1.0: still the check
    session.add_reference(dense, 1.25, 8)
    assert session.anchor_ms() == pytest.approx(1.1)  # 24 against 24: between the two middle ones
    session.candidates = [(dense.replace(keep=(0.5,)), 0.8)]
    assert session.drift_points()[0][1] == pytest.approx(0.88)  # the candidate at the session's speed
    with pytest.raises(ValueError, match="no reference"):
        SessionMeasurements().anchor_ms()


def test_a_closer_look_measures_only_plans_that_could_rank_above_the_chosen_one():
    import optuna

    from spvit_search.optimize import could_displace

    def row(name: str, accuracy: float, predicted_ms: float):
        trial = optuna.trial.create_trial(value=accuracy, user_attrs={"accuracy": accuracy, "name": name})
        return trial, None, predicted_ms

    chosen = {"accuracy": 90.0, "measured_ms": 13.0}  # 100 images: the band is 3 points
    rows = [row("slower, tied", 88.0, 14.5), row("slower, better", 95.0, 14.0), row("slower, worse", 80.0, 14.9),
            row("faster, tied", 89.0, 12.0)]  # fmt: skip
    kept = [r[0].user_attrs["name"] for r in could_displace(rows, chosen, images=100)]
    assert kept == ["slower, tied", "slower, better"]
    assert could_displace(rows, chosen, images=None) == [rows[1]]  # no noise known: only a better score


def _selectors_checkpoint(demo, path: Path) -> Path:
    """The demo model with spvit selectors that score images differently (as trained ones do)."""
    torch.manual_seed(0)
    plan = sp.PruningPlan(locations=(2, 3, 5), keep=(0.5, 0.25, 0.125))
    model = sp.prune(build_model(MODEL, demo["checkpoint"]), plan)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "token_selector" in name:
                p.add_(torch.randn_like(p) * 0.5)
    torch.save({"model": model.state_dict(), "model_name": MODEL}, path)
    return path


def test_a_percentile_budget_holds_over_the_calibration_images_per_image_counts(tmp_path, demo):
    """--percentile: each image's latency predicted from the counts it kept; the chosen plan's
    95th percentile over the calibration images is within the target, recomputed here (the
    table's prediction alone: --verify-top 0)."""
    from spvit_search.optimize import calibration_tensors
    from spvit_search.pruning import AdaptiveCount, pruning_state, set_adaptive

    checkpoint = _selectors_checkpoint(demo, tmp_path / "selectors.pt")
    target = round(demo["dense_ms"] * 0.92, 4)  # these selectors' fastest plans: 0.8-0.9 of dense
    out = tmp_path / "plan.yaml"
    args = ["optimize", "--model", MODEL, "--checkpoint", str(checkpoint), "--tables", str(demo["tables"]),
            "--calib-images", "200", "--method", "spvit", "--target-ms", str(target), "--adaptive-scale", "0.9",
            "--trials", "40", "--json", "--verify-top", "0"]  # fmt: skip
    done = CliRunner().invoke(main, [*args, "--percentile", "95", "--out", str(out)])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output)
    a = summary["adaptive"]
    assert a["percentile"] == 95 and a["scale"] == 0.9 and summary["measurements"] == 0
    assert a["not_measured"].startswith("--verify-top 0")
    plan = sp.PruningPlan.load(out)
    assert plan.locations == (2, 3, 5) and plan.target_ms == target
    # recompute: the checkpoint at the plan, per-image counts on the same calibration images
    model = build_model(MODEL, checkpoint, plan).eval()
    set_adaptive(model, AdaptiveCount(scale=0.9))
    images, _ = calibration_tensors("demo", 200, model)
    with torch.no_grad():
        model(images)
    acted = torch.stack(pruning_state(model).adaptive_counts, dim=1).numpy()
    # a stage whose keep is not below the one before removes nothing (and records no count): its
    # images keep what entered it. Seen on a CI machine: the chosen plan kept 0.25 at two stages
    columns, previous, j = [], np.full(len(acted), pruning_state(model).num_patches), 0
    for keep, before in zip(plan.keep, (1.0, *plan.keep[:-1]), strict=True):
        if keep < before:
            previous, j = acted[:, j], j + 1
        columns.append(previous)
    assert j == acted.shape[1]
    counts = np.stack(columns, axis=1)
    assert len({tuple(c) for c in counts}) > 1  # the images kept different counts
    latency = PlanLatency.for_device(DeviceRegistry.load().get("local"), model, MODEL, root=demo["tables"])
    per_image = latency.predict_counts(plan, counts)
    p95 = float(np.percentile(per_image, 95))
    assert p95 == pytest.approx(a["predicted_p95_ms"], abs=1e-3) and p95 <= target
    assert a["predicted_p50_ms"] <= p95 + 1e-3
    assert a["mean_counts"] == pytest.approx(counts.mean(axis=0).tolist(), abs=0.01)
    # the fixed-count prediction of that plan is not what was budgeted
    assert a["fixed_counts_ms"] == pytest.approx(latency.predict(plan).total_ms, abs=1e-4)
    # the median as the budget: its own percentile within the target
    done50 = CliRunner().invoke(main, [*args, "--percentile", "50", "--out", str(tmp_path / "p50.yaml")])
    assert done50.exit_code == 0, done50.output
    assert json.loads(done50.output)["adaptive"]["predicted_p50_ms"] <= target


def test_a_percentile_budget_on_the_local_device_is_measured_image_by_image(tmp_path, demo):
    """On the local device each candidate's adaptive file runs the calibration images one by one
    beside the unpruned model; a plan ships only if its measured percentile is within the budget.

    The budget is loose: on this 32-pixel model the files that compute their counts in the graph
    measured 1.4-1.6x the unpruned model (its fixed costs dominate), so no share of it fits."""
    checkpoint = _selectors_checkpoint(demo, tmp_path / "selectors.pt")
    out = tmp_path / "plan.yaml"
    target = round(4 * demo["dense_ms"], 4)
    args = ["optimize", "--model", MODEL, "--checkpoint", str(checkpoint), "--tables", str(demo["tables"]),
            "--calib-images", "200", "--method", "spvit", "--target-ms", str(target), "--percentile", "90",
            "--percentile-images", "30", "--trials", "30", "--no-drift-check", "--json", "--out", str(out)]  # fmt: skip
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output)
    a, chosen = summary["adaptive"], [c for c in summary["candidates"] if not c["over_target"]]
    assert a["measured_images"] == 30 and "not_measured" not in a
    assert summary["measurements"] >= 2 and chosen  # at least one candidate and the unpruned model
    for c in summary["candidates"]:
        assert c["budget_ms"] == pytest.approx(target, abs=1e-3)
        if abs(c["measured_ms"] - target) > 1e-3:  # rounded to 3 decimals: a tie says nothing
            assert c["over_target"] == (c["measured_ms"] > target)
        assert c["measured_p50_ms"] <= c["measured_ms"] + 1e-3  # p50 under p90
        assert c["reference_ms"] == pytest.approx(a["unpruned_measured_ms"], abs=1e-3)  # one round here
    plan = sp.PruningPlan.load(out)
    picked = [c for c in chosen if c["keep"] == list(plan.keep)]
    assert picked and plan.measured_ms == pytest.approx(a["measured_p90_ms"], abs=1e-3)
    assert a["measured_p90_ms"] <= target
    best = max(c["accuracy"] for c in chosen)  # the best of those that fit, or one tied with it
    assert picked[0]["accuracy"] >= best - tie_band(best, 200)
    # the CLI's text names what was measured
    text = CliRunner().invoke(main, [*args[:-4], "--out", str(tmp_path / "text.yaml")])
    assert text.exit_code == 0 and "measured image by image over 30 calibration images" in text.output, text.output


def test_a_percentile_budget_the_table_promises_but_the_device_misses_is_refused(tmp_path, demo):
    """A table twice as fast as this host (another day's): every plan it admits runs slower on the
    device. Measured image by image, each misses, and the search stops with what it measured
    rather than ship a plan the table alone would have passed."""
    from spvit_search.latency import table_path, write_rescaled

    checkpoint = _selectors_checkpoint(demo, tmp_path / "selectors.pt")
    stale = tmp_path / "stale"
    source = table_path(demo["tables"], "local", "onnxruntime", 1, 1)
    write_rescaled(source, table_path(stale, "local", "onnxruntime", 1, 1), 0.5)
    target = round(0.6 * demo["dense_ms"], 4)  # under the table's 0.5 × every plan, over none on the device
    args = ["optimize", "--model", MODEL, "--checkpoint", str(checkpoint), "--tables", str(stale),
            "--calib-images", "200", "--method", "spvit", "--target-ms", str(target), "--percentile", "90",
            "--percentile-images", "20", "--trials", "20", "--no-drift-check",
            "--out", str(tmp_path / "p.yaml")]  # fmt: skip
    table_only = CliRunner().invoke(main, [*args, "--verify-top", "0"])
    assert table_only.exit_code == 0, table_only.output  # the table alone ships one
    done = CliRunner().invoke(main, args)
    assert done.exit_code != 0 and "every candidate measured over its budget at p90" in done.output, done.output
    assert "20 calibration images" in done.output


def test_a_percentile_budget_is_refused_where_it_cannot_apply(tmp_path, demo):
    checkpoint = _selectors_checkpoint(demo, tmp_path / "selectors.pt")
    base = ["optimize", "--model", MODEL, "--tables", str(demo["tables"]), "--method", "spvit", "--trials", "5"]
    cases = [
        (["--checkpoint", str(demo["checkpoint"]), "--target-ms", "9", "--percentile", "95"], "fine-tuned spvit"),
        (["--checkpoint", str(checkpoint), "--target-flops", "0.7", "--percentile", "95"], "not --target-flops"),
        (["--checkpoint", str(checkpoint), "--target-ms", "9", "--percentile", "150"], "must lie in (0, 100]"),
        (["--checkpoint", str(checkpoint), "--target-ms", "9", "--percentile", "95", "--adaptive-scale", "0"],
         "scale > 0"),
    ]  # fmt: skip
    for extra, message in cases:
        done = CliRunner().invoke(main, [*base, *extra])
        assert done.exit_code != 0 and message in done.output, (extra, done.output)
