"""Trials as members of a population: a worker takes up to K queued trials, trains them together
(hpo.engine.population), and each is still its own Optuna trial. It reports every epoch, is pruned or
stops early on its own, has its own run folder with ``best.pt`` and a resumable ``last.pt``, and is
told through the same runner as a solo trial (hpo.workers.runner). A freed place takes the next queued
trial at the next epoch boundary; one thread sends every member's heartbeat. Outside a study,
:func:`train_together` trains settings that can share a population at once (``hpo retrain --top K``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from hpo.config.schema import ConfigError
from hpo.config.study_file import StudyConfig
from hpo.engine.augment import make_augment
from hpo.engine.checkpoints import read_resumable, save_checkpoint
from hpo.engine.data import ImageData, training_splits
from hpo.engine.loop import EVAL_BATCH
from hpo.engine.models import build_model, stackable
from hpo.engine.population import Member, Population
from hpo.engine.records import EpochStats, FitResult, ModelError, TrainingDiverged
from hpo.engine.runs import RunSummary, new_run_dir, run_record, write_results
from hpo.files import write_json
from hpo.storages.retries import StorageError
from hpo.study.faults import check_failure_budget
from hpo.study.handle import StudyError, StudyHandle
from hpo.study.queue import suggest
from hpo.study.records import TrialRecord
from hpo.workers.runner import Attempt, Outcome, say_dropped, tell
from hpo.workers.slots import Idle, Options, claim, heartbeat, prune, record, take

# What the members of one population have in common.
SHARED = ("model.", "data.", "train.optimizer", "train.label_smoothing")
OWN = ("model.dropout",)  # ... except these: each member has its own
AUTO_CAP = 64  # the most members an automatic size picks: the K the GPU profile is taken at (bench/population.py)
MEMORY_SHARE = 0.5  # of the device's free memory an automatic size fills: room for the allocator's slack
# Whether population = 0 sizes a population from CUDA's free memory. Not until bench/gpu.sh has measured a
# population beating solo trials on a GPU, which it has not yet: 0 picks 1 there too (docs/population.md).
AUTO_ON_CUDA = False
# The training the population engine computes; any other value of these keys trains solo.
SOLO_TRAINING = {"schedule": "step", "precision": "fp32", "nesterov": False}


def _shared_varied(cfg: StudyConfig) -> list[str]:
    return [k for k in cfg.search if k.startswith(SHARED) and not _own(cfg, k)]


def _own(cfg: StudyConfig, key: str) -> bool:
    return key in OWN and cfg.model.family == "mlp"  # the MLP's dropout, which Population applies per member


def _member(cfg: StudyConfig) -> Member:
    dropout = cfg.model.kwargs["dropout"] if cfg.model.family == "mlp" else 0.0
    return Member(cfg.train, make_augment(cfg.augment), dropout)


def check_population(cfg: StudyConfig, size: int, data: ImageData) -> None:
    """Members share the model's shape, the data, the optimizer type and the loss: a space that varies them
    cannot run as a population, nor a model of layers that the population engine does not stack."""
    if size <= 1:
        return
    varied = _shared_varied(cfg)
    if varied:
        raise StudyError(f"population {size} (--population or [study] population): the search space varies "
                         f"{', '.join(varied)}, which the members of a population share; use --population 1")
    if problem := _unstackable(cfg, data.input_shape, len(data.classes)):
        raise StudyError(f"population {size} (--population or [study] population) on model {cfg.model.family}: "
                         f"{problem}")


def _unstackable(cfg: StudyConfig, input_shape: tuple[int, ...], num_classes: int) -> ModelError | None:
    """Why the population engine cannot train the study's model, or None where it can: the layers it
    stacks, and the training it computes (StepLR, fp32, plain momentum)."""
    odd = [f"train.{k} = {getattr(cfg.train, k)!r}" for k, v in SOLO_TRAINING.items() if getattr(cfg.train, k) != v]
    odd += [f"a searched train.{k}" for k in SOLO_TRAINING if f"train.{k}" in cfg.search]
    if odd:
        plain = ", ".join(f"train.{k} = {v!r}" for k, v in SOLO_TRAINING.items())
        return ModelError(f"a population trains only with {plain}; this study has {', '.join(odd)}: use --population 1")
    with torch.device("meta"):  # shapes only, nothing allocated
        model = build_model(cfg.model, input_shape, num_classes)
    try:
        stackable(model)
    except ModelError as e:
        return e
    return None


def member_bytes(cfg: StudyConfig, input_shape: tuple[int, ...], num_classes: int) -> int:
    """A member's device memory, estimated: five copies of its weights (weights, gradients, two
    optimizer moments, best weights) and a step's activations at the space's largest batch, twice
    for the backward pass (or an eval batch's, whichever is more)."""
    with torch.device("meta"):  # shapes only, nothing allocated
        model = build_model(cfg.model, input_shape, num_classes)
    weights = sum(p.numel() for p in model.parameters())
    batch = cfg.search["train.batch_size"].largest() if "train.batch_size" in cfg.search else cfg.train.batch_size
    widths = [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    row = math.prod(input_shape) + 6 * sum(widths[:-1]) + 3 * num_classes  # floats a row keeps
    return 4 * (5 * weights + max(2 * batch, EVAL_BATCH) * row)


def auto_population(cfg: StudyConfig, device: torch.device, input_shape: tuple[int, ...], num_classes: int,
                    target: int) -> int:
    """``population = 0``: one on a CPU (where a population is slower, docs/population.md), where the space varies
    what members share, or the model does not stack, and on CUDA until AUTO_ON_CUDA; then as many as
    half the free memory holds, at most AUTO_CAP and the study's N."""
    if device.type != "cuda" or not AUTO_ON_CUDA or _shared_varied(cfg) or _unstackable(cfg, input_shape,
                                                                                          num_classes):
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(AUTO_CAP, target, int(MEMORY_SHARE * free) // member_bytes(cfg, input_shape, num_classes)))


@dataclass
class Seat:
    """A trial training as a member: its run folder and what it reported so far."""

    trial: optuna.trial.Trial
    cfg: StudyConfig
    run_dir: Path
    history: list[dict] = field(default_factory=list)
    dropped: bool = False  # another worker took the trial over while this one was stalled


def _seat(handle: StudyHandle, trial: optuna.trial.Trial, device: torch.device, opts: Options) -> Seat:
    run_dir = claim(trial, str(device), opts.out, handle.cfg.study.name)
    TrialRecord(population=TrialRecord.of(trial).worker).write(trial)  # the worker's population it trains in
    cfg = handle.cfg.with_params(suggest(trial, handle.cfg))  # ConfigError: invalid parameters
    write_json(run_dir / "config.json", run_record(cfg, device))
    return Seat(trial, cfg, run_dir)


def _save(population: Population, k: int, run_dir: Path) -> None:
    last, best = population.checkpoint(k)
    save_checkpoint(run_dir / "best.pt", best)  # first: last.pt never runs ahead of best.pt
    save_checkpoint(run_dir / "last.pt", last)


def _summary(population: Population, k: int, result: FitResult, run_dir: Path, history: list[dict]) -> RunSummary:
    """Member ``k``'s ``best.pt``, ``last.pt`` and ``results.json``, as its solo ``train_run`` writes them."""
    _save(population, k, run_dir)
    data = population.data
    summary = RunSummary(result.best_val_acc, result.best_epoch, result.epochs_run, result.stop,
                         round(result.seconds, 3), round(result.train_samples_per_s, 1), 0.0, len(data.train),
                         len(data.val), run_dir / "best.pt", run_dir, result.resumed_from_epoch)
    write_results(summary, history)
    return summary


def _finish(handle: StudyHandle, population: Population, k: int, seat: Seat, opts: Options) -> Outcome | None:
    """The member's files, attributes and its one tell."""
    if seat.dropped:
        say_dropped(handle, seat.trial)
        return None
    result, trial = population.result(k), seat.trial
    if isinstance(result, TrainingDiverged):
        return tell(handle, trial, Attempt(Outcome.DIVERGED, error=result))
    summary = _summary(population, k, result, seat.run_dir, seat.history)
    record(trial, summary, seat.history, opts.artifacts)
    return tell(handle, trial, Attempt.of(result.stop, result.best_val_acc))


@contextlib.contextmanager
def _ending_all(handle: StudyHandle, seats: dict[int, Seat]) -> Iterator[None]:
    """An error in the body (Ctrl-C, a full disk, a bug) is every member's outcome: each is told
    (and queued again where the fault was not its own), then the error goes on up. A lost database
    goes on up at once: there is nothing to tell with."""
    try:
        yield
    except StorageError:
        raise
    except BaseException as e:
        for seat in seats.values():
            with contextlib.suppress(type(e), optuna.exceptions.UpdateFinishedTrialError):
                tell(handle, seat.trial, Attempt(Outcome.of_error(e), error=e))
        raise


def work_population(handle: StudyHandle, data: ImageData, device: torch.device, opts: Options) -> int:
    """``worker.work`` with up to ``opts.population`` trials training at once; returns how many ran here."""
    check_failure_budget(handle, opts.max_failures)
    seats: dict[int, Seat] = {}
    population: Population | None = None
    ran, idle, written = 0, Idle(), time.perf_counter()
    splits = training_splits(data, handle.cfg.data, device)

    def on_epoch(k: int, stats: EpochStats) -> bool:
        seat = seats[k]
        seat.history.append(dataclasses.asdict(stats))
        try:
            seat.trial.report(stats.val_acc, stats.epoch)
            return prune(seat.trial, stats.epoch, seat.cfg.train.epochs)
        except optuna.exceptions.UpdateFinishedTrialError:
            seat.dropped = True
            return True

    beating = lambda: [s.trial._trial_id for s in list(seats.values())]  # noqa: E731  (a copy: seats change)
    with heartbeat(handle.storage, beating), _ending_all(handle, seats):
        while True:
            # -- fill the free places from the queue; wait for one only when nothing trains here
            free = [k for k in range(opts.population) if k not in seats]
            while free and (trial := take(handle, idle, wait=not seats)) is not None:
                try:
                    seat = _seat(handle, trial, device, opts)
                except ConfigError as e:
                    tell(handle, trial, Attempt(Outcome.INVALID_PARAMS, error=e))
                    ran += 1
                    continue
                member = _member(seat.cfg)
                k = free.pop(0)
                if population is None:  # the first member sets the shape all share (check_population)
                    population = Population(seat.cfg.model, seat.cfg.train.optimizer, [member] * opts.population,
                                            splits, len(data.classes))
                    population.vacate(range(opts.population))
                # a retry goes on from its previous attempt
                saved = read_resumable(seat.run_dir, device) or (None, None)
                population.admit(k, member, *saved)
                seat.history = [dataclasses.asdict(s) for s in population.slots[k].history]
                seats[k] = seat
            if not seats:
                return ran
            # -- one epoch of every member (an error not of one member's making ends them all: _ending_all)
            population.epoch(on_epoch)
            # -- the members that stopped are told; the others' files, every checkpoint_every seconds
            for k in [k for k in seats if population.slots[k].stop is not None]:
                outcome = _finish(handle, population, k, seats[k], opts)
                del seats[k]  # only now: until it is told, an error tells it with the others
                ran += 1
                if outcome is not None and outcome.state == TrialState.FAIL:
                    check_failure_budget(handle, opts.max_failures)
            if time.perf_counter() - written >= opts.checkpoint_every:
                for k, seat in seats.items():
                    _save(population, k, seat.run_dir)
                written = time.perf_counter()


def shareable(cfgs: Sequence[StudyConfig], data: ImageData) -> bool:
    """Whether these settings can train as one population: equal in all that members share, and
    each of a model and training that the population engine computes."""
    def shared(cfg: StudyConfig) -> dict[str, Any]:
        d = cfg.to_dict()
        flat = {f"{section}.{k}": v for section in ("data", "model", "train") for k, v in d[section].items()}
        return {k: v for k, v in flat.items() if k.startswith(SHARED) and not _own(cfg, k) and k != "data.path"}

    return all(shared(c) == shared(cfgs[0]) and not _unstackable(c, data.input_shape, len(data.classes))
               for c in cfgs)


def train_together(cfgs: Sequence[StudyConfig], device: torch.device, out: Path, data: ImageData,
                   log: Callable[[str], None] | None = print) -> list[RunSummary]:
    """``train_run`` for several settings at once, as one population (:func:`shareable` ones): each
    gets the run folder, files and summary its own ``train_run`` would. Raises TrainingDiverged
    if one of them diverges, as ``train_run`` does."""
    splits = training_splits(data, cfgs[0].data, device)
    run_dirs = [new_run_dir(out, cfg.study.name) for cfg in cfgs]
    for cfg, run_dir in zip(cfgs, run_dirs, strict=True):
        write_json(run_dir / "config.json", run_record(cfg, device))
    members = [_member(cfg) for cfg in cfgs]
    population = Population(cfgs[0].model, cfgs[0].train.optimizer, members, splits, len(data.classes))
    histories: list[list[dict]] = [[] for _ in cfgs]

    def on_epoch(k: int, stats: EpochStats) -> bool:
        histories[k].append(dataclasses.asdict(stats))
        if log:
            log(f"[{k + 1}/{len(cfgs)}] {stats.line(cfgs[k].train.epochs)}")
        return False

    while any(slot.stop is None for slot in population.slots):
        population.epoch(on_epoch)
    results = [population.result(k) for k in range(len(cfgs))]
    if diverged := next((r for r in results if isinstance(r, TrainingDiverged)), None):
        raise diverged
    return [_summary(population, k, r, d, h) for k, (r, d, h) in enumerate(zip(results, run_dirs, histories,
                                                                              strict=True))]
