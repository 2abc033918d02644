"""What makes a study what it is: the config it was made with. ``open_study`` creates or joins one
and refuses, leaving it as it is, a study that hpo did not make or that holds another config."""

from __future__ import annotations

import json
import warnings
from typing import Any

import optuna

from hpo.config.study_file import StudyConfig
from hpo.storages.locks import study_lock
from hpo.storages.rdb import open_storage
from hpo.storages.retries import Liveness, mask
from hpo.study.handle import METRIC, StudyError, StudyHandle
from hpo.study.queue import requeue
from hpo.study.records import CONFIG_ATTR, HASH_ATTR
from hpo.study.samplers import make_pruner, make_sampler

# What makes a study what it is: a config that differs in any of these would mix results.
# The data path is left out: workers on other machines keep the same images elsewhere.
IDENTITY = ("data", "model", "train", "augment", "search", "study.sampler", "study.seed", "study.pruner")


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


def open_study(cfg: StudyConfig, storage_url: str, create: bool, liveness: Liveness = Liveness()) -> StudyHandle:
    """Create (``create``) or load the study named in ``cfg``, to run trials in. Refuses, and leaves
    as it is, a study that hpo did not make or that holds another config: results would be mixed."""
    holder: list = []
    storage = open_storage(storage_url, lambda s, t: requeue(holder[0], s, t), liveness)
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
            # both get here; create the study once, then start the workers (docs/workers.md).
            study.set_user_attr(HASH_ATTR, cfg.fingerprint(*IDENTITY))
            study.set_user_attr(CONFIG_ATTR, cfg.to_dict())
        _refuse_foreign(study, cfg)
        if study.metric_names is None:  # studies made before hpo named it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([METRIC])
    return StudyHandle(study, storage, cfg)
