"""One recorded training run: data -> model -> fit, with config, seed and git revision kept
beside the results in a directory of its own (never a shared ``ckpt.pt``), and the checkpoint
policy that saves a run and lets a retried one go on from where it was cut.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpo.config.study_file import StudyConfig
from hpo.engine.augment import make_augment
from hpo.engine.checkpoints import Checkpoints
from hpo.engine.data import ImageData, check_fits, training_splits
from hpo.engine.loop import fit
from hpo.engine.models import build_model
from hpo.engine.records import EpochStats, Stop
from hpo.engine.sources import load_data
from hpo.files import folder_name, inside, write_json, writing


def git_revision() -> str:
    """``$HPO_GIT_REVISION`` where set (a Docker image, a copied tree), else the checkout's commit
    (``+dirty`` when it has local changes), else ``unknown``."""
    if os.environ.get("HPO_GIT_REVISION"):
        return os.environ["HPO_GIT_REVISION"]
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def new_run_dir(out: Path, name: str) -> Path:
    """A fresh directory per run, so parallel workers never share files; inside ``out`` whatever
    ``name`` holds (a study's name may come from a database any Optuna client writes to)."""
    run_dir = inside(out, f"{folder_name(name)}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    with writing(run_dir):
        run_dir.mkdir(parents=True)
    return run_dir


def run_record(cfg: StudyConfig, device: torch.device) -> dict[str, Any]:
    """What every run records beside its results."""
    return {"config": cfg.to_dict(), "seed": cfg.train.seed, "git_revision": git_revision(),
            "device": str(device), "hostname": platform.node(), "torch": torch.__version__}


class Result:
    """A frozen dataclass of results, as plain data for JSON: paths as strings, ``stop`` by its name."""

    def to_dict(self) -> dict[str, Any]:
        out = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}
        out["stop_reason"] = out.pop("stop").value
        return out


@dataclass(frozen=True)
class RunSummary(Result):
    """What a run ended with: its ``results.json``, less the history."""

    best_val_acc: float
    best_epoch: int
    epochs_run: int
    stop: Stop
    seconds: float  # in fit, data loading excluded
    train_samples_per_s: float
    data_seconds: float
    train_size: int
    val_size: int
    checkpoint: Path  # best.pt: the best epoch's weights
    run_dir: Path
    resumed_from_epoch: int  # > 0 when it went on from a run that was cut short

    def line(self) -> str:
        return (f"best val_acc {self.best_val_acc:.5f} at epoch {self.best_epoch} of {self.epochs_run} "
                f"({self.stop.value}), {self.seconds:.1f}s in fit, {self.train_samples_per_s:.0f} train samples/s; "
                f"checkpoint {self.checkpoint}")


def write_results(summary: RunSummary, history: list[dict]) -> None:
    """A run's ``results.json``: the summary and the per-epoch history."""
    write_json(summary.run_dir / "results.json", {**summary.to_dict(), "history": history})


def train_run(cfg: StudyConfig, device: torch.device, out: Path, data: ImageData | None = None,
              on_epoch: Callable[[EpochStats], bool] | None = None,
              log: Callable[[str], None] | None = print, run_dir: Path | None = None,
              save_every: float = 0.0) -> RunSummary:
    """Train ``cfg`` once on ``device``; write ``config.json``, ``best.pt``, ``last.pt`` and
    ``results.json`` under a new directory in ``out`` (or ``run_dir``, going on from its
    ``last.pt`` if it has one). ``on_epoch`` may stop the run (see :func:`hpo.engine.loop.fit`);
    ``log`` gets the recipe's line per epoch; ``save_every``: see :class:`Checkpoints`."""
    t0 = time.perf_counter()
    data = data if data is not None else load_data(cfg.data.path)
    check_fits(cfg, data)
    splits = training_splits(data, cfg.data, device)  # bad data fails here, before any file
    data_seconds = time.perf_counter() - t0

    run_dir = run_dir or new_run_dir(out, cfg.study.name)
    write_json(run_dir / "config.json", run_record(cfg, device))

    def epoch_done(stats: EpochStats) -> bool:
        if log:
            log(stats.line(cfg.train.epochs))
        return bool(on_epoch and on_epoch(stats))

    torch.manual_seed(cfg.train.seed)
    checkpoints = Checkpoints(run_dir, save_every)
    try:
        model = build_model(cfg.model, data.input_shape, len(data.classes)).to(device)
        result = fit(model, splits, cfg.train, make_augment(cfg.augment), epoch_done, checkpoints)
    except Exception as e:  # recorded beside the config, then raised to the caller
        write_json(run_dir / "results.json", {"error": f"{type(e).__name__}: {e}", "run_dir": str(run_dir)})
        if isinstance(e, RuntimeError) and "can't allocate memory" in str(e):  # how the CPU allocator says it
            why = str(e).rpartition("] ")[2]
            raise torch.OutOfMemoryError(f"{why}; lower model.hidden or train.batch_size") from None
        raise

    summary = RunSummary(result.best_val_acc, result.best_epoch, result.epochs_run, result.stop,
                         round(result.seconds, 3), round(result.train_samples_per_s, 1), round(data_seconds, 3),
                         len(splits.train), len(splits.val), checkpoints.best, run_dir, result.resumed_from_epoch)
    write_results(summary, [dataclasses.asdict(s) for s in result.history])
    return summary
