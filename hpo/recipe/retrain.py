"""The recipe's last step: the best trial's hyperparameters trained on the full split, then one
evaluation on the test split. The final model is saved with its config and stored in the study."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpo.engine.checkpoints import load_checkpoint, save_checkpoint
from hpo.engine.data import ImageData, to_device
from hpo.engine.loop import evaluate
from hpo.engine.models import build_model
from hpo.engine.records import Stop
from hpo.engine.runs import Result, train_run
from hpo.engine.sources import load_data
from hpo.files import store_artifact, write_json
from hpo.study.handle import StudyError, StudyHandle
from hpo.study.reads import best_trials
from hpo.study.records import RETRAIN_ATTR
from hpo.workers.members import shareable, train_together


@dataclass(frozen=True)
class Transfer:
    """One retrained trial: its val acc on the subset (the search's) and on the full split."""

    trial: int
    subset_val_acc: float
    full_val_acc: float


@dataclass(frozen=True)
class RetrainResult(Result):
    """The final model: where it came from, how it did on val and test, where it is."""

    from_trial: int
    params: dict[str, Any]
    val_acc: float
    test_acc: float
    test_loss: float
    epochs_run: int
    best_epoch: int
    stop: Stop
    seconds: float
    checkpoint: Path  # final.pt
    artifact: str  # its id in the study's artifact store
    transfer: tuple[Transfer, ...]  # every retrained trial, best on the subset first
    spearman: float | None  # subset val acc against full val acc, by rank; None for one trial

    @classmethod
    def stored(cls, handle: StudyHandle) -> RetrainResult:
        """The study's last retrain, as ``retrain`` stored it (``hpo:retrain``, its params left out)."""
        d = dict(handle.study.user_attrs[RETRAIN_ATTR])
        stop = Stop(d.pop("stop_reason"))
        return cls(**{**d, "params": handle.study.trials[d["from_trial"]].params, "stop": stop,
                      "checkpoint": Path(d["checkpoint"]), "transfer": tuple(Transfer(**t) for t in d["transfer"])})

    def line(self) -> str:
        among = "" if len(self.transfer) < 2 else (
            f" (the best on the full split's val of {len(self.transfer)} retrained; subset-to-full Spearman rho "
            + ("-" if self.spearman is None else f"{self.spearman:.2f}") + ")")
        return (f"retrained trial {self.from_trial} on the full split{among}: val_acc {self.val_acc:.4f}, test_acc "
                f"{self.test_acc:.4f} after {self.epochs_run} epochs ({self.stop.value}); model {self.checkpoint}, "
                f"study artifact {self.artifact}")


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation, ties given their average rank; None where it is undefined
    (fewer than two pairs, or one side constant)."""
    def ranks(v: Sequence[float]) -> np.ndarray:
        a = np.asarray(v, dtype=float)
        return np.array([(a < x).sum() + ((a == x).sum() + 1) / 2 for x in a])

    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def retrain(handle: StudyHandle, device: torch.device, out: Path, artifacts: Path, data: ImageData | None = None,
            log: Callable[[str], None] | None = print, together: bool | None = None) -> RetrainResult:
    """Train the ``[retrain] top`` best trials' parameters on the full train split with the study's
    ``[retrain]`` budget (epochs, early stopping, StepLR), ``together`` as one population where they
    can share one (None: on CUDA). The one with the best val acc there is evaluated once on test,
    saved as ``final.pt`` and uploaded as a study artifact; every one's subset and full val acc go
    in the result and the study (the report's subset-to-full table)."""
    trials = best_trials(handle, handle.cfg.retrain.top)
    if not trials:
        raise StudyError(f"study {handle.cfg.study.name!r} has no completed trial to retrain yet; "
                         "finish some with `hpo run` first")
    # [retrain]'s keys are train keys: its budget replaces the trial's
    budget = {f"train.{k}": v for k, v in handle.cfg.retrain.overrides().items()}
    if handle.cfg.retrain.augment:
        budget["augment"] = handle.cfg.retrain.augment
    cfgs = [handle.cfg.with_params({**t.params, "data.train_on": "full", **budget}) for t in trials]
    data = data if data is not None else load_data(cfgs[0].data.path)
    # As one population where they can share one (same model shape, optimizer...): by default on CUDA
    # alone, where launches dominate; on a CPU a population is slower (docs/population.md).
    if (device.type == "cuda" if together is None else together) and len(cfgs) > 1 and shareable(cfgs, data):
        runs = train_together(cfgs, device, out, data, log)
    else:
        runs = [train_run(cfg, device, out, data, log=log) for cfg in cfgs]
    chosen = max(range(len(runs)), key=lambda i: runs[i].best_val_acc)  # by val: test is looked at once
    best, cfg, run = trials[chosen], cfgs[chosen], runs[chosen]

    model = build_model(cfg.model, data.input_shape, len(data.classes)).to(device)
    model.load_state_dict(load_checkpoint(run.checkpoint, device)["model"])
    test_loss, test_acc = evaluate(model, to_device(data.test_x, data.test_y, device))
    final = run.run_dir / "final.pt"
    save_checkpoint(final, {"model": model.state_dict(), "config": cfg.to_dict(), "classes": list(data.classes),
                            "val_acc": run.best_val_acc, "test_acc": test_acc, "from_trial": best.number})
    transfer = tuple(Transfer(t.number, t.value, r.best_val_acc) for t, r in zip(trials, runs, strict=True))
    result = RetrainResult(best.number, best.params, run.best_val_acc, test_acc, test_loss, run.epochs_run,
                           run.best_epoch, run.stop, run.seconds, final, store_artifact(artifacts, final, handle.study),
                           transfer, spearman([t.subset_val_acc for t in transfer], [t.full_val_acc for t in transfer]))
    write_json(run.run_dir / "retrain.json", result.to_dict())
    handle.study.set_user_attr(RETRAIN_ATTR, {k: v for k, v in result.to_dict().items() if k != "params"})
    return result
