"""Trials that nobody runs any more, and studies whose trials keep failing.

- A dead worker's trial (its heartbeat silent for the grace period) is failed by Optuna's
  ``fail_stale_trials``, and the storage's callback queues it again (:func:`hpo.study.queue.requeue`).
- A RUNNING trial that never had a heartbeat (left by ``optuna ask``, or by a client that sends
  none) is treated the same way once it has been RUNNING for the grace period: otherwise workers
  would wait for it forever.
- Trials that fail on their own (NaN loss, OOM, invalid parameters) leave gaps that new draws
  fill; the failure budget stops a study where every draw fails, instead of drawing forever.
"""

from __future__ import annotations

import datetime

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from hpo.storages.rdb import fail_stale_trials
from hpo.storages.retries import retry_lost_connection
from hpo.study.handle import StudyHandle
from hpo.study.queue import requeue
from hpo.study.records import RETRY_ATTR, TrialRecord

MIN_FAILURE_BUDGET = 10  # failed trials a small study may have before it stops; larger studies allow N
SILENT_REASON = "RUNNING for more than {grace}s without a heartbeat (a client that sends none, such as `optuna ask`)"


class TooManyFailures(RuntimeError):
    """The study holds as many failed trials as its failure budget allows."""


def lost_slots(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The FAILED trials that no retry took over: failures of the trials' own making."""
    retried = {t.user_attrs.get(RETRY_ATTR) for t in trials}
    return [t for t in trials if t.state == TrialState.FAIL and t.number not in retried]


def check_failure_budget(handle: StudyHandle, max_failures: int | None = None) -> None:
    """Raises TooManyFailures, naming the last reasons, once ``max_failures`` trials failed on their
    own (None: the larger of N and MIN_FAILURE_BUDGET)."""
    if max_failures is None:
        max_failures = max(handle.target, MIN_FAILURE_BUDGET)
    failed = lost_slots(handle.trials())
    if len(failed) < max_failures:
        return
    last = "; ".join(f"trial {t.number}: {str(TrialRecord.of(t).fail_reason or '?').splitlines()[0][:120]}"
                     for t in failed[-3:])
    raise TooManyFailures(f"study {handle.cfg.study.name!r} stopped: {len(failed)} trials failed, the failure "
                          f"budget (--max-failures {max_failures}); the last: {last}")


def _without_heartbeat(storage: optuna.storages.RDBStorage, trial_ids: list[int]) -> set[int]:
    from optuna.storages._rdb.models import TrialHeartbeatModel as Beat  # no public reader of this table

    def beating() -> set[int]:
        with storage.engine.connect() as conn:
            query = sqlalchemy.select(Beat.trial_id).where(Beat.trial_id.in_(trial_ids))
            return set(conn.execute(query).scalars())

    return set(trial_ids) - retry_lost_connection(beating, storage.url, storage.db_timeout)


def reap(handle: StudyHandle) -> None:
    """Fail, and queue again, the RUNNING trials that nobody runs: heartbeats gone silent, or never sent.
    Behind `hpo proxy`, the proxy does it."""
    if not handle.storage.direct:
        return
    fail_stale_trials(handle.study)
    storage, grace = handle.storage, handle.storage.grace_period
    now = datetime.datetime.now()  # Optuna stamps datetime_start with the local clock
    old = [t._trial_id for t in handle.trials((TrialState.RUNNING,))
           if t.datetime_start and (now - t.datetime_start).total_seconds() > grace]
    for trial_id in sorted(_without_heartbeat(storage, old)) if old else ():
        try:
            storage.set_trial_user_attrs(trial_id, TrialRecord(fail_reason=SILENT_REASON.format(grace=grace)).attrs())
            if storage.set_trial_state_values(trial_id, TrialState.FAIL):
                requeue(storage, handle.study, storage.get_trial(trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it finished meanwhile, or another worker failed it first
