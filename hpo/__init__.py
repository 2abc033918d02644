"""hpo: hyperparameter search on Optuna that follows the recipe for training neural networks.

One subpackage per layer, each importing only those below it (pyproject's import-linter contract):

- ``cli``: the ``hpo`` command, a thin shell over the library;
- ``recipe``: the recipe's steps end to end: explore, retrain, report, pipeline;
- ``workers``: processes that run trials: one at a time or as a population, how a trial's end
  becomes its state, how a command ends, `hpo proxy`;
- ``study`` (the queue of exactly N, a study's identity, reads, samplers, faults, progress) and
  ``engine`` (data, augmentation, models, the loop, the population, runs, checkpoints, the gate's
  checks; torch, no Optuna), which never import each other;
- ``storages``: the database, retried, with locks; the worker's hot path; grpc://;
- ``config``: the study file, its sections and its search space;
- ``files``: files written whole or not at all, and safe folder names.

The public API below is imported on first use (PEP 562, as Optuna does): `hpo --help` and
`hpo best` load neither torch nor the engine.
"""

import importlib
import os
from typing import Any

# OpenMP threads waiting for work spin for 1,000 rounds, not libgomp's 300,000, then sleep: spinning
# threads of two processes on the same cores starve each other (a pair of `hpo train` on 2 cores: 68.5 s
# each instead of 5.4 s), while a lone run keeps its speed (sleeping at once, OMP_WAIT_POLICY=PASSIVE,
# made the gate's checks 2x slower). bench/results/contention-cpu*.md. The user's own settings win;
# this only acts if torch is not loaded yet.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

_API = {  # public name -> the module that defines it
    "Attempt": "hpo.workers.runner",
    "Categorical": "hpo.config.space",
    "CheckReport": "hpo.engine.checks",
    "Checkpoints": "hpo.engine.checkpoints",
    "ConfigError": "hpo.config.schema",
    "DEFAULT_STORAGE": "hpo.storages.retries",
    "DataError": "hpo.engine.records",
    "ModelError": "hpo.engine.records",
    "Distribution": "hpo.config.space",
    "EpochLog": "hpo.engine.loop",
    "EpochStats": "hpo.engine.records",
    "FitResult": "hpo.engine.records",
    "GateFailed": "hpo.engine.records",
    "ImageData": "hpo.engine.data",
    "Liveness": "hpo.storages.retries",
    "LoopState": "hpo.engine.loop",
    "Options": "hpo.workers.slots",
    "Outcome": "hpo.workers.runner",
    "PipelineResult": "hpo.recipe.pipeline",
    "Range": "hpo.config.space",
    "RetrainResult": "hpo.recipe.retrain",
    "RunSummary": "hpo.engine.runs",
    "Stop": "hpo.engine.records",
    "StudyConfig": "hpo.config.study_file",
    "ModelConfig": "hpo.config.schema",
    "StudyError": "hpo.study.handle",
    "TooManyFailures": "hpo.study.faults",
    "TrainVal": "hpo.engine.data",
    "TrainingDiverged": "hpo.engine.records",
    "WriteError": "hpo.files",
    "best_trial": "hpo.study.reads",
    "build_model": "hpo.engine.models",
    "explore": "hpo.recipe.explore",
    "fit": "hpo.engine.loop",
    "gate": "hpo.engine.checks",
    "join_study": "hpo.workers.worker",
    "load_checkpoint": "hpo.engine.checkpoints",
    "load_data": "hpo.engine.sources",
    "load_study": "hpo.config.study_file",
    "make_augment": "hpo.engine.augment",
    "make_splits": "hpo.engine.data",
    "open_study": "hpo.study.identity",
    "pipeline": "hpo.recipe.pipeline",
    "read_study": "hpo.study.reads",
    "recipe_on_device": "hpo.engine.augment",
    "recipe_pipeline": "hpo.engine.augment",
    "resolve_device": "hpo.engine.data",
    "retrain": "hpo.recipe.retrain",
    "run_checks": "hpo.engine.checks",
    "run_study": "hpo.workers.worker",
    "study_report": "hpo.recipe.report",
    "synthetic": "hpo.engine.sources",
    "train_run": "hpo.engine.runs",
    "training_splits": "hpo.engine.data",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'hpo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
