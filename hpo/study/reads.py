"""Reading a finished or running study (best, report, retrain): its config is the one stored in
it, and nothing is written to it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import TrialState

from hpo.config.study_file import StudyConfig
from hpo.storages.rdb import open_storage
from hpo.storages.retries import StorageError, mask
from hpo.study.handle import StudyError, StudyHandle
from hpo.study.records import CONFIG_ATTR, TrialRecord


def require_database(storage_url: str) -> None:
    """Read-only commands must not create a database where there was none (SQLite would)."""
    try:
        url = sqlalchemy.engine.make_url(storage_url)
    except sqlalchemy.exc.ArgumentError:
        return  # open_storage says what is wrong with it
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).is_file():
        raise StorageError(f"--storage {mask(storage_url)}: no database file at {url.database}; "
                           "run `hpo run` there first, or pass the --storage it used")


def read_study(storage_url: str, name: str) -> StudyHandle:
    """An hpo study by name, for reading (best, report, retrain): its config is the one stored in it,
    whatever a study file says now. Writes nothing to the study."""
    require_database(storage_url)
    storage = open_storage(storage_url)
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler())
    except KeyError:
        names = optuna.get_all_study_names(storage)
        held = f"it holds {', '.join(map(repr, names))}" if names else "it holds no study"
        raise StudyError(f"no study {name!r} in {mask(storage_url)}; {held}") from None
    stored = study.user_attrs.get(CONFIG_ATTR)
    if stored is None:
        raise StudyError(f"study {name!r} was not made by hpo (it has no {CONFIG_ATTR} attribute); "
                         "`hpo dashboard` shows any Optuna study")
    return StudyHandle(study, storage, StudyConfig.from_dict(stored))


def best_trials(handle: StudyHandle, k: int = 1) -> list[optuna.trial.FrozenTrial]:
    """The ``k`` best COMPLETE trials, best first, ties in trial order (early-stopped ones included:
    they complete with their best epoch)."""
    return sorted(handle.trials((TrialState.COMPLETE,)), key=lambda t: t.value, reverse=True)[:k]


def best_trial(handle: StudyHandle) -> optuna.trial.FrozenTrial | None:
    """The best COMPLETE trial, or None before any completed."""
    return next(iter(best_trials(handle)), None)


@dataclass(frozen=True)
class TrialSummary:
    """What `hpo best` and `hpo run --json` show of a trial."""

    number: int
    value: float | None
    params: dict[str, Any]
    best_epoch: int | None
    epochs_run: int | None
    stop_reason: str | None  # a Stop's or an Outcome's value
    checkpoint_artifact: str | None  # best.pt's id in the study's artifact store
    device: str | None
    hostname: str | None
    seconds: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return (f"best trial {self.number}: val_acc {self.value:.4f} ({params}), best epoch {self.best_epoch} of "
                f"{self.epochs_run} ({self.stop_reason}), checkpoint artifact {self.checkpoint_artifact}")


def summary(trial: optuna.trial.FrozenTrial) -> TrialSummary:
    """A finished trial, as hpo recorded it."""
    r = TrialRecord.of(trial)
    return TrialSummary(trial.number, trial.value, trial.params, r.best_epoch, r.epochs_run, r.stop_reason,
                        r.checkpoint_artifact, r.device, r.hostname, r.seconds)
