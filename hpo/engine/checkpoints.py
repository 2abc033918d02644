"""A run's checkpoints, written and read in one place: ``best.pt`` (the best epoch's weights, the
recipe's ``ckpt.pt``) and ``last.pt`` (everything to go on from). A file that cannot be read (cut
short by a worker that died mid-copy, damaged on a shared filesystem, another format) is said in one
line and set aside: the run starts from scratch rather than fail on it, and it is never copied on."""

from __future__ import annotations

import copy
import io
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from torch import nn

from hpo.engine.loop import LoopState
from hpo.engine.records import CheckpointError
from hpo.files import atomic_write, writing

FILES = ("best.pt", "last.pt")  # in this order: last.pt never runs ahead of best.pt
LAST_KEYS = ("model", "history", "optimizer", "generator")  # what going on from a last.pt needs


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic. Serialized in memory first: torch's own file writer reports a full disk as a bare
    RuntimeError, a plain write as the OSError that WriteError names."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: Path | io.BytesIO, device: torch.device | str = "cpu") -> dict:
    """A checkpoint's contents (``weights_only``: a file cannot run code), or CheckpointError."""
    try:
        with zipfile.ZipFile(path) as archive:  # torch does not check the CRCs: flipped bits would load as weights
            damaged = archive.testzip()
        if damaged:
            raise CheckpointError(f"{path}: not a readable checkpoint (bad CRC-32 for {damaged})")
        if isinstance(path, io.BytesIO):
            path.seek(0)
        state = torch.load(path, map_location=device, weights_only=True)
    except (FileNotFoundError, CheckpointError):
        raise
    except Exception as e:  # torch says a damaged file in many ways: RuntimeError, EOFError, UnpicklingError...
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({why})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path}: not an hpo checkpoint (no model weights in it)")
    return state


def _warn(message: str) -> None:
    print(f"hpo: {message}", file=sys.stderr, flush=True)


def read_resumable(run_dir: Path, device: torch.device | str = "cpu") -> tuple[dict, dict] | None:
    """``last.pt`` and ``best.pt`` of ``run_dir`` when both can be read, else None; a damaged pair is
    said in one line (the run then starts from scratch)."""
    if not (run_dir / "last.pt").is_file():
        return None
    try:
        last = load_checkpoint(run_dir / "last.pt", device)
        missing = [k for k in LAST_KEYS if k not in last]
        if missing:
            raise CheckpointError(f"{run_dir / 'last.pt'}: not a resumable checkpoint (no {', '.join(missing)})")
        return last, load_checkpoint(run_dir / "best.pt", device)
    except (CheckpointError, FileNotFoundError) as e:
        _warn(f"{e if isinstance(e, CheckpointError) else f'{e.filename}: missing'}; starting from scratch")
        return None


def carry_over(previous: Path, run_dir: Path) -> None:
    """Copy ``previous``'s checkpoints into the new attempt's ``run_dir`` when they can be read, each
    atomically (a worker that dies mid-copy leaves no half file behind); a damaged pair stays behind."""
    if previous == run_dir or read_resumable(previous) is None:
        return
    for file in FILES:
        with writing(run_dir / file):
            fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{file}.", suffix=".tmp")
            os.close(fd)
            try:
                shutil.copyfile(previous / file, tmp)
                os.replace(tmp, run_dir / file)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)


def resume_history(run_dir: Path) -> list[dict]:
    """The epochs a run directory already holds (from its ``last.pt``), or []."""
    saved = read_resumable(run_dir)
    return saved[0]["history"] if saved else []


class Checkpoints:
    """A run's files and when they are written. They are written after the last epoch and, before
    it, at most every ``every`` seconds (0: every epoch): a GPU epoch of the subset is shorter than
    writing them."""

    def __init__(self, run_dir: Path, every: float = 0.0):
        self.run_dir, self.best, self.last, self.every = run_dir, run_dir / "best.pt", run_dir / "last.pt", every
        self.saved_at, self.best_saved = time.perf_counter(), 0  # best_saved: the epoch best.pt holds

    def resume(self, model: nn.Module, state: LoopState) -> None:
        """Go on from ``last.pt`` when the run folder has a readable one, with the best weights of
        ``best.pt``; from scratch, as it was, when they do not fit this model."""
        saved = read_resumable(self.run_dir, next(model.parameters()).device)
        if saved is None:
            return
        last, best = saved
        before = copy.deepcopy(model.state_dict()), copy.deepcopy(state.state_dict())
        try:
            model.load_state_dict(last.pop("model"))
            state.load_state_dict(last)
            state.best_weights = best["model"]
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            model.load_state_dict(before[0])
            state.load_state_dict(before[1])
            state.best_weights = None
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _warn(f"{self.last}: does not fit this run ({why}); starting from scratch")
            return
        self.best_saved = state.best_epoch

    def save(self, model: nn.Module, state: LoopState, final: bool) -> None:
        """``best.pt`` if the best epoch changed, then ``last.pt``: it never runs ahead of ``best.pt``."""
        if not final and time.perf_counter() - self.saved_at < self.every:
            return
        if state.best_epoch != self.best_saved:
            save_checkpoint(self.best, {"model": state.best_weights, "epoch": state.best_epoch,
                                        "val_acc": state.best_val_acc})
            self.best_saved = state.best_epoch
        save_checkpoint(self.last, {"model": model.state_dict(), **state.state_dict()})
        self.saved_at = time.perf_counter()
