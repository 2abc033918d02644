"""Trials as members of a population: a worker takes up to K queued trials, trains them together
(hpo.population), and each is still its own Optuna trial. It reports every epoch, is pruned or
stops early on its own, has its own run folder with ``best.pt`` and a resumable ``last.pt``, and is
told through the same runner as a solo trial (hpo.runner). A freed place takes the next queued
trial at the next epoch boundary; one thread sends every member's heartbeat.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from hpo.augment import make_augment
from hpo.config import ConfigError, StudyConfig
from hpo.data import ImageData, training_splits
from hpo.faults import check_failure_budget
from hpo.files import store_artifact, write_json
from hpo.population import Member, Population
from hpo.runner import Attempt, Outcome, say, tell
from hpo.runs import load_checkpoint, run_record, save_checkpoint
from hpo.slots import Idle, Options, attempt_dir, heartbeat, take
from hpo.storage import StorageError
from hpo.study import StudyError, StudyHandle, suggest
from hpo.train import EpochStats, TrainingDiverged

SHARED = ("model.", "data.", "train.optimizer")  # what the members of one population have in common


def check_population(cfg: StudyConfig, size: int) -> None:
    """Members share the model's shape, the data and the optimizer type: a space that varies them
    cannot run as a population."""
    varied = [k for k in cfg.search if k.startswith(SHARED)]
    if size > 1 and varied:
        raise StudyError(f"population {size} (--population or [study] population): the search space varies "
                         f"{', '.join(varied)}, which the members of a population share; use --population 1")


@dataclass
class Seat:
    """A trial training as a member: its run folder and what it reported so far."""

    trial: optuna.trial.Trial
    cfg: StudyConfig
    run_dir: Path
    history: list[dict] = field(default_factory=list)
    dropped: bool = False  # another worker took the trial over while this one was stalled


def _seat(handle: StudyHandle, trial: optuna.trial.Trial, device: torch.device, opts: Options) -> Seat:
    name = handle.cfg.study.name
    trial.set_user_attr("device", str(device))
    trial.set_user_attr("hostname", platform.node())
    trial.set_user_attr("worker", f"{platform.node()}:{os.getpid()}")
    trial.set_user_attr("population", f"{platform.node()}:{os.getpid()}")
    run_dir = attempt_dir(trial, Path(opts.out) / name, name)
    cfg = handle.cfg.with_params(suggest(trial, handle.cfg))  # ConfigError: invalid parameters
    write_json(run_dir / "config.json", run_record(cfg, device))
    return Seat(trial, cfg, run_dir)


def _save(population: Population, k: int, seat: Seat) -> None:
    last, best = population.checkpoint(k)
    save_checkpoint(seat.run_dir / "best.pt", best)  # first: last.pt never runs ahead of best.pt
    save_checkpoint(seat.run_dir / "last.pt", last)


def _finish(handle: StudyHandle, population: Population, k: int, seat: Seat, opts: Options) -> Outcome | None:
    """The member's files, attributes and its one tell."""
    if seat.dropped:
        say(f"trial {seat.trial.number} was failed and queued again by another worker while this one was stalled "
            f"(no heartbeat for over {handle.storage.grace_period}s); this attempt is dropped")
        return None
    result, trial = population.result(k), seat.trial
    if isinstance(result, TrainingDiverged):
        return tell(handle, trial, Attempt(Outcome.DIVERGED, error=result))
    _save(population, k, seat)
    summary = {"best_val_acc": result.best_val_acc, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
               "stop_reason": result.stop.value, "seconds": round(result.seconds, 3), "run_dir": str(seat.run_dir)}
    write_json(seat.run_dir / "results.json", {**summary, "history": seat.history})
    trial.set_user_attr("history", seat.history)
    for key in ("best_epoch", "epochs_run", "seconds"):
        trial.set_user_attr(key, summary[key])
    trial.set_user_attr("resumed_from_epoch", population.slots[k].resumed_from)
    trial.set_user_attr("checkpoint_artifact", store_artifact(opts.artifacts, seat.run_dir / "best.pt", trial))
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
            return seat.trial.should_prune()
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
                member = Member(seat.cfg.train, make_augment(seat.cfg.augment))
                k = free.pop(0)
                if population is None:  # the first member sets the shape all share (check_population)
                    population = Population(seat.cfg.model, seat.cfg.train.optimizer, [member] * opts.population,
                                            splits, len(data.classes))
                    population.vacate(range(opts.population))
                last = seat.run_dir / "last.pt"  # a retry goes on from the attempt it takes over from
                saved = (load_checkpoint(last, device), load_checkpoint(seat.run_dir / "best.pt", device)) \
                    if last.is_file() else (None, None)
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
                    _save(population, k, seat)
                    seat.trial.set_user_attr("history", seat.history)
                written = time.perf_counter()
