"""The trial runner: every way an attempt ends becomes one Outcome, told once, with the slot queued
again only where the fault was not the trial's, on a real study in a real SQLite file."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from hpo.config.schema import ConfigError
from hpo.config.study_file import load_study
from hpo.engine.records import Stop, TrainingDiverged
from hpo.engine.runs import RunSummary
from hpo.files import WriteError
from hpo.study.handle import StudyHandle
from hpo.study.identity import open_study
from hpo.study.queue import pop_waiting, set_target, top_up
from hpo.study.records import TrialRecord
from hpo.workers.runner import Attempt, Outcome, run_trial, tell

SEARCH = '[search]\n"train.lr" = [0.01, 0.001]\n'


@pytest.fixture
def handle(study_file, tmp_path) -> StudyHandle:
    handle = open_study(load_study(study_file(SEARCH)), f"sqlite:///{tmp_path / 'study.db'}", create=True)
    set_target(handle, 2)
    assert top_up(handle) == 2
    return handle


def popped(handle: StudyHandle) -> optuna.trial.Trial:
    taken = pop_waiting(handle)
    assert taken is not None, "no WAITING trial to pop"
    return taken[0]


def summary(stop: Stop, value: float = 0.75) -> RunSummary:
    return RunSummary(value, 3, 4, stop, 1.0, 100.0, 0.1, 300, 200, Path("best.pt"), Path("."), 0)


def told(handle: StudyHandle) -> optuna.trial.FrozenTrial:
    (trial,) = [t for t in handle.trials() if t.state not in (TrialState.WAITING, TrialState.RUNNING)]
    return trial


@pytest.mark.parametrize("stop, outcome, state, value", [
    (Stop.COMPLETED, Outcome.COMPLETED, TrialState.COMPLETE, 0.75),
    (Stop.EARLY_STOPPING, Outcome.EARLY_STOPPING, TrialState.COMPLETE, 0.75),
    (Stop.REQUESTED, Outcome.PRUNED, TrialState.PRUNED, 0.5),  # a pruned trial keeps its last report
])
def test_a_run_that_ends_is_told_with_its_outcome(handle, stop, outcome, state, value):
    trial = popped(handle)
    trial.report(0.5, 1)
    assert run_trial(handle, trial, lambda t: summary(stop)) == outcome
    done = told(handle)
    assert (done.state, done.value, done.user_attrs["stop_reason"]) == (state, value, outcome.value)
    assert "fail_reason" not in done.user_attrs
    assert len(handle.trials((TrialState.WAITING,))) == 1  # nothing queued again


@pytest.mark.parametrize("error, outcome", [
    (TrainingDiverged("loss is nan at epoch 2"), Outcome.DIVERGED),
    (torch.OutOfMemoryError("CUDA out of memory"), Outcome.OUT_OF_MEMORY),
    (ConfigError(["model.hidden: must be <= 65536, got 100000"]), Outcome.INVALID_PARAMS),
])
def test_a_trial_s_own_failure_is_failed_with_its_reason_and_the_worker_goes_on(handle, error, outcome):
    def objective(trial):
        raise error

    assert run_trial(handle, popped(handle), objective) == outcome
    done = told(handle)
    assert done.state == TrialState.FAIL and done.user_attrs["fail_reason"] == f"{type(error).__name__}: {error}"
    assert len(handle.trials((TrialState.WAITING,))) == 1  # its gap is drawn anew by the next top-up


@pytest.mark.parametrize("error, outcome", [
    (KeyboardInterrupt(), Outcome.INTERRUPTED), (WriteError("no space left on device writing x"),
                                                 Outcome.CANNOT_WRITE),
])
def test_a_failure_not_of_the_trial_s_making_queues_it_again_and_stops_the_worker(handle, error, outcome):
    trial = popped(handle)

    def objective(t):
        raise error

    with pytest.raises(type(error)):
        run_trial(handle, trial, objective)
    assert told(handle).state == TrialState.FAIL
    (retry,) = [t for t in handle.trials((TrialState.WAITING,)) if TrialRecord.of(t).retry_of == trial.number]
    assert retry.params == told(handle).params  # the same slot, to resume from its checkpoint
    assert Outcome.of_error(error) == outcome


def test_a_bug_fails_the_trial_and_goes_on_up(handle):
    def objective(trial):
        return {}["missing"]

    with pytest.raises(KeyError):
        run_trial(handle, popped(handle), objective)
    assert told(handle).state == TrialState.FAIL and told(handle).user_attrs["fail_reason"] == "KeyError: 'missing'"
    assert len(handle.trials((TrialState.WAITING,))) == 1


def test_the_study_is_told_once(handle, monkeypatch):
    tells = []
    real = handle.study.tell
    monkeypatch.setattr(handle.study, "tell", lambda *a, **k: tells.append(k["state"]) or real(*a, **k))

    def diverges(trial):
        raise TrainingDiverged("loss is nan")

    run_trial(handle, popped(handle), lambda t: summary(Stop.COMPLETED))
    run_trial(handle, popped(handle), diverges)
    assert tells == [TrialState.COMPLETE, TrialState.FAIL]


@pytest.mark.parametrize("during", ["training", "the tell"])
def test_a_trial_taken_over_meanwhile_is_dropped(handle, capsys, during):
    """A worker that stalled past the grace period finds its trial failed by another, at its next
    write while it trains or at the tell: nothing is told, the attempt is dropped in one line."""
    trial = popped(handle)

    def objective(t):
        handle.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)  # what the other worker did
        if during == "training":
            t.report(0.5, 1)
        return summary(Stop.COMPLETED)

    assert run_trial(handle, trial, objective) is None
    assert capsys.readouterr().err.strip() == (
        f"hpo: trial {trial.number} was failed and queued again by another worker while this one was stalled "
        f"(no heartbeat for over {handle.storage.grace_period}s); this attempt is dropped")
    assert handle.storage.get_trial(trial._trial_id).state == TrialState.FAIL
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):  # told directly, it is the caller's to handle
        tell(handle, trial, Attempt(Outcome.COMPLETED, 0.9))
