"""An open study, and the names of what hpo stores in it (study and trial attributes)."""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from hpo.config.study_file import StudyConfig

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # what "N finished trials" counts
TARGET_ATTR, CONFIG_ATTR, HASH_ATTR, DRAW_ATTR = "hpo:n_trials", "hpo:config", "hpo:config_hash", "hpo:draw"
RETRY_ATTR = "retry_of"  # on a slot queued again: the number of the attempt it takes over from
REQUEUE_ATTR = "requeue"  # on a failed attempt whose slot is to be queued again (not the trial's fault)
RETRAIN_ATTR = "hpo:retrain"  # the study's last retrain: the report's subset-to-full table
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
