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
import json
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState

from hpo.config import StudyConfig
from hpo.samplers import make_pruner, make_sampler
from hpo.storage import (
    DB_TIMEOUT,
    GRACE_PERIOD,
    HEARTBEAT_INTERVAL,
    StorageError,
    mask,
    open_storage,
    study_lock,
)

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # what "N finished trials" counts
LIVE = (*COUNTED, TrialState.RUNNING, TrialState.WAITING)  # what a top-up fills up to N
TARGET_ATTR, CONFIG_ATTR, HASH_ATTR, DRAW_ATTR = "hpo:n_trials", "hpo:config", "hpo:config_hash", "hpo:draw"
RETRY_ATTR = "retry_of"  # on a slot queued again: the number of the attempt it takes over from
REQUEUE_ATTR = "requeue"  # on a failed attempt whose slot is to be queued again (not the trial's fault)
METRIC = "val_acc"  # what the study maximizes; its name is stored so that dashboards label their axes
# What makes a study what it is: a config that differs in any of these would mix results.
# The data path is left out: workers on other machines keep the same images elsewhere.
IDENTITY = ("data", "model", "train", "augment", "search", "study.sampler", "study.seed", "study.pruner")
POP_SPREAD = 8  # how many of the first WAITING trials a worker picks among
# WAITING slots queued ahead: at least this many, or as many as trials RUNNING (as many workers).
# Optuna's trial cache re-reads every unfinished trial at each listing (the pruner's, TPE's), so
# queueing all N up front would make those O(N); workers (or the proxy) top up as they drain it.
QUEUE_AHEAD = 4 * POP_SPREAD


class StudyError(RuntimeError):
    """The study cannot run as asked; the message says why and what to do."""


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


def requeue(storage: optuna.storages.RDBStorage, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """Queue a failed attempt's slot again with the same parameters, within the N cap (a dead worker's
    trial, an interrupted one). Its user attributes travel along, so the retry finds the attempt's
    run folder and resumes from its last checkpoint. Behind `hpo proxy`, the proxy does it (the
    trial is marked REQUEUE_ATTR): False here."""
    if not storage.direct:
        return False
    with study_lock(storage, study.study_name):
        live = len(study.get_trials(deepcopy=False, states=LIVE))
        if live >= int(study.user_attrs.get(TARGET_ATTR, 0)):
            return False
        attrs = {k: v for k, v in trial.user_attrs.items() if k not in ("fail_reason", REQUEUE_ATTR)}
        _queue(study, trial.params, trial.distributions, attrs | {RETRY_ATTR: trial.number}, trial.intermediate_values)
        return True


def marked(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The failed attempts marked REQUEUE_ATTR whose slot no retry took over yet (a worker behind
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


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    """The IDENTITY parts of a stored or current config as dotted keys, as JSON stores them."""
    config = json.loads(json.dumps(config, default=str))
    out: dict[str, Any] = {}
    for part in IDENTITY:
        section, _, key = part.partition(".")
        value = config.get(section, {}).get(key) if key else config.get(section)
        if isinstance(value, dict):
            out.update({f"{part}.{k}": v for k, v in value.items() if part != "data" or k != "path"})
        else:
            out[part] = value
    return out


def config_diff(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: X in the study, Y in the file`` for each identity key where the two configs differ."""
    a, b = _identity(stored), _identity(current)

    def show(v: Any) -> str:
        return "nothing" if v is None else json.dumps(v) if isinstance(v, (dict, list, str)) else str(v)

    return [f"{k}: {show(a.get(k))} in the study, {show(b.get(k))} in the file"
            for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def _refuse_foreign(study: optuna.Study, cfg: StudyConfig) -> None:
    """Workers run only hpo's own studies, and only with the config the study was made with."""
    name = study.study_name
    stored = study.user_attrs.get(CONFIG_ATTR)
    if stored is None or study.user_attrs.get(HASH_ATTR) is None:
        raise StudyError(f"study {name!r} was not made by hpo (it has no {CONFIG_ATTR} attribute); hpo leaves it "
                         f"as it is: set another [study] name, e.g. --param study.name={name}-hpo")
    directions = [d.name for d in study.directions]
    if directions != ["MAXIMIZE"]:
        raise StudyError(f"study {name!r} has direction {', '.join(directions)}; hpo maximizes {METRIC} and leaves "
                         f"it as it is: set another [study] name, e.g. --param study.name={name}-hpo")
    if study.user_attrs[HASH_ATTR] != cfg.fingerprint(*IDENTITY):
        diff = "; ".join(config_diff(stored, cfg.to_dict())) or "the config hash differs"
        raise StudyError(f"study {name!r} was made with another config ({diff}); run the file it was made with, "
                         f"or set another [study] name (e.g. --param study.name={name}-2) rather than mix results")


def open_study(cfg: StudyConfig, storage_url: str, create: bool, heartbeat: int = HEARTBEAT_INTERVAL,
               grace: int = GRACE_PERIOD, db_timeout: float = DB_TIMEOUT) -> StudyHandle:
    """Create (``create``) or load the study named in ``cfg``, to run trials in. Refuses, and leaves
    as it is, a study that hpo did not make or that holds another config: results would be mixed."""
    holder: list = []
    storage = open_storage(storage_url, lambda s, t: requeue(holder[0], s, t), heartbeat, grace, db_timeout)
    holder.append(storage)
    name = cfg.study.name
    with study_lock(storage, name):  # runs started at the same instant: one creates, the others join
        try:
            study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(cfg),
                                      pruner=make_pruner(cfg))
        except KeyError:
            if not create:
                raise StudyError(f"no study {name!r} in {mask(storage_url)}; start it with `hpo run` first") from None
            study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                        sampler=make_sampler(cfg), pruner=make_pruner(cfg), load_if_exists=True)
            # load_if_exists: behind `hpo proxy` (no lock) two runs started at the same instant may
            # both get here; create the study once, then start the workers (README).
            study.set_user_attr(HASH_ATTR, cfg.fingerprint(*IDENTITY))
            study.set_user_attr(CONFIG_ATTR, cfg.to_dict())
        _refuse_foreign(study, cfg)
        if study.metric_names is None:  # studies made before hpo named it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([METRIC])
    return StudyHandle(study, storage, cfg)


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
    returns how many were queued. Behind `hpo proxy`, the proxy does it: 0 here."""
    if not handle.storage.direct or not _room(handle.trials(), handle.target):  # no lock to find nothing to do
        return 0
    with study_lock(handle.storage, handle.cfg.study.name):
        trials = handle.trials()
        drawn = 1 + max((t.user_attrs[DRAW_ATTR] for t in trials if DRAW_ATTR in t.user_attrs), default=-1)
        slots = []
        for index in range(drawn, drawn + _room(trials, handle.target)):
            params = draw(handle.cfg, index)
            if params is None:  # the grid is used up
                break
            slots.append((params, {DRAW_ATTR: index}))
        if slots:
            handle.storage.create_waiting_trials(handle.study._study_id, slots, distributions(handle.cfg))
        return len(slots)


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


def set_user_attrs(trial: optuna.trial.Trial, attrs: dict[str, Any]) -> None:
    """Several user attributes of ``trial`` in one round trip (``trial.set_user_attr`` commits each alone)."""
    storage = getattr(trial.storage, "_backend", trial.storage)  # hpo's storage, under Optuna's trial cache
    storage.set_trial_user_attrs(trial._trial_id, attrs)
    trial._cached_frozen_trial.user_attrs.update(attrs)  # as trial.set_user_attr keeps it


def best_trials(handle: StudyHandle, k: int = 1) -> list[optuna.trial.FrozenTrial]:
    """The ``k`` best COMPLETE trials, best first, ties in trial order (early-stopped ones included:
    they complete with their best epoch)."""
    return sorted(handle.trials((TrialState.COMPLETE,)), key=lambda t: t.value, reverse=True)[:k]


def best_trial(handle: StudyHandle) -> optuna.trial.FrozenTrial | None:
    """The best COMPLETE trial, or None before any completed."""
    return next(iter(best_trials(handle)), None)


def summary(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """What `hpo best` and `hpo run --json` show of a trial."""
    keep = ("best_epoch", "epochs_run", "stop_reason", "checkpoint_artifact", "device", "hostname", "seconds")
    return {"number": trial.number, "value": trial.value, "params": trial.params,
            **{k: trial.user_attrs.get(k) for k in keep}}
