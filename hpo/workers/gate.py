"""The gate a study passes before its first trial: the sanity checks, run once per config and
recorded in the study, where optuna-dashboard shows them."""

from __future__ import annotations

import dataclasses
import platform
import time

import optuna
import torch

from hpo.config.study_file import StudyConfig
from hpo.engine.checks import run_checks
from hpo.engine.data import ImageData
from hpo.engine.records import GateFailed
from hpo.study.records import GateRecord


def config_hash(cfg: StudyConfig) -> str:
    """What the checks depend on: data (but its path), model, training, augmentation."""
    return cfg.fingerprint("data", "model", "train", "augment")


def gate(study: optuna.Study, cfg: StudyConfig, data: ImageData, device: torch.device,
         skip: bool = False) -> GateRecord:
    """Run the checks once per config and study, recorded as the study user attribute
    ``gate:<config hash>`` (optuna-dashboard shows it). Raises GateFailed when a check fails."""
    key = config_hash(cfg)
    prior = GateRecord.read(study, key)
    if prior and prior.passed:
        return prior
    record = GateRecord(key, platform.node(), str(device), time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if skip:
        record = dataclasses.replace(record, skipped=True)
        record.write(study)
        return record
    report = run_checks(cfg, data, device)
    record = dataclasses.replace(record, passed=report.passed, warnings=report.warnings,
                                 checks=tuple(dataclasses.asdict(c) for c in report.checks))
    record.write(study)
    if not report.passed:
        raise GateFailed(report)
    return record
