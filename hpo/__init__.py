"""hpo: hyperparameter search on Optuna that follows the recipe for training neural networks.

The modules follow the recipe's steps: data -> models -> augment -> train -> checks; ``runs``
records one training run, ``config`` reads study files, ``cli`` is the ``hpo`` command.
"""

from hpo.augment import make_augment, recipe_on_device, recipe_pipeline
from hpo.checks import CheckReport, GateFailed, gate, run_checks
from hpo.config import ConfigError, StudyConfig, load_study
from hpo.data import DataError, ImageData, load_data, make_splits, synthetic, training_splits
from hpo.models import build_model
from hpo.runs import train_run
from hpo.train import EpochStats, FitResult, TrainingDiverged, fit, load_checkpoint, resolve_device

__all__ = [
    "CheckReport", "ConfigError", "DataError", "EpochStats", "FitResult", "GateFailed", "ImageData",
    "StudyConfig", "TrainingDiverged", "build_model", "fit", "gate", "load_checkpoint", "load_data",
    "load_study", "make_augment", "make_splits", "recipe_on_device", "recipe_pipeline", "resolve_device",
    "run_checks", "synthetic", "train_run", "training_splits",
]
