"""The recipe's optimizer and its lr over a run: StepLR each epoch (the recipe's), or one-cycle and
linear decay each batch (airbench's). Both schedulers own ``state_dict``, as torch's stateful objects do."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hpo.config.schema import TrainConfig


def make_optimizer(model: nn.Module, cfg: TrainConfig, graphs: bool = False) -> torch.optim.Optimizer:
    """The recipe's optimizer, fused: one kernel over all parameters (CPU and CUDA alike).

    For CUDA graphs the step must be capturable and the lr a device tensor, which the schedulers then
    update in place: a float lr would be frozen into the captured kernel.
    """
    device = next(model.parameters()).device
    lr = torch.tensor(cfg.lr, device=device) if graphs else cfg.lr
    if cfg.optimizer == "sgd":  # SGD keeps no step count on the host: capturable as it is
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0, fused=True)
    adam = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, fused=True, capturable=graphs)


class PerBatchLR:
    """The per-batch schedules, one-cycle and linear: before batch ``t`` of a run of ``steps`` batches
    the lr is ``lr x factor(t)``. It fills a tensor lr (CUDA graphs) in place with a host float: a
    kernel launch, no host sync, where torch's LambdaLR would read its tensor base lr back each batch."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int):
        self.optimizer, self.lr, self.steps, self.t = optimizer, cfg.lr, steps, 0
        self.rise = max(1, round(cfg.warmup * steps)) if cfg.schedule == "one-cycle" else 0
        self._set()

    def factor(self, t: int) -> float:
        """Rising linearly to 1 over the first ``rise`` batches, then falling linearly to 0 at the end."""
        if t < self.rise:
            return (t + 1) / self.rise
        return max(0.0, (self.steps - t) / max(1, self.steps - self.rise))

    def _set(self) -> None:
        lr = self.lr * self.factor(self.t)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def step(self) -> None:
        self.t += 1
        self._set()

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = state["t"]
        self._set()


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                   batches: int) -> torch.optim.lr_scheduler.StepLR | PerBatchLR | None:
    """``train.schedule`` for a run of ``cfg.epochs`` x ``batches`` batches; None for a constant lr."""
    if cfg.schedule != "step":
        return PerBatchLR(optimizer, cfg, cfg.epochs * batches)
    return torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma) if cfg.step_size else None
