"""One Optuna study shared by several processes and machines (``optimize --storage … --workers N``,
and ``--worker`` on other machines).

A shared study needs three things beyond Optuna's storage:

* **Heartbeats** (RDB storages: PostgreSQL, SQLite). A worker killed mid-trial stops beating.
  The next worker to start a trial, a worker waiting on that trial's plan, or the lead at the
  end (:func:`settle`) then fails the trial. :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback`
  enqueues the same parameters again, and the next free worker runs them. So no trial stays
  RUNNING and none is lost. Optuna's journal storage has no heartbeats: a killed process's trial
  stays RUNNING there, which is why the multi-machine recipe uses PostgreSQL.
* **One evaluation per plan** (:func:`claim`). TPE proposes the same grid point in several
  trials. A completed one is reused. Two running at once must not both evaluate, whichever of
  them wrote its plan first.
* **A lead that waits** for every other trial to end (:func:`settle`) before it ranks them.
"""

from __future__ import annotations

import time
import warnings

import optuna
from optuna.trial import FrozenTrial, TrialState

from .errors import SpvitError

HEARTBEAT_S = 10  # a live trial writes its heartbeat this often
GRACE_BEATS = 3  # missed beats before a trial counts as dead
MAX_RETRY = 2  # a plan whose trial died this many times is given up (it may be what kills workers)
POLL_S = 0.25


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
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
                engine_kwargs={"pool_pre_ping": True},
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
    if has_heartbeats(study):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


CLAIM = "claim"  # user attribute: "" (undecided), "evaluates" or "waits"


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
    (journal storage), a dead process's trial can never be told from a slow one, so nothing is
    waited for."""
    if not has_heartbeats(study):
        return
    while True:
        fail_dead_trials(study)
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if waiting:
            run_retries(len(waiting))
            continue
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return
        time.sleep(poll_s)
