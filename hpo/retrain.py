"""The recipe's last step: the best trial's hyperparameters trained on the full split, then one
evaluation on the test split. The final model is saved with its config and stored in the study."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hpo.data import ImageData, load_data, to_device
from hpo.files import store_artifact
from hpo.models import build_model
from hpo.runs import train_run, write_json
from hpo.study import StudyError, StudyHandle, best_trial
from hpo.train import evaluate, load_checkpoint, save_checkpoint


def retrain(handle: StudyHandle, device: torch.device, out: Path, artifacts: Path, epochs: int | None = None,
            data: ImageData | None = None) -> dict[str, Any]:
    """Train the best trial's parameters on the full train split (the study's scheduler and early
    stopping), evaluate once on test, save ``final.pt`` and upload it as a study artifact."""
    best = best_trial(handle)
    if best is None:
        raise StudyError(f"study {handle.cfg.study.name!r} has no completed trial to retrain yet; "
                         "finish some with `hpo run` first")
    params = {**best.params, "data.train_on": "full", **({"train.epochs": epochs} if epochs else {})}
    cfg = handle.cfg.with_params(params)
    data = data if data is not None else load_data(cfg.data.path)
    summary = train_run(cfg, device, out, data, log=print)
    run_dir = Path(summary["run_dir"])

    model = build_model(cfg.model, int(data.train_x[0].size), len(data.classes)).to(device)
    model.load_state_dict(load_checkpoint(Path(summary["checkpoint"]), device)["model"])
    test_loss, test_acc = evaluate(model, to_device(data.test_x, data.test_y, device))
    final = run_dir / "final.pt"
    save_checkpoint(final, {"model": model.state_dict(), "config": cfg.to_dict(), "classes": list(data.classes),
                            "val_acc": summary["best_val_acc"], "test_acc": test_acc, "from_trial": best.number})
    artifact = store_artifact(artifacts, final, handle.study)
    result = {"from_trial": best.number, "params": best.params, "val_acc": summary["best_val_acc"],
              "test_acc": test_acc, "test_loss": test_loss, "epochs_run": summary["epochs_run"],
              "best_epoch": summary["best_epoch"], "stop_reason": summary["stop_reason"],
              "seconds": summary["seconds"], "checkpoint": str(final), "artifact": artifact}
    write_json(run_dir / "retrain.json", result)
    handle.study.set_user_attr("hpo:retrain", {k: v for k, v in result.items() if k != "params"})
    return result

