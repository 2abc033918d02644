"""How a study picks and prunes: the Optuna sampler and pruner that ``[study]`` names.

Random and grid slots are drawn when they are queued (hpo.study.draw); TPE samples when a slot runs,
from the trials finished so far. Its randomness is seeded per trial, from ``[study] seed`` and the
trial's number: one TPESampler seeded once would hand every worker that starts at the same moment
the same point, while an unseeded one would never replay.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState

from hpo.config.study_file import StudyConfig


class SeededTPE(BaseSampler):
    """Optuna's TPE (multivariate: lr and optimizer, say, are chosen together), with a generator of
    its own for each trial, seeded from (``seed``, trial number). A study run by one worker replays
    draw for draw; workers sampling at once draw apart. Trials of one process (a population) each
    keep theirs until they end."""

    def __init__(self, seed: int):
        self.seed = seed
        self._tpe: dict[int, TPESampler] = {}  # trial number -> its sampler, while it runs

    def _for(self, trial: FrozenTrial) -> TPESampler:
        if trial.number not in self._tpe:
            seed = int(np.random.SeedSequence([self.seed, trial.number]).generate_state(1)[0])
            with warnings.catch_warnings():  # multivariate is marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._tpe[trial.number] = TPESampler(seed=seed, multivariate=True)
        return self._tpe[trial.number]

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: list[float] | None) -> None:
        self._for(trial).after_trial(study, trial, state, values)
        self._tpe.pop(trial.number, None)


def make_sampler(cfg: StudyConfig) -> BaseSampler:
    """``[study] sampler``'s Optuna sampler."""
    if cfg.study.sampler == "tpe":
        return SeededTPE(cfg.study.seed)
    return optuna.samplers.RandomSampler(seed=cfg.study.seed)  # every slot is pre-drawn anyway


def first_judged_epoch(cfg: StudyConfig) -> int:
    """The first epoch worth comparing trials at: the first after one-cycle's lr warmup. Inside it every
    trial is still near chance (cnn-search's first rung at epoch 1 pruned trials at 0.10-0.20 val acc)."""
    rising = cfg.train.warmup * cfg.train.epochs if cfg.train.schedule == "one-cycle" else 0.0
    return min(cfg.train.epochs, 1 + math.ceil(rising))


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    """``[study] pruner``'s Optuna pruner, its resource counted in epochs (one report per epoch).
    Sized for studies of a few dozen trials: the median pruner judges from epoch 2, once 3 trials have ended;
    successive halving and hyperband promote the best third at each rung. None judges a trial before
    ``first_judged_epoch`` (epoch 1, or the first after a one-cycle warmup)."""
    epochs, first = cfg.train.epochs, first_judged_epoch(cfg)
    if cfg.study.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(2, first))
    if cfg.study.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3)
    if cfg.study.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()
