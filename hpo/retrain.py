"""The recipe's last step: the best trial's hyperparameters trained on the full split, then one
evaluation on the test split. The final model is saved with its config and stored in the study."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpo.data import ImageData, load_data, to_device
from hpo.files import store_artifact, write_json
from hpo.models import build_model
from hpo.runs import Result, load_checkpoint, save_checkpoint, train_run
from hpo.study import StudyError, StudyHandle, best_trial
from hpo.train import Stop, evaluate


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

    def line(self) -> str:
        return (f"retrained trial {self.from_trial} on the full split: val_acc {self.val_acc:.4f}, test_acc "
                f"{self.test_acc:.4f} after {self.epochs_run} epochs ({self.stop.value}); model {self.checkpoint}, "
                f"study artifact {self.artifact}")


def retrain(handle: StudyHandle, device: torch.device, out: Path, artifacts: Path,
            data: ImageData | None = None) -> RetrainResult:
    """Train the best trial's parameters on the full train split with the study's ``[retrain]``
    budget (epochs, early stopping, StepLR), evaluate once on test, save ``final.pt`` and upload it
    as a study artifact."""
    best = best_trial(handle)
    if best is None:
        raise StudyError(f"study {handle.cfg.study.name!r} has no completed trial to retrain yet; "
                         "finish some with `hpo run` first")
    budget = handle.cfg.retrain
    params = {**best.params, "data.train_on": "full", "train.epochs": budget.epochs, "train.patience": budget.patience,
              "train.step_size": budget.step_size, "train.gamma": budget.gamma}
    cfg = handle.cfg.with_params(params)
    data = data if data is not None else load_data(cfg.data.path)
    run = train_run(cfg, device, out, data, log=print)

    model = build_model(cfg.model, int(data.train_x[0].size), len(data.classes)).to(device)
    model.load_state_dict(load_checkpoint(run.checkpoint, device)["model"])
    test_loss, test_acc = evaluate(model, to_device(data.test_x, data.test_y, device))
    final = run.run_dir / "final.pt"
    save_checkpoint(final, {"model": model.state_dict(), "config": cfg.to_dict(), "classes": list(data.classes),
                            "val_acc": run.best_val_acc, "test_acc": test_acc, "from_trial": best.number})
    result = RetrainResult(best.number, best.params, run.best_val_acc, test_acc, test_loss, run.epochs_run,
                           run.best_epoch, run.stop, run.seconds, final, store_artifact(artifacts, final, handle.study))
    write_json(run.run_dir / "retrain.json", result.to_dict())
    handle.study.set_user_attr("hpo:retrain", {k: v for k, v in result.to_dict().items() if k != "params"})
    return result
