"""One recorded training run: data -> model -> fit, with config, seed and git revision kept
beside the results in a directory of its own (never a shared ``ckpt.pt``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hpo.augment import make_augment
from hpo.config import StudyConfig
from hpo.data import ImageData, load_data, training_splits
from hpo.files import atomic_write, writing
from hpo.models import build_model
from hpo.train import EpochStats, fit, load_checkpoint


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


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write: temporary file in the same folder, then rename."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def new_run_dir(out: Path, name: str) -> Path:
    """A fresh directory per run, so parallel workers never share files."""
    run_dir = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    with writing(run_dir):
        run_dir.mkdir(parents=True)
    return run_dir


def run_record(cfg: StudyConfig, device: torch.device) -> dict[str, Any]:
    """What every run records beside its results."""
    return {"config": cfg.to_dict(), "seed": cfg.train.seed, "git_revision": git_revision(),
            "device": str(device), "hostname": platform.node(), "torch": torch.__version__}


def resume_history(run_dir: Path) -> list[dict]:
    """The epochs a run directory already holds (from its ``last.pt``), or []."""
    last = run_dir / "last.pt"
    return load_checkpoint(last)["history"] if last.is_file() else []


def train_run(cfg: StudyConfig, device: torch.device, out: Path, data: ImageData | None = None,
              on_epoch: Callable[[EpochStats], str | None] | None = None,
              log: Callable[[str], None] | None = print, run_dir: Path | None = None,
              save_every: float = 0.0) -> dict[str, Any]:
    """Train ``cfg`` once on ``device``; write ``config.json``, ``best.pt``, ``last.pt`` and
    ``results.json`` under a new directory in ``out`` (or ``run_dir``, going on from its
    ``last.pt`` if it has one); return the summary (``results.json`` minus the history).
    ``save_every``: seconds between checkpoint writes, see :func:`hpo.train.fit`."""
    t0 = time.perf_counter()
    data = data if data is not None else load_data(cfg.data.path)
    train, val = training_splits(data, cfg.data, device)  # bad data fails here, before any file
    data_seconds = time.perf_counter() - t0

    run_dir = run_dir or new_run_dir(out, cfg.study.name)
    write_json(run_dir / "config.json", run_record(cfg, device))
    torch.manual_seed(cfg.train.seed)
    try:
        model = build_model(cfg.model, train.x[0].numel(), len(data.classes)).to(device)
        result = fit(model, train, val, cfg.train, make_augment(cfg.augment), run_dir / "best.pt", on_epoch, log,
                     resumable=True, save_every=save_every)
    except Exception as e:  # recorded beside the config, then raised to the caller
        write_json(run_dir / "results.json", {"error": f"{type(e).__name__}: {e}", "run_dir": str(run_dir)})
        if isinstance(e, RuntimeError) and "can't allocate memory" in str(e):  # how the CPU allocator says it
            why = str(e).rpartition("] ")[2]
            raise torch.OutOfMemoryError(f"{why}; lower model.hidden or train.batch_size") from None
        raise

    summary = {
        "best_val_acc": result.best_val_acc, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
        "stop_reason": result.stop_reason, "seconds": round(result.seconds, 3),
        "train_samples_per_s": round(result.train_samples_per_s, 1), "data_seconds": round(data_seconds, 3),
        "train_size": len(train), "val_size": len(val), "checkpoint": result.checkpoint, "run_dir": str(run_dir),
        "resumed_from_epoch": result.resumed_from_epoch,
    }
    write_json(run_dir / "results.json", {**summary, "history": [dataclasses.asdict(s) for s in result.history]})
    return summary
