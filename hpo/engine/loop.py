"""The recipe's ``fit``, made fast: batches indexed on the device, metrics accumulated there,
one host sync per epoch. No Optuna here: the study plugs in through ``on_epoch``; no files either:
a run's checkpoints are the business of the policy it is handed (hpo.engine.checkpoints).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from hpo.config.schema import TrainConfig
from hpo.engine.augment import Augment
from hpo.engine.data import DeviceSplit, TrainVal, normalize
from hpo.engine.models import has_convs
from hpo.engine.optim import PerBatchLR, make_optimizer, make_scheduler
from hpo.engine.records import EpochStats, FitResult, Stop, TrainingDiverged

EVAL_BATCH = 1000  # the recipe's val batch size; only bounds memory


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matmuls and convolutions in hardware, as ``precision = "auto"`` asks."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Forward:
    """The model's forward pass as ``train.precision`` runs it on ``device``: under bf16 autocast or in fp32, conv
    nets on images channels_last (2x faster on CPU for a CNN; nothing changes for an MLP).
    Logits come out fp32, so the loss and the metrics are summed in fp32 either way."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, images: bool, device: torch.device):
        self.model = model
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and native_bf16(device))
        self.layout = torch.channels_last if images and has_convs(model) else torch.contiguous_format
        model.to(memory_format=self.layout)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # No weight cache: a CUDA graph captures the casts, which must run at each replay.
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            return self.model(x.contiguous(memory_format=self.layout)).float()


class TrainStep:
    """One optimizer step on a batch, adding its summed loss and correct count to ``sums``.

    At the recipe's batch sizes the step's ~44 small kernels run in less time than launching them
    takes (bs 32 on an H200: 0.17 ms of GPU work, 1.35 ms eager). With ``graphs`` (CUDA only) the
    step is captured once as a CUDA graph and then replayed: one launch a batch. The first steps
    run eagerly on a side stream, as capture requires (they create the optimizer state); batches
    of another size, an epoch's last, run eagerly too.
    """

    WARMUP = 3

    def __init__(self, forward: Forward, optimizer: torch.optim.Optimizer, sums: torch.Tensor, batch_size: int,
                 graphs: bool, label_smoothing: float = 0.0):
        self.forward, self.optimizer, self.sums, self.batch_size = forward, optimizer, sums, batch_size
        # sums: per-sample means come out exact
        self.criterion = nn.CrossEntropyLoss(reduction="sum", label_smoothing=label_smoothing)
        self.warmup = self.WARMUP if graphs else None  # None: never capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, torch.Tensor] = ()

    def eager(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.forward(x)
        loss = self.criterion(logits, y)
        (loss / len(y)).backward()
        self.optimizer.step()
        self.sums[0] += loss.detach()
        self.sums[1] += (logits.argmax(1) == y).sum()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.graph is not None and len(x) == self.batch_size:
            self.static[0].copy_(x)
            self.static[1].copy_(y)
            self.graph.replay()
        elif self.warmup is None or len(x) != self.batch_size:
            self.eager(x, y)
        elif self.warmup > 0:
            self.warmup -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.eager(x, y)
            torch.cuda.current_stream().wait_stream(side)
        else:
            self.static, graph = (x.clone(), y.clone()), torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)  # grads are then allocated inside the graph
            with torch.cuda.graph(graph):
                self.eager(*self.static)
            self.graph = graph
            graph.replay()  # capture records the step without running it


def _eval_sums(model: nn.Module, split: DeviceSplit, criterion: nn.Module,
               forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Summed loss and correct count over ``split`` in eval mode (through ``forward``, else in fp32),
    in chunks that bound memory."""
    model.eval()
    forward = forward or model
    sums = torch.zeros(2, device=split.x.device)
    with torch.no_grad():
        for x, y in zip(split.x.split(EVAL_BATCH), split.y.split(EVAL_BATCH), strict=True):
            logits = forward(normalize(x))
            sums[0] += criterion(logits, y)
            sums[1] += (logits.argmax(1) == y).sum()
    return sums


def evaluate(model: nn.Module, split: DeviceSplit) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on ``split``."""
    loss_sum, correct = _eval_sums(model, split, nn.CrossEntropyLoss(reduction="sum")).tolist()
    return loss_sum / len(split), correct / len(split)


class EpochLog:
    """A run's epochs so far: the history, the best epoch (its val_acc, and its weights as a copy on
    the device: the recipe's ``ckpt.pt``) and the epochs since it."""

    def __init__(self) -> None:
        self.history: list[EpochStats] = []
        self.best_epoch, self.best_val_acc, self.since_best = 0, 0.0, 0
        self.best_weights: dict[str, torch.Tensor] = {}

    def record(self, stats: EpochStats, weights: Callable[[], dict[str, torch.Tensor]]) -> None:
        """An epoch's stats; ``weights`` gives the model's, copied when the epoch is the best so far."""
        self.history.append(stats)
        if stats.val_acc > self.best_val_acc or self.best_epoch == 0:
            self.best_val_acc, self.best_epoch, self.since_best = stats.val_acc, stats.epoch, 0
            self.best_weights = {k: v.detach().clone() for k, v in weights().items()}
        else:
            self.since_best += 1

    def out_of_patience(self, patience: int) -> bool:
        """Early stopping: ``patience`` epochs without a better val_acc (0: never)."""
        return bool(patience) and self.since_best >= patience

    def stopping(self, cfg: TrainConfig, requested: bool = False) -> Stop | None:
        """Why the run stops after its last recorded epoch, if it does: ``on_epoch`` asked, early
        stopping, or its last epoch."""
        if requested:
            return Stop.REQUESTED
        if self.out_of_patience(cfg.patience):
            return Stop.EARLY_STOPPING
        return Stop.COMPLETED if len(self.history) >= cfg.epochs else None

    def result(self, stop: Stop, seconds: float, train_samples_per_s: float, resumed: int) -> FitResult:
        return FitResult(tuple(self.history), self.best_epoch, self.best_val_acc, stop, seconds, train_samples_per_s,
                         resumed)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dataclasses.asdict(s) for s in self.history], "best_epoch": self.best_epoch,
                "best_val_acc": self.best_val_acc, "since_best": self.since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [EpochStats(**h) for h in state["history"]]
        self.best_epoch, self.best_val_acc, self.since_best = state["best_epoch"], state["best_val_acc"], \
            state["since_best"]


class LoopState(EpochLog):
    """Everything of a run except the model's weights that it needs to go on exactly where it
    stopped: the epoch log, the optimizer, the scheduler and the generator that shuffles and
    augments. Like torch's stateful objects it owns ``state_dict`` and ``load_state_dict``."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, graphs: bool, batches: int = 1):
        super().__init__()
        device = next(model.parameters()).device
        self.optimizer = make_optimizer(model, cfg, graphs)
        self.scheduler = make_scheduler(self.optimizer, cfg, batches)
        self.per_batch = isinstance(self.scheduler, PerBatchLR)  # else StepLR steps each epoch, as the recipe's
        self.generator = torch.Generator(device).manual_seed(cfg.seed)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "generator": self.generator.get_state(), **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"].cpu())  # a generator's state is a CPU tensor, even a CUDA one's
        super().load_state_dict(state)


class Checkpoints(Protocol):
    """Where and when a run's state is saved, and where it goes on from (see hpo.engine.checkpoints.Checkpoints)."""

    def resume(self, model: nn.Module, state: LoopState) -> None:
        """Load a saved state into ``model`` and ``state``, if there is one."""

    def save(self, model: nn.Module, state: LoopState, final: bool) -> None:
        """Save them if it is time to (always when ``final``)."""


def fit(model: nn.Module, data: TrainVal, cfg: TrainConfig, augment: Augment,
        on_epoch: Callable[[EpochStats], bool] | None = None, checkpoints: Checkpoints | None = None,
        cuda_graphs: bool = True) -> FitResult:
    """Train ``model`` as the recipe's ``fit`` does; return the history with the best weights loaded.

    ``augment`` turns the train split into batches (see hpo.engine.augment). ``on_epoch`` sees each
    epoch's stats and returns True to stop (pruning). ``checkpoints``, when given, saves the state
    and resumes a run that was cut short. On CUDA each training step is a replayed CUDA graph (see
    TrainStep) unless ``cuda_graphs`` is False.
    """
    # -- setup: everything lives on the training device
    device = data.train.x.device
    graphs = cuda_graphs and device.type == "cuda"
    forward = Forward(model, cfg, data.train.x.dim() == 4, device)
    state = LoopState(model, cfg, graphs, batches=math.ceil(len(data.train) / cfg.batch_size))
    sums = torch.zeros(4, device=device)  # loss, correct, val loss, val correct; one tensor the graph adds to
    step = TrainStep(forward, state.optimizer, sums, cfg.batch_size, graphs, cfg.label_smoothing)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if checkpoints:
        checkpoints.resume(model, state)
    resumed = epoch = len(state.history)
    stop = state.stopping(cfg)  # a run that had ended before it was cut
    seconds, train_seconds, train_samples = 0.0, 0.0, 0

    while stop is None and epoch < cfg.epochs:
        epoch += 1
        # -- train: metrics stay on the device, no .item() per batch
        t0 = time.perf_counter()
        lr = float(state.optimizer.param_groups[0]["lr"])
        model.train()
        sums.zero_()
        seen = 0
        for x, y in augment.batches(data.train, cfg.batch_size, state.generator):
            step(x, y)
            seen += len(y)
            if state.per_batch:  # on the host: a graph reads the lr tensor that this fills
                state.scheduler.step()
        sync()
        t_train = time.perf_counter() - t0

        # -- validate
        sums[2:] = _eval_sums(model, data.val, nn.CrossEntropyLoss(reduction="sum"), forward)  # unsmoothed
        loss_sum, correct, val_loss_sum, val_correct = sums.tolist()  # the epoch's one sync
        stats = EpochStats(epoch, loss_sum / seen, correct / seen, val_loss_sum / len(data.val),
                           val_correct / len(data.val), lr, time.perf_counter() - t0)
        seconds, train_seconds, train_samples = seconds + stats.seconds, train_seconds + t_train, train_samples + seen
        if not math.isfinite(stats.loss):
            raise TrainingDiverged.at(stats)

        # -- the recipe's best-epoch checkpoint, its StepLR and early stopping
        state.record(stats, model.state_dict)
        if state.scheduler and not state.per_batch:
            state.scheduler.step()
        stop = state.stopping(cfg, requested=bool(on_epoch and on_epoch(stats)))
        if checkpoints:
            checkpoints.save(model, state, final=stop is not None or epoch == cfg.epochs)

    # -- end: the best epoch's weights, as the recipe reloads its ckpt.pt
    model.load_state_dict(state.best_weights)
    return state.result(stop or Stop.COMPLETED, seconds, train_samples / train_seconds if train_seconds else 0.0,
                        resumed)
