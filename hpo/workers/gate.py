"""The gate a study passes before its first trial: the sanity checks, run once per config and
recorded in the study, where optuna-dashboard shows them."""

from __future__ import annotations

import platform
import time
from typing import Any

import optuna
import torch

from hpo.config.study_file import StudyConfig
from hpo.engine.checks import run_checks
from hpo.engine.data import ImageData
from hpo.engine.records import GateFailed


def config_hash(cfg: StudyConfig) -> str:
    """What the checks depend on: data (but its path), model, training, augmentation."""
    return cfg.fingerprint("data", "model", "train", "augment")


def gate(study: optuna.Study, cfg: StudyConfig, data: ImageData, device: torch.device,
         skip: bool = False) -> dict[str, Any]:
    """Run the checks once per config and study, recorded as the study user attribute
    ``gate:<config hash>`` (optuna-dashboard shows it). Raises GateFailed when a check fails."""
    key = f"gate:{config_hash(cfg)}"
    prior = study.user_attrs.get(key)
    if prior and prior.get("passed"):
        return prior
    record: dict[str, Any] = {"config_hash": key[5:], "host": platform.node(), "device": str(device),
                              "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if skip:
        record.update(passed=None, skipped=True)
        study.set_user_attr(key, record)
        return record
    report = run_checks(cfg, data, device)
    record.update(report.to_dict(), skipped=False)
    study.set_user_attr(key, record)
    if not report.passed:
        raise GateFailed(report)
    return record
