"""What hpo stores in a study, written and read back through a real SQLite file: the names stay those
that studies made before hold, writers write only what they set, readers leave foreign attributes."""

from __future__ import annotations

import dataclasses
import json
import os

import optuna
import pytest
from optuna.distributions import FloatDistribution

from hpo.storages.rdb import open_storage
from hpo.study.records import GateRecord, StageRecord, TrialRecord, claimed, retry_attrs

# The trial attributes as studies made before this module hold them (f3c6d5c and before).
STORED_NAMES = {"hpo:draw", "retry_of", "device", "hostname", "worker", "run_dir", "population", "history",
                "checkpoint_artifact", "best_epoch", "epochs_run", "seconds", "resumed_from_epoch", "stop_reason",
                "fail_reason", "requeue"}


@pytest.fixture
def study(tmp_path) -> optuna.Study:
    return optuna.create_study(study_name="s", storage=open_storage(f"sqlite:///{tmp_path / 's.db'}"),
                               direction="maximize")


def reread(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="s", storage=study._storage).trials


def test_every_field_is_stored_under_the_name_older_studies_hold():
    full = TrialRecord(draw=0, retry_of=1, device="cpu", hostname="h", worker="h:1", run_dir="r", population="h:1",
                       history=({"epoch": 1},), checkpoint_artifact="a", best_epoch=1, epochs_run=2, seconds=0.1,
                       resumed_from_epoch=1, stop_reason="done", fail_reason="e", requeue=True)
    assert {f.name for f in dataclasses.fields(full) if getattr(full, f.name) == f.default} == set()  # all set
    assert set(full.attrs()) == STORED_NAMES


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask without optimize, on purpose
def test_a_writer_writes_what_it_sets_and_never_clears_what_another_wrote(study, tmp_path):
    trial = study.ask({"x": FloatDistribution(0, 1)})
    claimed("cpu", str(tmp_path / "run")).write(trial)
    TrialRecord(history=({"epoch": 1, "loss": 2.0},), best_epoch=1, epochs_run=1, seconds=0.5).write(trial)
    TrialRecord(fail_reason="OSError: disk full", requeue=False).write(trial)
    (stored,) = reread(study)
    record = TrialRecord.of(stored)
    assert (record.device, record.run_dir, record.best_epoch, record.history) == (
        "cpu", str(tmp_path / "run"), 1, ({"epoch": 1, "loss": 2.0},))
    assert record.fail_reason == "OSError: disk full" and "requeue" not in stored.user_attrs  # False: not written
    assert record.worker.endswith(f":{os.getpid()}") and record.stop_reason is None
    assert trial._cached_frozen_trial.user_attrs == stored.user_attrs  # the trial's cache sees what was written


def test_a_reader_keeps_what_it_knows_and_leaves_foreign_attributes(study):
    study.enqueue_trial({"x": 0.5}, user_attrs={"hpo:draw": 4, "retry_of": 2, "someone-else": [1, 2]})
    (stored,) = reread(study)
    assert TrialRecord.of(stored) == TrialRecord(draw=4, retry_of=2)
    assert TrialRecord.of(stored).attrs() == {"hpo:draw": 4, "retry_of": 2}


def test_a_retry_takes_all_but_how_the_attempt_failed():
    failed = optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL, params={}, distributions={},
        user_attrs={"run_dir": "runs/a", "hpo:draw": 1, "fail_reason": "KeyboardInterrupt", "requeue": True,
                    "someone-else": "kept"})
    failed.number = 7
    assert retry_attrs(failed) == {"run_dir": "runs/a", "hpo:draw": 1, "someone-else": "kept", "retry_of": 7}


def test_a_gate_record_round_trips_as_plain_json(study):
    record = GateRecord("abc", "host", "cpu", "2026-12-05T10:00:00+0000", passed=True,
                        checks=({"name": "data", "passed": True, "value": 1, "threshold": "", "seconds": 0.1,
                                 "detail": ""},), warnings=("few images",))
    record.write(study)
    again = optuna.load_study(study_name="s", storage=study._storage)
    assert GateRecord.read(again, "abc") == record and GateRecord.read(again, "other") is None
    stored = again.user_attrs["gate:abc"]
    assert json.loads(json.dumps(stored)) == stored and stored["checks"][0]["name"] == "data"


def test_gate_records_written_before_and_foreign_ones_are_read_or_left(study):
    # A skip as hpo wrote it before GateRecord: no checks, no warnings.
    study.set_user_attr("gate:old", {"config_hash": "old", "host": "h", "device": "cuda", "at": "t",
                                     "passed": None, "skipped": True})
    study.set_user_attr("gate:junk", "not a record")  # another client's attribute that happens to match
    study.set_user_attr("hpo:n_trials", 3)
    assert GateRecord.read_all(study) == [GateRecord("old", "h", "cuda", "t", skipped=True)]


def test_a_stage_record_is_read_back_and_a_foreign_one_is_not_a_stage(study):
    StageRecord(12.5, {"n_trials": 4}).write(study, "search")
    study.set_user_attr("hpo:pipeline:report", {"by": "someone else"})
    again = optuna.load_study(study_name="s", storage=study._storage)
    assert StageRecord.read(again, "search") == StageRecord(12.5, {"n_trials": 4})
    assert StageRecord.read(again, "report") is None and StageRecord.read(again, "explore") is None
