"""Population training: K members of one model shape train together, their weights, gradients and
optimizer state stacked on a leading member dimension, each with its own hyperparameters, batches
and stopping. No Optuna here, as in ``loop``: a study drives members through ``on_epoch``.

A member sees what a solo ``fit`` with its seed and parameters sees: initial weights from
``build_model`` after ``torch.manual_seed(seed)``, batches and augmentation draws from its own
generator. Members may differ in lr, batch size, weight decay, momentum, StepLR, patience, epochs,
dropout rate (the MLP's) and augmentation; another model shape or optimizer type needs another
population. Only a stack of Flatten, Linear, BatchNorm1d, ReLU and Dropout layers stacks
(:func:`hpo.engine.models.stackable`). A
step pads every member's batch to the largest with a row mask (a member's loss, gradients and batch
norm statistics come from its own rows); a member whose epoch has no batch left waits, untouched.
Dropout masks are drawn for every member at once from torch's global generator: a member with
dropout is its solo run in distribution, not bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.adam import adam
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd

from hpo.config.schema import ModelConfig, TrainConfig
from hpo.engine.augment import Augment
from hpo.engine.data import TrainVal, normalize
from hpo.engine.loop import EVAL_BATCH, EpochLog, LoopState
from hpo.engine.models import BN_EPS, BN_MOMENTUM, build_model, stackable
from hpo.engine.records import EpochStats, FitResult, Stop, TrainingDiverged

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which the solo loop uses


@dataclass(frozen=True)
class Member:
    """One member's training: its hyperparameters and how its batches are made."""

    train: TrainConfig
    augment: Augment
    dropout: float = 0.0  # after each ReLU, as the MLP's model.dropout: the one part of the model a member has its own


class _Slot(EpochLog):
    """A member's own progress: its epoch log, generator, batches of the running epoch, stopping."""

    def __init__(self, member: Member, device: torch.device):
        super().__init__()
        self.member, self.cfg = member, member.train
        self.generator = torch.Generator(device).manual_seed(member.train.seed)
        self.batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(())
        self.seen, self.samples, self.seconds, self.train_seconds = 0, 0, 0.0, 0.0
        self.stop: Stop | None = None
        self.error: TrainingDiverged | None = None
        self.resumed_from = 0  # the epochs it had run before it was admitted

    def lr(self) -> float:
        """StepLR's lr for the epoch about to run, multiplied out as StepLR does."""
        lr = self.cfg.lr
        for epoch in range(1, len(self.history) + 1):
            lr *= self.cfg.gamma if self.cfg.step_size and epoch % self.cfg.step_size == 0 else 1.0
        return lr


class Population:
    """K members in stacked tensors. ``params`` and ``buffers`` hold a solo model's names (``fc1.weight``,
    ``bn1.running_mean``...) with a leading member dimension, so a member's slice is a solo state dict."""

    def __init__(self, model: ModelConfig, optimizer: str, members: Sequence[Member], data: TrainVal,
                 num_classes: int = 10):
        self.model_cfg, self.optimizer, self.data, self.num_classes = model, optimizer, data, num_classes
        self.label_smoothing = members[0].train.label_smoothing  # shared, as the optimizer (hpo.workers.members.SHARED)
        device, k = data.train.x.device, len(members)
        template = self._solo()  # names and shapes; admit() fills each member's slice
        stackable(template)
        self.layers = list(template.named_children())
        self.params = {n: torch.zeros(k, *p.shape, device=device, requires_grad=True)
                       for n, p in template.named_parameters()}
        self.buffers = {n: torch.zeros(k, *b.shape, dtype=b.dtype, device=device) for n, b in template.named_buffers()}
        self.moments = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in self.params.items()}
        self.steps = torch.zeros(k, len(self.params), device=device)  # Adam's step count, per parameter
        self.slots: list[_Slot] = [None] * k  # type: ignore[list-item]  (admit() fills each)
        self.dropout = torch.zeros(k, 1, 1, device=device)  # each member's rate
        self.dropping = False  # whether a running member has dropout: the others need no mask
        for i, member in enumerate(members):
            self.admit(i, member)

    def _solo(self, member: Member | None = None) -> nn.Module:
        """A member's solo model, initialized as ``train_run`` does for its seed (without a member: the
        template, with no dropout layers of the MLP's); the global RNG is left as it was."""
        cfg = self.model_cfg
        if cfg.family == "mlp":
            cfg = ModelConfig("mlp", {**cfg.kwargs, "dropout": member.dropout if member else 0.0})
        with torch.random.fork_rng(devices=[]):
            if member is not None:
                torch.manual_seed(member.train.seed)
            model = build_model(cfg, self.data.train.x.shape[1:], self.num_classes)
        return model.to(self.data.train.x.device)

    @torch.no_grad()
    def admit(self, k: int, member: Member, last: dict | None = None, best: dict | None = None) -> None:
        """Put ``member`` in slot ``k`` (a freed one, at an epoch boundary) with its solo run's initial
        weights, or going on from a run that was cut: the contents of its ``last.pt`` and ``best.pt``."""
        model, slot = self._solo(member), _Slot(member, self.data.train.x.device)
        state = LoopState(model, member.train, graphs=False)
        if last is not None and best is not None:
            model.load_state_dict(last["model"])
            state.load_state_dict(last)
            slot.generator.set_state(state.generator.get_state())
            slot.load_state_dict(last)
            slot.best_weights, slot.resumed_from = best["model"], len(slot.history)
            slot.stop = slot.stopping(member.train)  # a run that had ended before it was cut
        for name, value in model.state_dict().items():
            (self.params | self.buffers)[name][k] = value
        for j, (name, p) in enumerate(zip(self.params, model.parameters(), strict=True)):  # torch's optimizer state
            held = state.optimizer.state.get(p, {})
            self.moments[name][0][k] = held.get("exp_avg", held.get("momentum_buffer", 0.0))
            self.moments[name][1][k] = held.get("exp_avg_sq", 0.0)
            self.steps[k, j] = held.get("step", 0.0)
        self.dropout[k] = member.dropout
        self.slots[k] = slot

    def checkpoint(self, k: int) -> tuple[dict, dict]:
        """Member ``k``'s run as a solo run's ``last.pt`` and ``best.pt`` hold it: it goes on from
        them alone (hpo.engine.checkpoints.Checkpoints) or in any population (:meth:`admit`)."""
        slot = self.slots[k]
        model = self._solo(slot.member)
        model.load_state_dict(self.member_state(k))
        state = LoopState(model, slot.cfg, graphs=False)
        for j, (name, p) in enumerate(zip(self.params, model.parameters(), strict=True)):
            m, v = (t[k].detach().clone() for t in self.moments[name])
            if slot.history:  # an optimizer that has stepped
                state.optimizer.state[p] = {"step": self.steps[k, j].clone(), "exp_avg": m, "exp_avg_sq": v} \
                    if self.optimizer != "sgd" else {"momentum_buffer": m}
        if state.scheduler:
            for group in state.optimizer.param_groups:
                group["lr"] = slot.lr()
            state.scheduler.last_epoch, state.scheduler._last_lr = len(slot.history), [slot.lr()]
        state.generator.set_state(slot.generator.get_state())
        best = {"model": slot.best_weights, "epoch": slot.best_epoch, "val_acc": slot.best_val_acc}
        return {"model": model.state_dict(), **state.state_dict(), **slot.state_dict()}, best

    def vacate(self, slots: Iterable[int]) -> None:
        """Leave ``slots`` empty until :meth:`admit` fills them: they train no more."""
        for k in slots:
            self.slots[k].stop = Stop.COMPLETED

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        """Member ``k``'s weights as its solo model's ``state_dict``."""
        return {name: t[k] for name, t in (self.params | self.buffers).items()}

    # -- the stacked network: x [K, B, features] (flattened already), mask [K, B] (1 for a member's own rows)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, dropout: bool) -> torch.Tensor:
        for i, layer in self.layers:
            if isinstance(layer, nn.Linear):
                x = torch.baddbmm(self.params[f"{i}.bias"].unsqueeze(1), x, self.params[f"{i}.weight"].transpose(1, 2))
            elif isinstance(layer, nn.BatchNorm1d):
                x = self._batch_norm(i, x, mask)
            elif isinstance(layer, nn.ReLU):
                x = x.relu()
                if dropout:  # each member's own rate: p = 0 keeps every unit, scaled by 1
                    x = x * (torch.rand_like(x) >= self.dropout) / (1 - self.dropout)
            elif isinstance(layer, nn.Dropout) and mask is not None:  # a user's, at its own rate for all
                x = F.dropout(x, layer.p)
        return x

    def _batch_norm(self, i: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Per member: in training (``mask`` given) the statistics of its own rows, and its running
        statistics updated as BatchNorm1d does; in evaluation its running statistics."""
        mean, var = self.buffers[f"{i}.running_mean"], self.buffers[f"{i}.running_var"]
        if mask is not None:
            n = mask.sum(1, keepdim=True)  # [K, 1]
            rows = mask.unsqueeze(2)
            batch_mean = (x * rows).sum(1) / n.clamp(min=1)
            batch_var = (((x - batch_mean.unsqueeze(1)) * rows) ** 2).sum(1) / n.clamp(min=1)
            with torch.no_grad():
                live = n > 0
                mean.copy_(torch.where(live, mean.lerp(batch_mean, BN_MOMENTUM), mean))
                unbiased = batch_var * n / (n - 1).clamp(min=1)
                var.copy_(torch.where(live, var.lerp(unbiased, BN_MOMENTUM), var))
                self.buffers[f"{i}.num_batches_tracked"] += live.squeeze(1).long()
            mean, var = batch_mean, batch_var
        x = (x - mean.unsqueeze(1)) * torch.rsqrt(var.unsqueeze(1) + BN_EPS)
        return x * self.params[f"{i}.weight"].unsqueeze(1) + self.params[f"{i}.bias"].unsqueeze(1)

    # -- one optimizer step for the members that had a batch (``live``); the others stay as they were

    @torch.no_grad()
    def _update(self, lrs: list[float], live: list[bool]) -> None:
        """torch's own fused optimizer over each live member's slices: the solo run's arithmetic, bit
        for bit. That matters: Adam divides by tiny second moments, and grows any rounding apart into
        another run within a few steps."""
        names = list(self.params)
        for k in (k for k, on in enumerate(live) if on):
            cfg = self.slots[k].cfg
            params, grads = [self.params[n][k] for n in names], [self.params[n].grad[k] for n in names]
            first, second = ([self.moments[n][i][k] for n in names] for i in (0, 1))
            if self.optimizer != "sgd":
                step = adamw if self.optimizer == "adamw" else adam
                step(params, grads, first, second, [], list(self.steps[k]), fused=True, amsgrad=False,
                     beta1=ADAM_BETAS[0], beta2=ADAM_BETAS[1], lr=lrs[k], weight_decay=cfg.weight_decay, eps=ADAM_EPS,
                     maximize=False)
            else:  # a zero buffer's first step is the gradient itself, as SGD's first step is
                sgd(params, grads, first, fused=True, weight_decay=cfg.weight_decay, momentum=cfg.momentum, lr=lrs[k],
                    dampening=0.0, nesterov=False, maximize=False)
        for p in self.params.values():
            p.grad = None

    def _step(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, lrs: list[float], sums: torch.Tensor,
              live: list[bool]) -> None:
        logits = self.forward(x, mask, dropout=self.dropping)
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none",
                                 label_smoothing=self.label_smoothing).view_as(mask) * mask
        n = mask.sum(1)
        (losses.sum(1) / n.clamp(min=1)).sum().backward()  # each member's mean: its solo gradient
        self._update(lrs, live)
        sums[:, 0] += losses.detach().sum(1)
        sums[:, 1] += ((logits.argmax(2) == y) * mask).sum(1)

    def _evaluate(self, sums: torch.Tensor) -> None:
        """Summed val loss and correct count of every member, in chunks that bound memory."""
        val = self.data.val
        with torch.no_grad():
            for xb, yb in zip(val.x.split(EVAL_BATCH), val.y.split(EVAL_BATCH), strict=True):
                x = normalize(xb).flatten(1).expand(len(self.slots), -1, -1)
                logits = self.forward(x, None, dropout=False)
                sums[:, 2] += F.cross_entropy(logits.flatten(0, 1), yb.repeat(len(self.slots)),
                                              reduction="none").view(len(self.slots), -1).sum(1)
                sums[:, 3] += (logits.argmax(2) == yb).sum(1)

    def epoch(self, on_epoch: Callable[[int, EpochStats], bool] | None = None) -> None:
        """One epoch of every running member: its batches, then validation, stopping, a log line."""
        # -- train: each step takes every running member's next batch, padded to the largest
        t0, device, k = time.perf_counter(), self.data.train.x.device, len(self.slots)
        running = [s.stop is None for s in self.slots]
        for slot, run in zip(self.slots, running, strict=True):
            slot.seen = 0
            if run:
                slot.batches = slot.member.augment.batches(self.data.train, slot.cfg.batch_size, slot.generator)
        lrs = [s.lr() for s in self.slots]
        self.dropping = any(s.member.dropout > 0 for s, run in zip(self.slots, running, strict=True) if run)
        sums = torch.zeros(k, 4, device=device)
        while True:
            batches = [next(s.batches, None) if run else None for s, run in zip(self.slots, running, strict=True)]
            if all(b is None for b in batches):
                break
            width = max(len(b[1]) for b in batches if b is not None)
            x = torch.zeros(k, width, self.data.train.x[0].numel(), device=device)  # each member's rows, flat
            y = torch.zeros(k, width, dtype=torch.long, device=device)
            mask = torch.zeros(k, width, device=device)
            for i, b in enumerate(batches):
                if b is not None:
                    x[i, :len(b[1])], y[i, :len(b[1])], mask[i, :len(b[1])] = b[0].flatten(1), b[1], 1.0
                    self.slots[i].seen += len(b[1])
            self._step(x, y, mask, lrs, sums, [b is not None for b in batches])
        t_train = time.perf_counter() - t0

        # -- validate, once for all members; the epoch's one sync
        self._evaluate(sums)
        seconds = time.perf_counter() - t0
        for i, (slot, row) in enumerate(zip(self.slots, sums.tolist(), strict=True)):
            if not running[i]:
                continue
            loss_sum, correct, val_loss_sum, val_correct = row
            stats = EpochStats(len(slot.history) + 1, loss_sum / slot.seen, correct / slot.seen,
                               val_loss_sum / len(self.data.val), val_correct / len(self.data.val), lrs[i], seconds)
            slot.seconds, slot.train_seconds, slot.samples = slot.seconds + seconds, slot.train_seconds + t_train, \
                slot.samples + slot.seen
            # -- stopping, member by member: divergence fails this member alone
            if not math.isfinite(stats.loss):  # it stops; result() gives its error
                slot.stop, slot.error = Stop.COMPLETED, TrainingDiverged.at(stats)
                continue
            slot.record(stats, lambda i=i: self.member_state(i))
            slot.stop = slot.stopping(slot.cfg, requested=bool(on_epoch and on_epoch(i, stats)))

    def result(self, k: int) -> FitResult | TrainingDiverged:
        """Member ``k``'s result, as a solo ``fit`` returns it, or the error it diverged with."""
        slot = self.slots[k]
        if slot.error is not None:
            return slot.error
        return slot.result(slot.stop or Stop.COMPLETED, slot.seconds,
                           slot.samples / slot.train_seconds if slot.train_seconds else 0.0, slot.resumed_from)


def fit_population(model: ModelConfig, optimizer: str, members: Sequence[Member], data: TrainVal, num_classes: int = 10,
                   on_epoch: Callable[[int, EpochStats], bool] | None = None) -> list[FitResult | TrainingDiverged]:
    """Train ``members`` together until each has stopped; their results in order. ``on_epoch(k,
    stats)`` sees member k's epochs and returns True to stop it (its pruner)."""
    population = Population(model, optimizer, members, data, num_classes)
    while any(s.stop is None for s in population.slots):
        population.epoch(on_epoch)
    return [population.result(k) for k in range(len(members))]
