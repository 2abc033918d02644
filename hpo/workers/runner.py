"""The trial runner: an attempt at a trial ends in one Outcome, and the study is told it once, here.

Shaped like Optuna's ``study/_optimize.py:_run_trial``: whatever the objective returns or raises
becomes an :class:`Attempt` (:func:`attempt`), and :func:`tell` turns that into the one trial
state told, the slot queued again where the fault was not the trial's, and the error raised where
the worker must stop. A population (many trials trained in one step) builds one Attempt per member
and tells each with the same :func:`tell`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import optuna
import torch
from optuna.trial import TrialState

from hpo.config.schema import ConfigError
from hpo.engine.records import Stop, TrainingDiverged
from hpo.engine.runs import RunSummary
from hpo.files import WriteError
from hpo.storages.retries import StorageError
from hpo.study.handle import StudyHandle
from hpo.study.queue import requeue
from hpo.study.records import TrialRecord


class Outcome(Enum):
    """How an attempt ended. Its value is what the trial's ``stop_reason`` attribute shows."""

    COMPLETED = "completed"  # every epoch ran: COMPLETE with the best epoch's val_acc
    EARLY_STOPPING = "early_stopping"  # COMPLETE as well, with its best epoch (so it can be best)
    PRUNED = "pruned"  # the study's pruner stopped it
    # The trial's own fault: FAIL, the worker goes on, and the slot is drawn anew.
    DIVERGED = "diverged"
    OUT_OF_MEMORY = "out_of_memory"
    INVALID_PARAMS = "invalid_params"
    # Not the trial's fault: FAIL, the slot is queued again with the same parameters (the retry goes
    # on from its last checkpoint), and the worker stops.
    INTERRUPTED = "interrupted"  # Ctrl-C, SIGTERM
    CANNOT_WRITE = "cannot_write"  # a full disk, a folder it may not write
    # A bug: FAIL, and the error goes on up; the gap is drawn anew.
    CRASHED = "crashed"

    @property
    def state(self) -> TrialState:
        return {Outcome.COMPLETED: TrialState.COMPLETE, Outcome.EARLY_STOPPING: TrialState.COMPLETE,
                Outcome.PRUNED: TrialState.PRUNED}.get(self, TrialState.FAIL)

    @property
    def requeued(self) -> bool:
        return self in (Outcome.INTERRUPTED, Outcome.CANNOT_WRITE)

    @property
    def raised(self) -> bool:
        """Whether the error goes on up: the worker stops."""
        return self in (Outcome.INTERRUPTED, Outcome.CANNOT_WRITE, Outcome.CRASHED)

    @classmethod
    def of_stop(cls, stop: Stop) -> Outcome:
        """A run that ended: only the pruner asks a trial's run to stop."""
        return {Stop.COMPLETED: cls.COMPLETED, Stop.EARLY_STOPPING: cls.EARLY_STOPPING,
                Stop.REQUESTED: cls.PRUNED}[stop]

    @classmethod
    def of_error(cls, error: BaseException) -> Outcome:
        for kind, outcome in ERRORS:
            if isinstance(error, kind):
                return outcome
        return cls.CRASHED


ERRORS: tuple[tuple[type[BaseException], Outcome], ...] = (
    (TrainingDiverged, Outcome.DIVERGED), (torch.OutOfMemoryError, Outcome.OUT_OF_MEMORY),
    (ConfigError, Outcome.INVALID_PARAMS), (KeyboardInterrupt, Outcome.INTERRUPTED), (WriteError, Outcome.CANNOT_WRITE),
)


@dataclass(frozen=True)
class Attempt:
    """How one attempt at a trial ended: the outcome, the value of a completed one, the error of a failed one."""

    outcome: Outcome
    value: float | None = None
    error: BaseException | None = None

    @classmethod
    def of(cls, stop: Stop, best_val_acc: float) -> Attempt:
        """A run that ended: only the pruner asks a trial's run to stop; completed ones have a value."""
        outcome = Outcome.of_stop(stop)
        return cls(outcome, best_val_acc if outcome.state == TrialState.COMPLETE else None)


def say(message: str) -> None:
    """A worker's own line on stderr, apart from the per-trial lines of Progress."""
    print(f"hpo: {message}", file=sys.stderr, flush=True)


def say_dropped(handle: StudyHandle, trial: optuna.trial.Trial) -> None:
    """The one line of an attempt whose trial another worker took over (see :func:`run_trial`)."""
    say(f"trial {trial.number} was failed and queued again by another worker while this one was stalled "
        f"(no heartbeat for over {handle.storage.grace_period}s); this attempt is dropped")


def attempt(objective: Callable[[optuna.trial.Trial], RunSummary], trial: optuna.trial.Trial) -> Attempt:
    """Run ``objective`` on ``trial``; whatever it ends with becomes an Attempt. Errors that leave
    nothing to tell with (the database is lost, the trial was taken over) go on up."""
    try:
        summary = objective(trial)
    except (optuna.exceptions.UpdateFinishedTrialError, StorageError):
        raise
    except BaseException as e:  # Ctrl-C and bugs too: the trial must never be left RUNNING
        return Attempt(Outcome.of_error(e), error=e)
    return Attempt.of(summary.stop, summary.best_val_acc)


def tell(handle: StudyHandle, trial: optuna.trial.Trial, ended: Attempt) -> Outcome:
    """Tell the study how ``trial`` ended, the one place where a trial is told; the slot is queued
    again where the fault was not the trial's. Raises the attempt's error where the worker must stop,
    and UpdateFinishedTrialError where the trial is no longer this worker's."""
    error = ended.error
    if error is None:
        TrialRecord(stop_reason=ended.outcome.value).write(trial)
    else:  # marked for requeue first: whoever finds it failed and not yet queued again does it
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        TrialRecord(fail_reason=reason, requeue=ended.outcome.requeued).write(trial)
    handle.study.tell(trial, ended.value, state=ended.outcome.state)
    if ended.outcome.requeued:
        requeue(handle.storage, handle.study, handle.storage.get_trial(trial._trial_id))
    if ended.outcome.raised:
        raise error
    return ended.outcome


def run_trial(handle: StudyHandle, trial: optuna.trial.Trial,
              objective: Callable[[optuna.trial.Trial], RunSummary]) -> Outcome | None:
    """One attempt at ``trial``, told (see :func:`attempt` and :func:`tell`). Returns None when the
    trial was no longer this worker's: it stalled past the grace period, and another worker failed
    it and queued it again."""
    try:
        return tell(handle, trial, attempt(objective, trial))
    except optuna.exceptions.UpdateFinishedTrialError:
        say_dropped(handle, trial)
        return None
