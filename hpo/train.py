"""The recipe's ``fit``, made fast: batches indexed on the device, metrics accumulated there,
one host sync per epoch. No Optuna here: the study plugs in through ``on_epoch``.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hpo.config import TrainConfig
from hpo.data import DeviceSplit, normalize
from hpo.files import atomic_write

EVAL_BATCH = 1000  # the recipe's val batch size; only bounds memory


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class EpochStats:
    """One row of the recipe's per-epoch log."""

    epoch: int
    loss: float
    acc: float
    val_loss: float
    val_acc: float
    lr: float
    seconds: float


@dataclass
class FitResult:
    """What ``fit`` returns; the model holds the best epoch's weights."""

    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0
    best_val_acc: float = 0.0
    stop_reason: str = "completed"  # "completed", "early_stopping" or what on_epoch returned
    seconds: float = 0.0  # training and validation epochs, data loading excluded
    train_samples_per_s: float = 0.0
    checkpoint: str = ""
    resumed_from_epoch: int = 0  # > 0 when the run went on from a saved state

    @property
    def epochs_run(self) -> int:
        return len(self.history)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else must exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: unknown device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: unsupported device type; use auto, cpu, cuda or cuda:N")
    return device


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic. Serialized in memory first: torch's own file writer reports a full disk as a bare
    RuntimeError, a plain write as the OSError that WriteError names."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    return torch.load(path, map_location=device, weights_only=True)


def make_optimizer(model: nn.Module, cfg: TrainConfig, graphs: bool = False) -> torch.optim.Optimizer:
    """The recipe's optimizer, fused: one kernel over all parameters (CPU and CUDA alike).

    For CUDA graphs the step must be capturable and the lr a device tensor, which StepLR then
    updates in place: a float lr would be frozen into the captured kernel.
    """
    device = next(model.parameters()).device
    lr = torch.tensor(cfg.lr, device=device) if graphs else cfg.lr
    if cfg.optimizer == "sgd":  # SGD keeps no step count on the host: capturable as it is
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, fused=True,
                            capturable=graphs)


class TrainStep:
    """One optimizer step on a batch, adding its summed loss and correct count to ``sums``.

    At the recipe's batch sizes the step's ~44 small kernels run in less time than launching them
    takes (bs 32 on an H200: 0.17 ms of GPU work, 1.35 ms eager). With ``graphs`` (CUDA only) the
    step is captured once as a CUDA graph and then replayed: one launch a batch. The first steps
    run eagerly on a side stream, as capture requires (they create the optimizer state); batches
    of another size, an epoch's last, run eagerly too.
    """

    WARMUP = 3

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, sums: torch.Tensor, batch_size: int,
                 graphs: bool):
        self.model, self.optimizer, self.sums, self.batch_size = model, optimizer, sums, batch_size
        self.criterion = nn.CrossEntropyLoss(reduction="sum")  # sums: per-sample means come out exact
        self.warmup = self.WARMUP if graphs else None  # None: never capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, torch.Tensor] = ()

    def eager(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(x)
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


def _eval_sums(model: nn.Module, split: DeviceSplit, criterion: nn.Module) -> torch.Tensor:
    """Summed loss and correct count over ``split`` in eval mode, in chunks that bound memory."""
    model.eval()
    sums = torch.zeros(2, device=split.x.device)
    with torch.no_grad():
        for x, y in zip(split.x.split(EVAL_BATCH), split.y.split(EVAL_BATCH), strict=True):
            logits = model(normalize(x))
            sums[0] += criterion(logits, y)
            sums[1] += (logits.argmax(1) == y).sum()
    return sums


def evaluate(model: nn.Module, split: DeviceSplit) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on ``split``."""
    loss_sum, correct = _eval_sums(model, split, nn.CrossEntropyLoss(reduction="sum")).tolist()
    return loss_sum / len(split), correct / len(split)


def _snapshot(model: nn.Module, optimizer, scheduler, gen: torch.Generator, result: FitResult,
              since_best: int) -> dict:
    """Everything a killed run needs to go on exactly where it stopped."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler else None, "generator": gen.get_state(),
            "history": [dataclasses.asdict(s) for s in result.history], "best_epoch": result.best_epoch,
            "best_val_acc": result.best_val_acc, "since_best": since_best}


def _restore(state: dict, model: nn.Module, optimizer, scheduler, gen: torch.Generator, result: FitResult) -> int:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler:
        scheduler.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"].cpu())  # a generator's state is a CPU tensor, even a CUDA one's
    result.history = [EpochStats(**h) for h in state["history"]]
    result.best_epoch, result.best_val_acc = state["best_epoch"], state["best_val_acc"]
    return state["since_best"]


def fit(model: nn.Module, train: DeviceSplit, val: DeviceSplit, cfg: TrainConfig, augment, checkpoint: Path,
        on_epoch: Callable[[EpochStats], str | None] | None = None,
        log: Callable[[str], None] | None = None, resumable: bool = False, cuda_graphs: bool = True,
        save_every: float = 0.0) -> FitResult:
    """Train ``model`` as the recipe's ``fit`` does; return the history with the best weights loaded.

    ``augment`` turns the train split into batches (see hpo.augment). ``on_epoch`` sees each
    epoch's stats and may return a reason to stop (pruning). The best epoch is saved to
    ``checkpoint`` and loaded at the end, as the recipe does with its ``ckpt.pt``. With
    ``resumable``, the whole state is saved beside it (``last.pt``) and a run that finds one there
    goes on from it: a retried trial does not start from scratch. Files are written after the
    last epoch and, before it, at most every ``save_every`` seconds (0: every epoch): a GPU epoch
    of the subset is shorter than writing them. On CUDA each training step is a replayed CUDA
    graph (see TrainStep) unless ``cuda_graphs`` is False.
    """
    # -- setup: everything lives on the training device
    device = train.x.device
    graphs = cuda_graphs and device.type == "cuda"
    optimizer = make_optimizer(model, cfg, graphs)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma) if cfg.step_size else None
    sums = torch.zeros(4, device=device)  # loss, correct, val loss, val correct; one tensor the graph adds to
    step = TrainStep(model, optimizer, sums, cfg.batch_size, graphs)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    result = FitResult(checkpoint=str(checkpoint))
    since_best, train_seconds, train_samples = 0, 0.0, 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    last = checkpoint.with_name("last.pt")
    best_state: dict[str, torch.Tensor] | None = None  # the best epoch's weights not yet written
    saved_at, first = time.perf_counter(), 1
    if resumable and last.is_file():
        since_best = _restore(load_checkpoint(last, device), model, optimizer, scheduler, gen, result)
        result.resumed_from_epoch = result.epochs_run
        first = result.epochs_run + 1
        if cfg.patience and since_best >= cfg.patience:  # it had stopped early before it was killed
            first, result.stop_reason = cfg.epochs + 1, "early_stopping"

    for epoch in range(first, cfg.epochs + 1):
        # -- train: metrics stay on the device, no .item() per batch
        t0 = time.perf_counter()
        lr = float(optimizer.param_groups[0]["lr"])
        model.train()
        sums.zero_()
        seen = 0
        for x, y in augment.batches(train, cfg.batch_size, gen):
            step(x, y)
            seen += len(y)
        sync()
        t_train = time.perf_counter() - t0

        # -- validate
        sums[2:] = _eval_sums(model, val, step.criterion)
        loss_sum, correct, val_loss_sum, val_correct = sums.tolist()  # the epoch's one sync
        seconds = time.perf_counter() - t0
        stats = EpochStats(epoch, loss_sum / seen, correct / seen, val_loss_sum / len(val),
                           val_correct / len(val), lr, seconds)
        result.history.append(stats)
        result.seconds += seconds
        train_seconds, train_samples = train_seconds + t_train, train_samples + seen
        if not math.isfinite(stats.loss):
            raise TrainingDiverged(f"loss is {stats.loss} at epoch {epoch} (lr {lr:g}); lower train.lr")

        # -- the recipe's best-epoch checkpoint (a copy on the device) and early stopping
        if stats.val_acc > result.best_val_acc or result.best_epoch == 0:
            result.best_val_acc, result.best_epoch, since_best = stats.val_acc, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
        if scheduler:
            scheduler.step()
        if log:
            log(f"Epoch {epoch}/{cfg.epochs} loss {stats.loss:.5f} acc {stats.acc:.5f} val_loss "
                f"{stats.val_loss:.5f} val_acc {stats.val_acc:.5f} lr {lr:.5f} ({seconds:.1f}s)")
        reason = on_epoch(stats) if on_epoch else None
        if cfg.patience and since_best >= cfg.patience:
            reason = reason or "early_stopping"

        # -- files: best.pt, then the state to resume from (it never runs ahead of best.pt)
        if reason or epoch == cfg.epochs or time.perf_counter() - saved_at >= save_every:
            if best_state is not None:
                save_checkpoint(checkpoint, {"model": best_state, "epoch": result.best_epoch,
                                             "val_acc": result.best_val_acc})
            if resumable:
                save_checkpoint(last, _snapshot(model, optimizer, scheduler, gen, result, since_best))
            best_state, saved_at = None, time.perf_counter()
        if reason:
            result.stop_reason = reason
            break

    # -- end: the best epoch's weights, as the recipe reloads its ckpt.pt
    model.load_state_dict(load_checkpoint(checkpoint, device)["model"])
    result.train_samples_per_s = train_samples / train_seconds if train_seconds else 0.0
    return result
