"""One study on a real PostgreSQL server: the README's multi-machine recipe, a worker killed
mid-trial (failed by its silent heartbeat, retried, never evaluated twice), optuna-dashboard."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from conftest import DEMO_MODEL
from optuna.trial import TrialState
from peers.net import free_port
from peers.postgres import PostgresServer

from spvit_search.sharing import claim, open_storage

README = Path(__file__).resolve().parents[1] / "README.md"
CLI = [sys.executable, "-m", "spvit_search.cli"]
HEARTBEAT_S = 2  # dead after 3 silent beats: the test waits seconds, not the default's 30


@pytest.fixture(scope="module")
def server():
    pg = PostgresServer()
    yield pg
    pg.stop()


def recipe() -> tuple[list[str], list[str]]:
    """The lead's and a worker's commands as the README writes them (after `spvit-search`)."""
    text = README.read_text()
    block = re.search(r"<!-- multi-machine recipe[^>]*-->\s*```sh\n(.*?)```", text, re.S)
    assert block, "README lost its multi-machine recipe block"
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    commands = [shlex.split(line.replace("$SEARCH", "SEARCH"))[1:] for line in lines
                if line.startswith("spvit-search optimize")]  # fmt: skip
    leads = [c for c in commands if "--worker" not in c]
    workers = [c for c in commands if "--worker" in c]
    assert len(leads) == 1 and len(workers) == 1, commands
    return leads[0], workers[0]


def as_run(command: list[str], search: list[str], storage: str) -> list[str]:
    """A README command with its placeholders filled: the test's search, the test's database."""
    filled = []
    for arg in command:
        filled += search if arg == "SEARCH" else [storage if arg == "$DB" else arg]
    return [*CLI, *filled]


def _load(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(storage))


def _kill_mid_trial(proc: subprocess.Popen, storage: str, name: str, timeout: float = 300) -> int:
    """SIGKILL ``proc`` while one of its trials runs: freeze it, look, kill or let it go on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        try:
            study = _load(storage, name)
        except KeyError:  # the study is not created yet
            continue
        os.kill(proc.pid, signal.SIGSTOP)
        running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.user_attrs.get("pid") == proc.pid]  # fmt: skip
        if running:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return running[0].number
        os.kill(proc.pid, signal.SIGCONT)
        if proc.poll() is not None:
            break
    raise AssertionError(f"worker {proc.pid} never ran a trial (exit {proc.poll()})")


def test_the_readme_recipe_survives_a_worker_killed_mid_trial(tmp_path, demo, server):
    storage = server.create_database("recipe")
    lead_cmd, worker_cmd = recipe()
    study_name = lead_cmd[lead_cmd.index("--study") + 1]
    # 0.85, not 0.75: this is about the recipe and a killed worker, not the budget's tightness. At
    # 0.75 the demo model's fastest plans sit right at the target once candidates are judged beside
    # the unpruned model (2-9% slower than a model run alone); seen on CI: the one candidate 5% over,
    # nothing else left under the corrected predictions. A share of the unpruned model, not ms of the
    # fixture's table: the lead's drift check runs while the victim starts up beside it, and once (CI)
    # measured 1.5x the table, which put even the fastest plan over 0.85 of the table's dense
    search = ["--device", "local", "--model", DEMO_MODEL, "--checkpoint", str(demo["checkpoint"]),
              "--tables", str(demo["tables"]), "--calib-images", "200", "--target-share", "0.85",
              "--trials", "60", "--verify-top", "1", "--heartbeat", str(HEARTBEAT_S),
              "--out", str(tmp_path / "plan.yaml")]  # fmt: skip
    log = tmp_path / "lead.log"
    lead = subprocess.Popen(as_run(lead_cmd, search, storage), stdout=subprocess.DEVNULL, stderr=log.open("w"))
    victim = subprocess.Popen(as_run(worker_cmd, search, storage), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        killed = _kill_mid_trial(victim, storage, study_name)
        lead.wait(timeout=900)
    finally:
        for proc in (lead, victim):
            if proc.poll() is None:
                proc.kill()
    assert lead.returncode == 0, log.read_text()[-3000:]
    assert (tmp_path / "plan.yaml").exists()

    study = _load(storage, study_name)
    trials = study.get_trials(deepcopy=False)
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert study.trials[killed].state == TrialState.FAIL  # failed by its silent heartbeat
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    # with the factors the killed trial had suggested (it may have died before suggesting them all)
    assert all(retries[0].params[k] == v for k, v in study.trials[killed].params.items())
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(counted) >= 60
    assert len({t.user_attrs["pid"] for t in counted} | {victim.pid}) >= 3  # lead, its helper, the victim
    evaluated = [t.user_attrs["plan_key"] for t in counted
                 if t.user_attrs.get("evaluated") and "duplicate_of" not in t.user_attrs]  # fmt: skip
    assert len(evaluated) == len(set(evaluated)), "a plan was evaluated twice"


def _trial_pair(storage: str):
    study = optuna.create_study(storage=open_storage(storage, heartbeat_s=HEARTBEAT_S), direction="maximize")
    return study, study.ask(), study.ask()


def _finish(study: optuna.Study, trial: optuna.Trial, accuracy: float) -> None:
    trial.set_user_attr("evaluated", True)
    trial.set_user_attr("accuracy", accuracy)
    study.tell(trial, accuracy)


def _claim_later(trial: optuna.Trial, key: str) -> concurrent.futures.Future:
    trial.set_user_attr("plan_key", key)
    return concurrent.futures.ThreadPoolExecutor(1).submit(claim, trial, key)


def _evaluator_and_waiter(first: optuna.Trial, then: optuna.Trial) -> concurrent.futures.Future:
    """``first`` claims plan "k" alone and evaluates; ``then`` claims it next and is still waiting."""
    first.set_user_attr("plan_key", "k")
    assert claim(first, "k") is None
    waiting = _claim_later(then, "k")
    time.sleep(1.0)
    assert not waiting.done()
    return waiting


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask/tell by hand, as a worker's objective sees it
def test_of_two_trials_of_one_plan_only_one_evaluates(server):
    storage = server.create_database("claim")
    # the higher-numbered trial checks before the lower one has written its plan: it evaluates,
    # and the lower one, seeing it, waits for its result instead of evaluating too
    study, low, high = _trial_pair(storage)
    waiting = _evaluator_and_waiter(high, low)
    _finish(study, high, 91.0)
    assert waiting.result(timeout=30).number == high.number

    # both written before either checks: exactly one evaluates (the lower), the other reuses it
    study, low, high = _trial_pair(storage)
    both = [_claim_later(t, "k") for t in (low, high)]
    time.sleep(1.0)
    assert both[0].result(timeout=30) is None and not both[1].done()
    _finish(study, low, 90.0)
    assert both[1].result(timeout=30).number == low.number

    # the evaluator fails: the waiter decides again and evaluates itself
    study, low, high = _trial_pair(storage)
    waiting = _evaluator_and_waiter(low, high)
    study.tell(low, state=TrialState.FAIL)
    assert waiting.result(timeout=30) is None

    # a plan pruned once is pruned again, not evaluated
    study, low, high = _trial_pair(storage)
    low.set_user_attr("plan_key", "k")
    study.tell(low, state=TrialState.PRUNED)
    high.set_user_attr("plan_key", "k")
    with pytest.raises(optuna.TrialPruned):
        claim(high, "k")


def test_optuna_dashboard_reads_the_study_back(server):
    storage = server.create_database("dashboard")
    study = optuna.create_study(study_name="shown", storage=storage, direction="maximize")
    study.optimize(lambda t: t.suggest_float("r0", 0.3, 1.0), n_trials=5)
    port = free_port()
    dashboard = Path(sys.executable).with_name("optuna-dashboard")
    proc = subprocess.Popen([str(dashboard), storage, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        listing = _get_json(f"http://127.0.0.1:{port}/api/studies", proc)
        [summary] = [s for s in listing["study_summaries"] if s["study_name"] == "shown"]
        detail = _get_json(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert len(detail["trials"]) == 5
    shown = [t["values"][0] for t in detail["trials"]]
    assert shown == pytest.approx([t.value for t in study.trials])
    assert detail["best_trials"][0]["number"] == study.best_trial.number


def _get_json(url: str, proc: subprocess.Popen, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return json.loads(reply.read())
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"optuna-dashboard exited: {proc.stderr.read().decode()[-1000:]}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
