"""What the engine tells the layers above, without torch: an epoch's numbers, why a run stopped,
what a run returns, and the errors a person can act on (the ``hpo`` command says each in one line,
and `hpo best` or `hpo --help` need not load torch to know them)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol


class _Report(Protocol):  # hpo.engine.checks.CheckReport, which builds on this module
    def failed(self) -> list[str]: ...


class DataError(RuntimeError):
    """The data cannot be loaded; the message says where it looked and what to do."""


class ModelError(RuntimeError):
    """The model cannot be built: the factory raised, or returned something that is not a module."""


class CheckpointError(ValueError):
    """A checkpoint file cannot be read; the message names it and says why."""


class GateFailed(RuntimeError):
    """A sanity check failed: no trial may start."""

    def __init__(self, report: _Report):
        super().__init__(f"sanity checks failed: {', '.join(report.failed())}; run `hpo check` for details")
        self.report = report


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""

    @classmethod
    def at(cls, stats: EpochStats) -> TrainingDiverged:
        return cls(f"loss is {stats.loss} at epoch {stats.epoch} (lr {stats.lr:g}); lower train.lr")


@dataclass(frozen=True)
class EpochStats:
    """One row of the recipe's per-epoch log."""

    epoch: int
    loss: float
    acc: float
    val_loss: float
    val_acc: float
    lr: float
    seconds: float

    def line(self, epochs: int) -> str:
        """The recipe's log line for this epoch, of ``epochs``."""
        return (f"Epoch {self.epoch}/{epochs} loss {self.loss:.5f} acc {self.acc:.5f} val_loss {self.val_loss:.5f} "
                f"val_acc {self.val_acc:.5f} lr {self.lr:.5f} ({self.seconds:.1f}s)")


class Stop(Enum):
    """Why ``fit`` stopped."""

    COMPLETED = "completed"  # every epoch ran
    EARLY_STOPPING = "early_stopping"  # train.patience epochs without a better val_acc
    REQUESTED = "requested"  # on_epoch asked (the study's pruner; a check that has seen enough)


@dataclass(frozen=True)
class FitResult:
    """What ``fit`` returns; the model holds the best epoch's weights."""

    history: tuple[EpochStats, ...]  # every epoch, those of a run it went on from included
    best_epoch: int
    best_val_acc: float
    stop: Stop
    seconds: float  # training and validation epochs of this call, data loading excluded
    train_samples_per_s: float
    resumed_from_epoch: int = 0  # > 0 when the run went on from a saved state

    @property
    def epochs_run(self) -> int:
        return len(self.history)
