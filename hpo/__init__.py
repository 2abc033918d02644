"""hpo: hyperparameter search on Optuna that follows the recipe for training neural networks.

The modules follow the recipe's steps: data -> models -> augment -> train -> checks -> study;
``runs`` records one training run and its checkpoints, ``config`` reads study files and ``space``
their search space, ``samplers`` makes the sampler and pruner they name, ``storage`` opens the
database (``owned`` cuts a worker's round trips to it; ``remote`` reaches it through ``proxy``,
`hpo proxy`), ``runner`` turns how a trial ended into the one state told, ``worker`` pops and runs
trials one at a time and ``members`` many at once as one ``population`` (``slots`` holds what the
two share), ``progress`` shows them, ``faults`` handles trials that nobody runs and studies whose
trials keep failing, ``files`` writes files whole or not at all, ``report`` draws data and studies,
``retrain`` is the recipe's last step, ``pipeline`` runs all the steps in order, ``exits`` says how
a command ends, ``cli`` is the ``hpo`` command.
"""

# ruff: noqa: E402  (the environment must be set before torch, imported below, loads OpenMP)
import os

# OpenMP threads waiting for work spin for 1,000 rounds, not libgomp's 300,000, then sleep: spinning
# threads of two processes on the same cores starve each other (a pair of `hpo train` on 2 cores: 68.5 s
# each instead of 5.4 s), while a lone run keeps its speed (sleeping at once, OMP_WAIT_POLICY=PASSIVE,
# made the gate's checks 2x slower). bench/results/contention-cpu*.md. The user's own settings win;
# this only acts if torch is not loaded yet.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from hpo.augment import make_augment, recipe_on_device, recipe_pipeline
from hpo.checkpoints import Checkpoints, load_checkpoint
from hpo.checks import CheckReport, GateFailed, gate, run_checks
from hpo.config import ConfigError, StudyConfig, load_study
from hpo.data import (
    DataError,
    ImageData,
    TrainVal,
    load_data,
    make_splits,
    resolve_device,
    synthetic,
    training_splits,
)
from hpo.faults import TooManyFailures
from hpo.files import WriteError
from hpo.models import build_model
from hpo.pipeline import PipelineResult, pipeline
from hpo.report import explore, study_report
from hpo.retrain import RetrainResult, retrain
from hpo.runner import Attempt, Outcome
from hpo.runs import RunSummary, train_run
from hpo.slots import Options
from hpo.space import Categorical, Distribution, Range
from hpo.storage import DEFAULT_STORAGE
from hpo.study import StudyError, best_trial, open_study, read_study
from hpo.train import EpochLog, EpochStats, FitResult, LoopState, Stop, TrainingDiverged, fit
from hpo.worker import join_study, run_study

__all__ = [
    "DEFAULT_STORAGE", "Attempt", "Categorical", "EpochLog", "CheckReport", "Checkpoints", "ConfigError", "DataError",
    "Distribution", "EpochStats", "FitResult", "GateFailed", "ImageData", "LoopState", "Options", "Outcome",
    "PipelineResult", "Range",
    "RetrainResult", "RunSummary", "Stop", "StudyConfig", "StudyError", "TooManyFailures", "TrainVal",
    "TrainingDiverged", "WriteError", "best_trial", "build_model", "explore", "fit", "gate", "join_study",
    "load_checkpoint", "load_data", "load_study", "make_augment", "make_splits", "open_study", "pipeline", "read_study",
    "recipe_on_device", "recipe_pipeline", "resolve_device", "retrain", "run_checks", "run_study", "study_report",
    "synthetic", "train_run", "training_splits",
]
