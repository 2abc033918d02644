"""A worker's side of the study's queue: how workers run (Options), taking the next trial, the
heartbeats of the trials it runs, and each attempt's own run folder. Used by the solo loop
(hpo.workers.worker) and the population loop (hpo.workers.members) alike.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from hpo.engine.checkpoints import carry_over
from hpo.engine.runs import RunSummary, new_run_dir
from hpo.files import folder_name, store_artifact
from hpo.storages.retries import CHECKPOINT_EVERY, Liveness
from hpo.study.faults import reap
from hpo.study.handle import COUNTED, StudyHandle
from hpo.study.queue import pop_waiting, top_up
from hpo.study.records import TrialRecord, claimed
from hpo.workers.runner import say

IDLE_POLL = 2.0  # seconds an idle worker waits while others still run (their trials may come back)
PROXY_POLL = 0.5  # the same behind `hpo proxy`, which queues the next trials meanwhile (hpo.workers.proxy.KEEP_EVERY)


@dataclass(frozen=True)
class Options:
    """How workers run: where results go and on which device."""

    storage: str
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    out: str = "runs"  # run directories, one per trial attempt
    artifacts: str = "hpo-artifacts"  # Optuna artifact store; shared storage for many machines
    skip_checks: bool = False
    liveness: Liveness = Liveness()  # heartbeats, grace period, how long a lost database is waited for
    # Seconds between a trial's checkpoint writes: a retried trial redoes at most
    # this much. Writing every epoch costs more than a GPU epoch of the subset.
    checkpoint_every: float = CHECKPOINT_EVERY
    # Trials that may fail on their own (NaN loss, OOM, invalid parameters) before the study stops
    # drawing new ones; None: the larger of N and faults.MIN_FAILURE_BUDGET.
    max_failures: int | None = None
    # Trials trained together (hpo.workers.members); 0: automatic; None: the study file's [study] population.
    population: int | None = None

    def __post_init__(self) -> None:
        """Checked once, whoever makes it (the CLI from its flags, a script); the messages name the flags."""
        if not self.checkpoint_every >= 0:  # NaN too
            raise ValueError(f"--checkpoint-every must be 0 (every epoch) or more seconds, got {self.checkpoint_every}")
        if self.max_failures is not None and self.max_failures < 1:
            raise ValueError(f"--max-failures must be a positive integer, got {self.max_failures}")
        if (self.population or 0) < 0:
            raise ValueError(f"--population must be 0 (automatic) or a number of trials, got {self.population}")


@contextlib.contextmanager
def heartbeat(storage: optuna.storages.RDBStorage, trial_ids: Callable[[], Iterable[int]]) -> Iterator[None]:
    """One thread beats for the trials ``trial_ids()`` names (a population's change as members
    come and go) while the body runs; silence marks a trial's worker dead. The first beat comes
    one interval in: a trial that ends sooner needs none, since only a trial RUNNING for the
    grace period (longer than the interval) without a beat counts as dead."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(storage.get_heartbeat_interval()):
            for trial_id in list(trial_ids()):
                with contextlib.suppress(Exception):  # a missed beat is harmless; the next one retries
                    storage.record_heartbeat(trial_id)

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def claim(trial: optuna.trial.Trial, device: str, out: str, name: str) -> Path:
    """Mark ``trial`` as this worker's (device, host, process) and give the attempt its run folder."""
    run_dir = attempt_dir(trial, Path(out) / folder_name(name), name)
    claimed(device, str(run_dir)).write(trial)
    return run_dir


def record(trial: optuna.trial.Trial, summary: RunSummary, history: list[dict], artifacts: str) -> None:
    """A finished run's numbers as the trial's attributes, written once (the history is O(epochs)),
    its best checkpoint as the trial's artifact."""
    artifact = store_artifact(artifacts, summary.checkpoint, trial)
    TrialRecord(history=tuple(history), checkpoint_artifact=artifact, best_epoch=summary.best_epoch,
                epochs_run=summary.epochs_run, seconds=summary.seconds,
                resumed_from_epoch=summary.resumed_from_epoch).write(trial)


def prune(trial: optuna.trial.Trial, epoch: int, epochs: int) -> bool:
    """The study's pruner on a trial after ``epoch`` of ``epochs``, its value reported. Not asked after
    the last: a trial that ran its whole budget has nothing left to save, and completes with its value
    (a final rung at the budget would otherwise mark full runs PRUNED)."""
    return epoch < epochs and trial.should_prune()


def attempt_dir(trial: optuna.trial.Trial, out: Path, name: str) -> Path:
    """A run folder of this attempt's own: an attempt that stalled and woke up after its retry
    started can never write over the retry's files. A retry starts from the checkpoints of the
    attempt it takes over from (when this machine sees that folder: a shared filesystem)."""
    run_dir = new_run_dir(out, f"{name}-trial{trial.number}")
    carry_over(Path(TrialRecord.of(trial).run_dir or run_dir), run_dir)
    return run_dir


@dataclass
class Idle:
    """What an idle worker remembers between looks at the study."""

    reaped: float = -float("inf")  # when it last failed the trials nobody runs any more
    waited_for: list[int] | None = None  # the trials it said it waits for


def take(handle: StudyHandle, idle: Idle, wait: bool = True) -> optuna.trial.Trial | None:
    """The next queued trial, now RUNNING here; None once the study holds N finished trials (or, with
    ``wait`` False, when nothing is queued now). Meanwhile it fills gaps that failed trials left,
    and fails and queues again the trials that nobody runs any more."""
    direct = handle.storage.direct  # behind `hpo proxy`, the proxy fills gaps and reaps (hpo.storages.remote)
    while True:
        popped = pop_waiting(handle)
        if popped is not None:
            return popped[0]
        if top_up(handle):  # a failed trial left a gap
            continue
        running = [t.number for t in handle.trials((TrialState.RUNNING,))]
        if not wait or len(handle.trials(COUNTED)) >= handle.target or (direct and not running):
            return None
        if running != idle.waited_for:  # say it once, not every poll
            say(f"waiting for trial(s) {', '.join(map(str, running))}, RUNNING elsewhere; a trial without a "
                f"heartbeat for {handle.storage.grace_period}s is failed and queued again" if running else
                f"waiting for the storage proxy at {handle.storage.url} to queue the study's next trials")
            idle.waited_for = running
        # Trials that nobody runs any more come back queued. They count as such only after the
        # grace period, so looking once a heartbeat interval is enough.
        if direct and time.monotonic() - idle.reaped >= handle.storage.get_heartbeat_interval():
            reap(handle)
            idle.reaped = time.monotonic()
            continue
        time.sleep(IDLE_POLL if direct else PROXY_POLL)
