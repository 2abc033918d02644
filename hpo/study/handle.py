"""An open study, with the storage it lives in and the config it runs."""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from hpo.config.study_file import StudyConfig
from hpo.study.records import TARGET_ATTR

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # what "N finished trials" counts
METRIC = "val_acc"  # what the study maximizes; its name is stored so that dashboards label their axes


class StudyError(RuntimeError):
    """The study cannot run as asked; the message says why and what to do."""


@dataclass
class StudyHandle:
    """An open study with the storage it lives in."""

    study: optuna.Study
    storage: optuna.storages.RDBStorage
    cfg: StudyConfig

    @property
    def target(self) -> int:
        return int(self.study.user_attrs.get(TARGET_ATTR, self.cfg.study.n_trials))

    def trials(self, states: tuple[TrialState, ...] | None = None) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=states)
