"""Workers: pop a queued trial, train it under a heartbeat, report, repeat until the study holds
N finished trials. ``run_study`` is what ``hpo run`` does; ``join_study`` what ``hpo worker`` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import platform
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from hpo.checks import gate
from hpo.config import StudyConfig
from hpo.data import ImageData, load_data, make_splits, resolve_device
from hpo.exits import WorkersFailed, run_command
from hpo.faults import check_failure_budget, reap
from hpo.files import store_artifact, writing
from hpo.progress import Progress
from hpo.runner import Outcome, run_trial, say
from hpo.runs import RunSummary, new_run_dir, resume_history, train_run
from hpo.storage import CHECKPOINT_EVERY, DB_TIMEOUT, GRACE_PERIOD, HEARTBEAT_INTERVAL, mask
from hpo.study import COUNTED, StudyHandle, check_target, open_study, pop_waiting, set_target, suggest, top_up

IDLE_POLL = 2.0  # seconds an idle worker waits while others still run (their trials may come back)


@dataclass(frozen=True)
class Options:
    """How workers run: where results go and on which device."""

    storage: str
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    out: str = "runs"  # run directories, one per trial attempt
    artifacts: str = "hpo-artifacts"  # Optuna artifact store; shared storage for many machines
    skip_checks: bool = False
    heartbeat: int = HEARTBEAT_INTERVAL  # seconds between a running trial's heartbeats
    grace: int = GRACE_PERIOD  # a trial silent this long is failed and queued again
    db_timeout: float = DB_TIMEOUT  # a worker that cannot reach the database this long exits
    # Seconds between a trial's checkpoint (and history) writes: a retried trial redoes at most
    # this much. Writing every epoch costs more than a GPU epoch of the subset.
    checkpoint_every: float = CHECKPOINT_EVERY
    # Trials that may fail on their own (NaN loss, OOM, invalid parameters) before the study stops
    # drawing new ones; None: the larger of N and faults.MIN_FAILURE_BUDGET.
    max_failures: int | None = None


@contextlib.contextmanager
def heartbeat(storage: optuna.storages.RDBStorage, trial_id: int) -> Iterator[None]:
    """Beat for ``trial_id`` while the body runs; silence marks the trial's worker dead."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(storage.get_heartbeat_interval()):
            with contextlib.suppress(Exception):  # a missed beat is harmless; the next one retries
                storage.record_heartbeat(trial_id)

    storage.record_heartbeat(trial_id)
    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _attempt_dir(trial: optuna.trial.Trial, out: Path, name: str) -> Path:
    """A run folder of this attempt's own: an attempt that stalled and woke up after its retry
    started can never write over the retry's files. A retry starts from the checkpoints of the
    attempt it takes over from (when this machine sees that folder: a shared filesystem)."""
    run_dir = new_run_dir(out, f"{name}-trial{trial.number}")
    previous = Path(trial.user_attrs.get("run_dir") or run_dir)
    for file in ("best.pt", "last.pt"):  # in this order: last.pt never runs ahead of best.pt
        if previous != run_dir and (previous / file).is_file():
            with writing(run_dir / file):
                shutil.copyfile(previous / file, run_dir / file)
    trial.set_user_attr("run_dir", str(run_dir))
    return run_dir


@dataclass(frozen=True)
class Objective:
    """A trial's training run: its parameters, a run folder of its own, ``train_run`` (reporting each
    epoch to the pruner), and its best checkpoint stored as the trial's artifact."""

    handle: StudyHandle
    data: ImageData
    device: torch.device
    opts: Options

    def __call__(self, trial: optuna.trial.Trial) -> RunSummary:
        name, opts = self.handle.cfg.study.name, self.opts
        trial.set_user_attr("device", str(self.device))
        trial.set_user_attr("hostname", platform.node())
        trial.set_user_attr("worker", f"{platform.node()}:{os.getpid()}")
        run_dir = _attempt_dir(trial, Path(opts.out) / name, name)
        history = resume_history(run_dir)
        written = time.perf_counter()

        def on_epoch(stats) -> bool:
            nonlocal written
            history.append(dataclasses.asdict(stats))
            trial.report(stats.val_acc, stats.epoch)  # every epoch: the pruner compares these
            if time.perf_counter() - written >= opts.checkpoint_every:  # the dashboard's live curves
                trial.set_user_attr("history", history)
                written = time.perf_counter()
            return trial.should_prune()

        cfg = self.handle.cfg.with_params(suggest(trial, self.handle.cfg))
        summary = train_run(cfg, self.device, run_dir.parent, self.data, on_epoch, log=None, run_dir=run_dir,
                            save_every=opts.checkpoint_every)
        artifact = store_artifact(opts.artifacts, summary.checkpoint, trial)
        trial.set_user_attr("history", history)
        for key in ("best_epoch", "epochs_run", "seconds", "resumed_from_epoch"):
            trial.set_user_attr(key, getattr(summary, key))
        trial.set_user_attr("checkpoint_artifact", artifact)
        return summary


def work(handle: StudyHandle, run: Callable[[optuna.trial.Trial], Outcome | None],
         max_failures: int | None = None) -> int:
    """Pop queued trials and ``run`` each (it must tell the study how the trial ended) under a
    heartbeat, until the study holds N finished trials; returns how many ran here. Raises
    TooManyFailures once the study holds ``max_failures`` trials that failed on their own (see
    faults.check_failure_budget)."""
    check_failure_budget(handle, max_failures)
    ran, reaped, waited_for = 0, -float("inf"), None
    while True:
        popped = pop_waiting(handle)
        if popped is None:
            if top_up(handle):  # a failed trial left a gap
                continue
            running = [t.number for t in handle.trials((TrialState.RUNNING,))]
            if len(handle.trials(COUNTED)) >= handle.target or not running:
                return ran
            if running != waited_for:  # say it once, not every poll
                say(f"waiting for trial(s) {', '.join(map(str, running))}, RUNNING elsewhere; a trial without a "
                    f"heartbeat for {handle.storage.grace_period}s is failed and queued again")
                waited_for = running
            # Trials that nobody runs any more come back queued. They count as such only after the
            # grace period, so looking once a heartbeat interval is enough.
            if time.monotonic() - reaped >= handle.storage.get_heartbeat_interval():
                reap(handle)
                reaped = time.monotonic()
                continue
            time.sleep(IDLE_POLL)
            continue
        trial, trial_id = popped
        with heartbeat(handle.storage, trial_id):
            outcome = run(trial)
        ran += 1
        if outcome is not None and outcome.state == TrialState.FAIL:
            check_failure_budget(handle, max_failures)


def _devices(device: str, workers: int) -> list[str]:
    """Round-robin over the visible GPUs when the device is auto/cuda; several per GPU is fine."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(workers)]
    return [str(resolve_device(device))] * workers


def _load_checked(cfg: StudyConfig) -> ImageData:
    """The data, with the study's splits checked against it: bad data fails before the study is written."""
    data = load_data(cfg.data.path)
    make_splits(data.train_y, cfg.data)
    return data


def _trials(handle: StudyHandle, data: ImageData, device: torch.device,
            opts: Options) -> Callable[[optuna.trial.Trial], Outcome | None]:
    objective = Objective(handle, data, device, opts)
    return lambda trial: run_trial(handle, trial, objective)


def run_study(cfg: StudyConfig, opts: Options, n_trials: int | None = None, workers: int = 1,
              quiet: bool = False) -> dict[str, Any]:
    """``hpo run``: create or resume the study, pass the gate, queue N slots, run K workers."""
    target = n_trials or cfg.study.n_trials
    check_target(cfg, target)
    devices = _devices(opts.device, workers)
    data = _load_checked(cfg)
    handle = open_study(cfg, opts.storage, create=True, heartbeat=opts.heartbeat, grace=opts.grace,
                        db_timeout=opts.db_timeout)
    set_target(handle, target)
    gate(handle.study, cfg, data, resolve_device(devices[0]), skip=opts.skip_checks)
    top_up(handle)
    t0 = time.perf_counter()
    with Progress(handle, enabled=not quiet):
        if workers == 1:
            work(handle, _trials(handle, data, resolve_device(devices[0]), opts), opts.max_failures)
        else:
            failed = _spawn(cfg, [dataclasses.replace(opts, device=d) for d in devices], target)
            check_failure_budget(handle, opts.max_failures)  # the reason the workers gave up, if so
            if failed:
                raise WorkersFailed(failed)
    return {"study": cfg.study.name, "storage": mask(opts.storage), "finished": len(handle.trials(COUNTED)),
            "failed": len(handle.trials((TrialState.FAIL,))), "wall_seconds": round(time.perf_counter() - t0, 1)}


def _worker_process(cfg: StudyConfig, opts: Options, target: int, threads: int | None) -> None:
    """One of ``hpo run --workers K``'s processes: ``hpo worker``'s work, ending as it would (one
    line on stderr, its exit code)."""
    os.setpgid(0, 0)  # its own process group: a terminal's Ctrl-C reaches the parent alone
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the parent until now
    if threads:
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def join() -> int:
        join_study(cfg, opts, target, quiet=True)
        return 0

    raise SystemExit(run_command(join))


def _spawn(cfg: StudyConfig, options: list[Options], target: int) -> str | None:
    """Run one worker process per device (``options`` differ in the device) until all exit; returns
    what went wrong, if anything. Each worker has a process group of its own, so a Ctrl-C (or a
    supervisor's SIGINT or SIGTERM) reaches this process alone and is passed on once: a second one
    could cut a worker's cleanup short."""
    cpu_only = all(o.device == "cpu" for o in options)  # share the cores instead of oversubscribing them
    threads = max(1, (os.cpu_count() or 1) // len(options)) if cpu_only else None
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch or database state
    procs = [spawn.Process(target=_worker_process, args=(cfg, o, target, threads), name=f"hpo-worker-{i}")
             for i, o in enumerate(options)]
    # SIGINT stays blocked until each worker has its own process group; a Ctrl-C meanwhile waits for it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        for p in procs:
            p.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:  # let the workers fail and queue again their trials, then stop
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGINT)
        for p in procs:
            p.join()
        raise
    codes = [p.exitcode for p in procs]
    if not any(codes):
        return None
    return (f"{sum(c != 0 for c in codes)} of {len(procs)} workers exited with an error "
            f"(exit codes {codes}); their messages are above")


def join_study(cfg: StudyConfig, opts: Options, n_trials: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """``hpo worker``: join a study that ``hpo run`` created, from this or any machine."""
    if n_trials:
        check_target(cfg, n_trials)
    device = resolve_device(opts.device)
    data = _load_checked(cfg)
    handle = open_study(cfg, opts.storage, create=False, heartbeat=opts.heartbeat, grace=opts.grace,
                        db_timeout=opts.db_timeout)
    if n_trials:
        set_target(handle, n_trials)
    gate(handle.study, cfg, data, device, skip=opts.skip_checks)  # returns at once if it passed before
    with Progress(handle, enabled=not quiet):
        ran = work(handle, _trials(handle, data, device, opts), opts.max_failures)
    return {"study": cfg.study.name, "ran": ran, "finished": len(handle.trials(COUNTED))}
