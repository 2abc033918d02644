"""The optimizer and the lr schedules of hpo.engine.optim, and how fit steps them."""

import dataclasses

import pytest
import torch
from torch import nn

from hpo.config.schema import DataConfig, ModelConfig, TrainConfig
from hpo.engine.augment import make_augment
from hpo.engine.checkpoints import Checkpoints
from hpo.engine.data import training_splits
from hpo.engine.loop import fit
from hpo.engine.models import build_model
from hpo.engine.optim import PerBatchLR, make_optimizer, make_scheduler
from hpo.engine.sources import synthetic

CPU = torch.device("cpu")


def lrs(schedule: str, steps: int, warmup: float = 0.2, tensor: bool = False) -> list[float]:
    model = nn.Linear(2, 2)
    cfg = TrainConfig(optimizer="sgd", lr=0.1, schedule=schedule, warmup=warmup)
    optimizer = make_optimizer(model, cfg, graphs=tensor)
    scheduler = make_scheduler(optimizer, cfg, batches=steps // cfg.epochs)
    out = []
    for _ in range(steps):
        out.append(float(optimizer.param_groups[0]["lr"]))
        scheduler.step()
    return out


def test_one_cycle_rises_over_its_warmup_then_falls_linearly_to_zero():
    seen = lrs("one-cycle", 100)  # 10 epochs of 10 batches; warmup 0.2: 20 rising
    assert seen[0] == pytest.approx(0.1 / 20) and seen[19] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(seen[:20], seen[1:20], strict=False))
    assert all(a > b for a, b in zip(seen[20:], seen[21:], strict=False)) and seen[-1] == pytest.approx(0.1 / 80)


def test_linear_falls_from_lr_to_zero_and_a_tensor_lr_is_filled_in_place():
    seen = lrs("linear", 50, tensor=True)
    assert seen[0] == pytest.approx(0.1) and seen[25] == pytest.approx(0.05) and seen[-1] == pytest.approx(0.002)


def test_step_is_steplr_and_constant_without_a_step_size():
    opt = make_optimizer(nn.Linear(2, 2), TrainConfig())
    assert make_scheduler(opt, TrainConfig(), 10) is None
    assert isinstance(make_scheduler(opt, TrainConfig(step_size=3), 10), torch.optim.lr_scheduler.StepLR)


def test_nesterov_is_sgd_s():
    opt = make_optimizer(nn.Linear(2, 2), TrainConfig(optimizer="sgd", nesterov=True))
    assert opt.param_groups[0]["nesterov"] is True
    assert make_optimizer(nn.Linear(2, 2), TrainConfig(optimizer="sgd", momentum=0.0, nesterov=True)) \
        .param_groups[0]["nesterov"] is False  # torch refuses Nesterov without momentum


@pytest.fixture(scope="module")
def splits():
    return training_splits(synthetic(), DataConfig(train_size=600, val_size=200, subset_size=300), CPU)


def go(splits, folder, on_epoch=None, **train):
    torch.manual_seed(0)
    model = build_model(ModelConfig.mlp(batch_norm=True))
    cfg = TrainConfig(optimizer="sgd", nesterov=True, lr=0.05, epochs=6, batch_size=64, schedule="one-cycle", **train)
    return fit(model, splits, cfg, make_augment("flip-shift"), on_epoch, Checkpoints(folder, 0.0))


def test_a_one_cycle_run_cut_short_resumes_on_its_schedule(splits, tmp_path):
    """The per-batch step count is in last.pt: a resumed run is the unbroken run, lr for lr."""
    whole = go(splits, tmp_path / "whole")
    go(splits, tmp_path / "broken", on_epoch=lambda s: s.epoch == 3)
    resumed = go(splits, tmp_path / "broken")
    strip = lambda r: [dataclasses.replace(s, seconds=0) for s in r.history]  # noqa: E731
    assert resumed.resumed_from_epoch == 3 and strip(resumed) == strip(whole)
    first, second, last = (whole.history[i].lr for i in (0, 1, -1))
    assert second > max(first, last)  # risen over the warmup, fallen since
    assert whole.best_val_acc > 0.8  # synthetic classes are easy


def test_a_per_batch_schedule_holds_its_state():
    opt = make_optimizer(nn.Linear(2, 2), TrainConfig(optimizer="sgd"))
    a = PerBatchLR(opt, TrainConfig(schedule="linear", epochs=1), steps=10)
    for _ in range(4):
        a.step()
    b = PerBatchLR(opt, TrainConfig(schedule="linear", epochs=1), steps=10)
    b.load_state_dict(a.state_dict())
    assert b.t == 4 and opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.6)
