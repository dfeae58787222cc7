"""One Optuna study shared by several processes and machines (``optimize --storage … --workers N``,
and ``--worker`` on other machines).

A shared study needs three things beyond Optuna's storage:

* **Heartbeats** (RDB storages: PostgreSQL, SQLite). A worker killed mid-trial stops beating.
  The next worker to start a trial, a worker waiting on that trial's plan, or the lead at the
  end (:func:`settle`) then fails the trial. :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback`
  enqueues the same parameters again, and the next free worker runs them. So no trial stays
  RUNNING and none is lost. Optuna's journal storage has no heartbeats: there a trial counts as
  dead when the process on this machine that started it is gone (:func:`fail_dead_trials`), so
  the journal suits one machine, and the multi-machine recipe uses PostgreSQL.
* **One evaluation per plan** (:func:`claim`). TPE proposes the same grid point in several
  trials. A completed one is reused. Two running at once must not both evaluate, whichever of
  them wrote its plan first.
* **A lead that waits** for every other trial to end (:func:`settle`) before it ranks them.
"""

from __future__ import annotations

import copy
import os
import socket
import time
import warnings

import optuna
from optuna.trial import FrozenTrial, TrialState

from .errors import SpvitError

HEARTBEAT_S = 10  # a live trial writes its heartbeat this often
GRACE_BEATS = 3  # missed beats before a trial counts as dead
MAX_RETRY = 2  # a plan whose trial died this many times is given up (it may be what kills workers)
POLL_S = 0.25
CLAIM = "claim"  # user attribute: "" (undecided), "evaluates" or "waits"


with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    _RETRY_SAME = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
OWNER_ATTRS = ("pid", "host")  # which process runs a trial (set first thing in the objective)


def _retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a dead trial's parameters again (Optuna's retry), without its owner and claim: until the
    retry's own objective starts, the dead owner's pid would make it look dead too."""
    clean = copy.deepcopy(trial)
    clean.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in (*OWNER_ATTRS, CLAIM)}
    _RETRY_SAME(study, clean)


class StorageError(SpvitError):
    """A storage that cannot be opened (unknown scheme, driver missing, server unreachable)."""


def open_storage(spec: str | None, heartbeat_s: int = HEARTBEAT_S):
    """In-memory (None), ``journal:PATH`` (a file journal, safe for processes on one machine), or an
    RDB URL (``postgresql://USER@HOST/DB``, ``sqlite:///FILE``) with heartbeats and retries."""
    if spec is None:
        return None
    if spec.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(spec.removeprefix("journal:")))
    if "://" not in spec:
        raise StorageError(f"storage {spec!r}: use journal:FILE, sqlite:///FILE or postgresql://USER@HOST/DB")
    if heartbeat_s < 1:
        raise StorageError(f"heartbeat {heartbeat_s} s: give a whole number of seconds ≥ 1")
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.x
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                spec, heartbeat_interval=heartbeat_s, grace_period=GRACE_BEATS * heartbeat_s,
                heartbeat_stale_trial_callback=_retry, engine_kwargs={"pool_pre_ping": True},
            )  # fmt: skip
    except ModuleNotFoundError as err:
        driver = f"the {err.name!r} driver: pip install 'spvit-search[postgres]'"
        raise StorageError(f"storage {spec!r} needs {driver}") from None
    except Exception as err:  # a server unreachable, a database missing: say which
        raise StorageError(f"storage {spec!r} cannot be opened: {err}") from None


def has_heartbeats(study: optuna.Study) -> bool:
    storage = study._storage  # Optuna offers no public accessor
    return isinstance(storage, optuna.storages._heartbeat.BaseHeartbeat) and bool(storage.get_heartbeat_interval())


def fail_dead_trials(study: optuna.Study) -> None:
    """Fail the running trials whose worker is gone, and queue their retries.

    With heartbeats, a trial counts as gone after three silent beats. Without them (the journal
    storage), a trial counts as gone when it was started on this machine by a process that no
    longer exists. A study resumed after a crash would otherwise keep that trial RUNNING, and a
    trial of the same plan would wait for it forever.
    """
    if has_heartbeats(study):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        return
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _gone_from_here(trial):
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError):  # another process failed it first
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            _retry(study, study.get_trials(deepcopy=False)[trial.number])


def _gone_from_here(trial: FrozenTrial) -> bool:
    pid, host = trial.user_attrs.get("pid"), trial.user_attrs.get("host")
    if not pid or pid == os.getpid() or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def claim(trial: optuna.Trial, key: str) -> FrozenTrial | None:
    """Decide who evaluates the plan ``key``: None means this trial does. Otherwise the result is an
    earlier trial whose accuracy this one reuses. Raises TrialPruned if the plan was pruned before.

    The trial's ``plan_key`` is written before this is called. Among the running trials of the same
    plan, the rules are:

    * wait while another one evaluates, or while a lower-numbered one runs;
    * wait until every higher-numbered one has decided;
    * otherwise evaluate.

    A trial that wrote its plan after another one's check is seen by the later check. Either it is
    lower-numbered (the other waits for it) or it has already decided. So two trials never both
    evaluate. Evaluators never wait, so there is no deadlock. A waiter decides again when the
    trial it waited on ends without a result: pruned (then it is pruned too), failed, or dead (its
    heartbeat stops and :func:`fail_dead_trials` fails it).
    """
    study, number = trial.study, trial.number
    trial.set_user_attr(CLAIM, "")
    waited = False
    while True:
        same = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                    TrialState.RUNNING))
                if t.number != number and t.user_attrs.get("plan_key") == key]  # fmt: skip
        done = [t for t in same if t.state == TrialState.COMPLETE and t.user_attrs.get("evaluated")]
        if done:
            return done[0]
        pruned = [t for t in same if t.state == TrialState.PRUNED]
        if pruned:
            trial.set_user_attr("pruned_as", pruned[0].number)
            raise optuna.TrialPruned(f"the same plan was pruned in trial {pruned[0].number}")
        running = [t for t in same if t.state == TrialState.RUNNING]
        others = [t for t in running if t.user_attrs.get(CLAIM) == "evaluates" or t.number < number]
        undecided = [t for t in running if t.number > number and not t.user_attrs.get(CLAIM)]
        if not others and not undecided:
            trial.set_user_attr(CLAIM, "evaluates")
            return None
        if others and not waited:
            trial.set_user_attr(CLAIM, "waits")
            waited = True
        fail_dead_trials(study)
        time.sleep(POLL_S)


def settle(study: optuna.Study, run_retries, poll_s: float = 1.0) -> None:
    """Wait until no trial of the study runs. Fail the dead ones and run their retries here
    (``run_retries(n)`` runs n trials; Optuna gives waiting trials out first). Without heartbeats
    (journal storage), another machine's or a live process's trial cannot be told from a slow
    one: its retries are run, but nothing is waited for."""
    while True:
        fail_dead_trials(study)
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if waiting:
            run_retries(len(waiting))
            continue
        if not has_heartbeats(study) or not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return
        time.sleep(poll_s)
