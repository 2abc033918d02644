"""The study: an Optuna study in a SQL database whose trials are a queue of exactly N slots.

Exactness, across any number of workers: the study never holds more than N trials that are
COMPLETE, PRUNED, RUNNING or WAITING. Only :func:`top_up` and :func:`requeue` add trials, always
under the study lock, and only up to N; a trial's own failure (NaN loss, OOM) leaves a gap that the
next top-up fills with a new draw, an attempt that failed through no fault of its own (a dead
worker, Ctrl-C, a full disk) is queued again with its parameters. Workers only pop WAITING
trials. Random and grid parameters are drawn when a slot is queued and stored with it (trial k of
a seeded study always gets the same draw); TPE samples when a slot runs.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState

from hpo.config.study_file import StudyConfig
from hpo.storages.locks import study_lock
from hpo.study.handle import COUNTED, StudyError, StudyHandle
from hpo.study.records import DRAW_ATTR, REQUEUE_ATTR, RETRY_ATTR, TARGET_ATTR, TrialRecord, retry_attrs

LIVE = (*COUNTED, TrialState.RUNNING, TrialState.WAITING)  # what a top-up fills up to N
POP_SPREAD = 8  # how many of the first WAITING trials a worker picks among
# WAITING slots queued ahead: at least this many, or as many as trials RUNNING (as many workers).
# Optuna's trial cache re-reads every unfinished trial at each listing (the pruner's, TPE's), so
# queueing all N up front would make those O(N); workers (or the proxy) top up as they drain it.
QUEUE_AHEAD = 4 * POP_SPREAD


def distributions(cfg: StudyConfig) -> dict[str, BaseDistribution]:
    """The search space as Optuna distributions, ints where the key is an int."""
    return {key: spec.to_optuna() for key, spec in cfg.search.items()}


def draw(cfg: StudyConfig, index: int) -> dict[str, Any] | None:
    """The parameters of queued slot ``index``: seeded per slot, so they do not depend on which
    worker asks or when. None when a grid is used up; {} under TPE (it samples at run time)."""
    if cfg.study.sampler == "tpe":
        return {}
    if cfg.study.sampler == "grid":
        grid = itertools.product(*(spec.grid_points() for spec in cfg.search.values()))
        point = next(itertools.islice(grid, index, None), None)
        return None if point is None else dict(zip(cfg.search, point, strict=True))
    rng = np.random.default_rng(np.random.SeedSequence(cfg.study.seed).spawn(index + 1)[index])
    return {key: spec.draw(rng) for key, spec in cfg.search.items()}


def suggest(trial: optuna.trial.Trial, cfg: StudyConfig) -> dict[str, Any]:
    """The trial's parameters: queued values come back as they were drawn, TPE samples now."""
    return {key: spec.suggest(trial, key) for key, spec in cfg.search.items()}


def grid_size(cfg: StudyConfig) -> int | None:
    if cfg.study.sampler != "grid":
        return None
    return math.prod(len(spec.grid_points()) for spec in cfg.search.values())


def check_target(cfg: StudyConfig, n_trials: int) -> None:
    """Refuses a target that the search space cannot fill, before anything is written."""
    size = grid_size(cfg)
    if size is not None and n_trials > size:
        raise StudyError(f"--n-trials {n_trials}: the grid has only {size} points")


def requeue(storage: optuna.storages.RDBStorage, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """Queue a failed attempt's slot again with the same parameters, within the N cap (a dead worker's
    trial, an interrupted one). Its user attributes travel along, so the retry finds the attempt's
    run folder and resumes from its last checkpoint. Behind `hpo proxy`, the proxy does it (the
    trial is marked ``requeue``): False here."""
    if not storage.direct:
        return False
    with study_lock(storage, study.study_name):
        live = len(study.get_trials(deepcopy=False, states=LIVE))
        if live >= int(study.user_attrs.get(TARGET_ATTR, 0)):
            return False
        _retry(study, trial)
        return True


def _retry(study: optuna.Study, failed: optuna.trial.FrozenTrial) -> None:
    _queue(study, failed.params, failed.distributions, retry_attrs(failed), failed.intermediate_values)


def _marked(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The failed attempts marked ``requeue`` whose slot no retry took over yet (a worker behind
    `hpo proxy` cannot queue it, or one died between telling and queueing)."""
    taken = {t.user_attrs.get(RETRY_ATTR) for t in trials}
    return [t for t in trials
            if t.state == TrialState.FAIL and t.user_attrs.get(REQUEUE_ATTR) and t.number not in taken]


def _queue(study: optuna.Study, params: dict[str, Any], dists: dict[str, BaseDistribution],
           user_attrs: dict[str, Any], intermediate_values: dict[int, float] | None = None) -> None:
    """Add a WAITING trial whose parameters are already stored: one transaction, and the worker's
    suggest calls read them back rather than write them (enqueue_trial costs two more commits)."""
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=params, distributions={k: dists[k] for k in params},
        user_attrs=user_attrs, intermediate_values=intermediate_values or {}))


def set_target(handle: StudyHandle, n_trials: int) -> None:
    check_target(handle.cfg, n_trials)
    handle.study.set_user_attr(TARGET_ATTR, n_trials)


def _room(trials: list[optuna.trial.FrozenTrial], target: int) -> int:
    """How many slots a top-up queues: up to N live trials, and QUEUE_AHEAD or more waiting (above)."""
    missing = target - sum(t.state in LIVE for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    ahead = max(QUEUE_AHEAD, running) - sum(t.state == TrialState.WAITING for t in trials)
    return max(min(missing, ahead), 0)


def top_up(handle: StudyHandle) -> int:
    """Queue WAITING slots, QUEUE_AHEAD or more (above), while the study holds fewer than N live trials;
    returns how many were queued. The slots of attempts marked ``requeue`` (:func:`_marked`) come first,
    as retries: a gap such an attempt left is its own, never a new draw's. Behind `hpo proxy`, the
    proxy does it: 0 here."""
    if not handle.storage.direct or not _room(handle.trials(), handle.target):  # no lock to find nothing to do
        return 0
    with study_lock(handle.storage, handle.cfg.study.name):
        trials = handle.trials()
        retries = _marked(trials)[:_room(trials, handle.target)]
        for failed in retries:
            _retry(handle.study, failed)
        if retries:
            trials = handle.trials()
        drawn = 1 + max((t.user_attrs[DRAW_ATTR] for t in trials if DRAW_ATTR in t.user_attrs), default=-1)
        slots = []
        for index in range(drawn, drawn + _room(trials, handle.target)):
            params = draw(handle.cfg, index)
            if params is None:  # the grid is used up
                break
            slots.append((params, TrialRecord(draw=index).attrs()))
        if slots:
            handle.storage.create_waiting_trials(handle.study._study_id, slots, distributions(handle.cfg))
        return len(retries) + len(slots)


def pop_waiting(handle: StudyHandle) -> tuple[optuna.trial.Trial, int] | None:
    """Take one WAITING trial, atomically (the storage flips WAITING to RUNNING under a row lock)."""
    storage, study_id, tried = handle.storage, handle.study._study_id, set()
    # The first in line first: one worker runs the queue in order, so a seeded TPE study replays.
    # A worker that loses it to another tries the others in a random order, rather than race again;
    # once the storage offers none it has not tried, the queue is empty (for now).
    while waiting := [i for i in storage.waiting_trial_ids(study_id, POP_SPREAD) if i not in tried]:
        spread = waiting[1:]
        random.shuffle(spread)
        for trial_id in waiting[:1] + spread:
            tried.add(trial_id)
            try:
                if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    return optuna.trial.Trial(handle.study, trial_id), trial_id
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker took and finished it
    return None
