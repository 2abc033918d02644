"""Everything hpo stores in a study, in one place: the name of every attribute, and typed readers and
writers for what a trial records (TrialRecord) and what the gate records (GateRecord).

Any Optuna client may write attributes too, so readers keep what they know and leave the rest.
Two system attributes belong to the layer below, the proxy's wire protocol: HEARTBEAT_KEY on a
trial (hpo.storages.retries) and QUEUE_KEY on a study (hpo.storages.remote)."""

from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass
from typing import Any

import optuna

# Study user attributes.
TARGET_ATTR = "hpo:n_trials"  # N, the finished trials the study is to hold
CONFIG_ATTR = "hpo:config"  # the config the study was made with (StudyConfig.to_dict)
HASH_ATTR = "hpo:config_hash"  # its identity fingerprint, which a joining config must match
RETRAIN_ATTR = "hpo:retrain"  # the study's last retrain: the report's subset-to-full table
PIPELINE_ATTR = "hpo:pipeline"  # + ":<stage>": a finished stage's wall seconds and what it depended on
GATE_ATTR = "gate:"  # + "<config hash>": that config's GateRecord

# Trial user attributes are TrialRecord's fields, each named as its field but these.
_KEYS = {"draw": "hpo:draw"}


@dataclass(frozen=True)
class TrialRecord:
    """What hpo records on a trial, as its user attributes; None where the trial has not got that far.
    Build one with the fields to write and :meth:`write` it: fields left at their default are not
    written, so a writer never clears what another wrote."""

    # Queued: which draw of the search space the slot holds, which failed attempt it takes over from.
    draw: int | None = None
    retry_of: int | None = None
    # Claimed: where the attempt runs (hpo.workers.slots.claim).
    device: str | None = None
    hostname: str | None = None
    worker: str | None = None  # host:pid, the report's timeline row
    run_dir: str | None = None  # the attempt's run folder; a retry resumes from its checkpoints
    population: str | None = None  # the worker whose population trained it (hpo.workers.members)
    # Ran: written once, when the run ends (the history is O(epochs)).
    history: tuple[dict[str, Any], ...] = ()  # an EpochStats dict per epoch
    checkpoint_artifact: str | None = None  # best.pt's id in the study's artifact store
    best_epoch: int | None = None
    epochs_run: int | None = None
    seconds: float | None = None
    resumed_from_epoch: int | None = None
    # Told: how it ended.
    stop_reason: str | None = None  # a Stop's value
    fail_reason: str | None = None  # the error, one line
    requeue: bool = False  # failed through no fault of its own: its slot is queued again

    @classmethod
    def of(cls, trial: optuna.trial.FrozenTrial) -> TrialRecord:
        found = {_FIELDS[k]: v for k, v in trial.user_attrs.items() if k in _FIELDS}
        if "history" in found:
            found["history"] = tuple(found["history"])
        return cls(**found)

    def attrs(self) -> dict[str, Any]:
        """The fields set (not at their default), as user attributes."""
        return {_key(f.name): list(v) if isinstance(v, tuple) else v
                for f in dataclasses.fields(self) if (v := getattr(self, f.name)) != f.default}

    def write(self, trial: optuna.trial.Trial) -> None:
        """The fields set, in one round trip (``trial.set_user_attr`` commits each alone)."""
        attrs = self.attrs()
        storage = getattr(trial.storage, "_backend", trial.storage)  # hpo's storage, under Optuna's trial cache
        storage.set_trial_user_attrs(trial._trial_id, attrs)
        trial._cached_frozen_trial.user_attrs.update(attrs)  # as trial.set_user_attr keeps it


def _key(field: str) -> str:
    return _KEYS.get(field, field)


_FIELDS = {_key(f.name): f.name for f in dataclasses.fields(TrialRecord)}  # attribute name -> field
# Read straight from the attributes by the queue's scans over every trial of a study (top-ups under
# the study lock, the proxy's keeper twice a second): a whole TrialRecord per trial costs 30 times more.
DRAW_ATTR, RETRY_ATTR, REQUEUE_ATTR = _key("draw"), _key("retry_of"), _key("requeue")


def claimed(device: str, run_dir: str) -> TrialRecord:
    """The record of an attempt this process starts."""
    return TrialRecord(device=device, hostname=platform.node(), worker=f"{platform.node()}:{os.getpid()}",
                       run_dir=run_dir)


def retry_attrs(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The user attributes of the slot that takes a failed attempt over: all of the attempt's (its run
    folder, to resume from; any other client's too) but how it failed, and which attempt it retries."""
    failed = {_key("fail_reason"), REQUEUE_ATTR}
    return {k: v for k, v in trial.user_attrs.items() if k not in failed} | {RETRY_ATTR: trial.number}


@dataclass(frozen=True)
class GateRecord:
    """The gate's record for one config (study attribute ``gate:<config hash>``, which
    optuna-dashboard shows): where and when the checks ran, and what they found."""

    config_hash: str = ""  # the key's suffix (hpo.workers.gate.config_hash)
    host: str = ""
    device: str = ""
    at: str = ""  # local time, ISO 8601
    skipped: bool = False  # --skip-checks
    passed: bool | None = None  # None where skipped
    checks: tuple[dict[str, Any], ...] = ()  # a Check's fields each (hpo.engine.checks)
    warnings: tuple[str, ...] = ()

    @classmethod
    def of(cls, stored: dict[str, Any]) -> GateRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        found = {k: tuple(v) if k in ("checks", "warnings") else v for k, v in stored.items() if k in known}
        return cls(**found)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def read(cls, study: optuna.Study, config_hash: str) -> GateRecord | None:
        stored = study.user_attrs.get(GATE_ATTR + config_hash)
        return cls.of(stored) if isinstance(stored, dict) else None

    @classmethod
    def read_all(cls, study: optuna.Study) -> list[GateRecord]:
        """Every config's record, in the order written; another client's value under the prefix is left."""
        return [cls.of(v) for k, v in study.user_attrs.items() if k.startswith(GATE_ATTR) and isinstance(v, dict)]

    def write(self, study: optuna.Study) -> None:
        study.set_user_attr(GATE_ATTR + self.config_hash, self.to_dict())


@dataclass(frozen=True)
class StageRecord:
    """A pipeline stage that finished (study attribute ``hpo:pipeline:<stage>``, one per stage: two
    pipelines at once cannot lose each other's)."""

    seconds: float  # its wall time
    inputs: Any  # what it depended on (JSON); other inputs run it again

    @classmethod
    def read(cls, study: optuna.Study, stage: str) -> StageRecord | None:
        stored = study.user_attrs.get(f"{PIPELINE_ATTR}:{stage}")
        if not isinstance(stored, dict) or "seconds" not in stored:
            return None
        return cls(stored["seconds"], stored.get("inputs"))

    def write(self, study: optuna.Study, stage: str) -> None:
        study.set_user_attr(f"{PIPELINE_ATTR}:{stage}", dataclasses.asdict(self))
