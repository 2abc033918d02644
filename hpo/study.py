"""The study: an Optuna study in a SQL database whose trials are a queue of exactly N slots.

Exactness, across any number of workers: the study never holds more than N trials that are
COMPLETE, PRUNED, RUNNING or WAITING. Only :func:`top_up` adds trials, always under the study
lock, and only up to N; a failed trial (NaN loss, OOM, a dead worker) leaves a gap that the next
top-up fills. Workers only pop WAITING trials. Random and grid parameters are drawn when a slot is
queued and stored with it (trial k of a seeded study always gets the same draw); TPE samples when a
slot runs.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hpo.config import Categorical, Range, StudyConfig, hyperparameter
from hpo.storage import DB_TIMEOUT, GRACE_PERIOD, HEARTBEAT_INTERVAL, open_storage, study_lock

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # what "N finished trials" counts
LIVE = (*COUNTED, TrialState.RUNNING, TrialState.WAITING)  # what a top-up fills up to N
TARGET_ATTR, CONFIG_ATTR, HASH_ATTR, DRAW_ATTR = "hpo:n_trials", "hpo:config", "hpo:config_hash", "hpo:draw"
POP_SPREAD = 8  # how many of the first WAITING trials a worker picks among
# WAITING slots queued ahead at most. Every pop re-reads all unfinished trials (Optuna's trial
# cache), so queueing all N up front made each pop cost O(N); workers top up as they drain it.
QUEUE_AHEAD = 2 * POP_SPREAD


class StudyError(RuntimeError):
    """The study cannot run as asked; the message says why and what to do."""


def distributions(cfg: StudyConfig) -> dict[str, BaseDistribution]:
    """The search space as Optuna distributions, ints where the key is an int."""
    out: dict[str, BaseDistribution] = {}
    for key, spec in cfg.search.items():
        if isinstance(spec, Categorical):
            out[key] = CategoricalDistribution(spec.choices)
        elif hyperparameter(key)[1] is int:
            out[key] = IntDistribution(int(spec.low), int(spec.high), log=spec.log, step=int(spec.step or 1))
        else:
            out[key] = FloatDistribution(spec.low, spec.high, log=spec.log, step=spec.step)
    return out


def draw(cfg: StudyConfig, index: int) -> dict[str, Any] | None:
    """The parameters of queued slot ``index``: seeded per slot, so they do not depend on which
    worker asks or when. None when a grid is used up; {} under TPE (it samples at run time)."""
    if cfg.study.sampler == "tpe":
        return {}
    if cfg.study.sampler == "grid":
        grid = list(itertools.product(*(spec.choices for spec in cfg.search.values())))
        return dict(zip(cfg.search, grid[index], strict=True)) if index < len(grid) else None
    rng = np.random.default_rng(np.random.SeedSequence(cfg.study.seed).spawn(index + 1)[index])
    bounds = distributions(cfg)
    params: dict[str, Any] = {}
    for key, spec in cfg.search.items():
        if isinstance(spec, Categorical):
            params[key] = spec.choices[rng.integers(len(spec.choices))]
            continue
        assert isinstance(spec, Range)
        if spec.step:
            steps = int((spec.high - spec.low) // spec.step)
            value = spec.low + spec.step * rng.integers(steps + 1)
        elif spec.log:
            value = float(np.exp(rng.uniform(np.log(spec.low), np.log(spec.high))))
        else:
            value = float(rng.uniform(spec.low, spec.high))
        # Within Optuna's bounds (it moves a step range's high onto the grid): float arithmetic can
        # land an ulp outside them (0.004 + 5 * 0.01 > 0.054), and add_trial refuses such a value.
        dist = bounds[key]
        value = min(max(value, dist.low), dist.high)
        params[key] = int(round(value)) if isinstance(dist, IntDistribution) else float(value)
    return params


def grid_size(cfg: StudyConfig) -> int | None:
    if cfg.study.sampler != "grid":
        return None
    return int(np.prod([len(spec.choices) for spec in cfg.search.values()]))


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


def _sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    if cfg.study.sampler == "tpe":
        return optuna.samplers.TPESampler()  # unseeded: workers must not draw the same points
    return optuna.samplers.RandomSampler(seed=cfg.study.seed)  # every slot is pre-drawn anyway


def _pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    return {
        "none": optuna.pruners.NopPruner,
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2),
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.train.epochs),
    }[cfg.study.pruner]()


def _retry_stale(storage_holder: list, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A dead worker's trial: queue it again with the same parameters, within the N cap. Its
    user attributes travel along, so the retry can resume from the last epoch checkpoint."""
    with study_lock(storage_holder[0], study.study_name):
        live = len(study.get_trials(deepcopy=False, states=LIVE))
        if live >= int(study.user_attrs.get(TARGET_ATTR, 0)):
            return
        _queue(study, trial.params, trial.distributions, {**trial.user_attrs, "retry_of": trial.number},
               trial.intermediate_values)


def _queue(study: optuna.Study, params: dict[str, Any], dists: dict[str, BaseDistribution],
           user_attrs: dict[str, Any], intermediate_values: dict[int, float] | None = None) -> None:
    """Add a WAITING trial whose parameters are already stored: one transaction, and the worker's
    suggest calls read them back rather than write them (enqueue_trial costs two more commits)."""
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=params, distributions={k: dists[k] for k in params},
        user_attrs=user_attrs, intermediate_values=intermediate_values or {}))


def open_study(cfg: StudyConfig, storage_url: str, create: bool, heartbeat: int = HEARTBEAT_INTERVAL,
               grace: int = GRACE_PERIOD, db_timeout: float = DB_TIMEOUT) -> StudyHandle:
    """Create (``create``) or load the study named in ``cfg``. Refuses a study of that name that
    holds a different search space or config: results would be mixed."""
    holder: list = []
    storage = open_storage(storage_url, lambda s, t: _retry_stale(holder, s, t), heartbeat, grace, db_timeout)
    holder.append(storage)
    name = cfg.study.name
    exists = name in {s.study_name for s in optuna.get_all_study_summaries(storage)}
    if not exists and not create:
        raise StudyError(f"no study {name!r} in this storage; start it with `hpo run` first")
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", sampler=_sampler(cfg),
                                pruner=_pruner(cfg), load_if_exists=True)
    fingerprint = cfg.fingerprint("data", "model", "train", "augment", "search", "study.sampler", "study.seed",
                                  "study.pruner")
    stored = study.user_attrs.get(HASH_ATTR)
    if stored is None:
        study.set_user_attr(HASH_ATTR, fingerprint)
        study.set_user_attr(CONFIG_ATTR, cfg.to_dict())
    elif stored != fingerprint:
        raise StudyError(f"study {name!r} already exists with a different search space or config "
                         f"({stored} here, {fingerprint} now); set another [study] name, e.g. "
                         f"--param study.name={name}-2, rather than mix their results")
    return StudyHandle(study, storage, cfg)


def set_target(handle: StudyHandle, n_trials: int) -> None:
    size = grid_size(handle.cfg)
    if size is not None and n_trials > size:
        raise StudyError(f"--n-trials {n_trials}: the grid has only {size} points")
    handle.study.set_user_attr(TARGET_ATTR, n_trials)


def top_up(handle: StudyHandle) -> int:
    """Queue WAITING slots, at most QUEUE_AHEAD, while the study holds fewer than N live trials;
    returns how many were queued."""
    with study_lock(handle.storage, handle.cfg.study.name):
        trials = handle.trials()
        missing = handle.target - sum(t.state in LIVE for t in trials)
        room = QUEUE_AHEAD - sum(t.state == TrialState.WAITING for t in trials)
        drawn = 1 + max((t.user_attrs[DRAW_ATTR] for t in trials if DRAW_ATTR in t.user_attrs), default=-1)
        queued, dists = 0, distributions(handle.cfg)
        for index in range(drawn, drawn + max(min(missing, room), 0)):
            params = draw(handle.cfg, index)
            if params is None:  # the grid is used up
                break
            _queue(handle.study, params, dists, {DRAW_ATTR: index})
            queued += 1
        return queued


def pop_waiting(handle: StudyHandle) -> tuple[optuna.trial.Trial, int] | None:
    """Take one WAITING trial, atomically (the storage flips WAITING to RUNNING under a row lock)."""
    storage = handle.storage
    # Listed through the study, so that its trial cache learns trials queued by other processes.
    # Workers start at different places among the first few, rather than all race for the first.
    waiting = handle.trials((TrialState.WAITING,))
    head = waiting[:POP_SPREAD]
    random.shuffle(head)
    for trial in head + waiting[POP_SPREAD:]:
        trial_id = trial._trial_id  # Optuna's own key of a listed trial; asking the storage is a round trip
        try:
            if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                return optuna.trial.Trial(handle.study, trial_id), trial_id
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker took and finished it
    return None


def best_trial(handle: StudyHandle) -> optuna.trial.FrozenTrial | None:
    """The best COMPLETE trial (early-stopped ones included: they complete with their best epoch)."""
    done = handle.trials((TrialState.COMPLETE,))
    return max(done, key=lambda t: t.value) if done else None


def summary(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """What `hpo best` and `hpo run --json` show of a trial."""
    keep = ("best_epoch", "epochs_run", "stop_reason", "checkpoint_artifact", "device", "hostname", "seconds")
    return {"number": trial.number, "value": trial.value, "params": trial.params,
            **{k: trial.user_attrs.get(k) for k in keep}}
