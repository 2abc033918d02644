"""Workers: pop a queued trial, train it under a heartbeat, report, repeat until the study holds
N finished trials. ``run_study`` is what ``hpo run`` does; ``join_study`` what ``hpo worker`` does.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from hpo.config.study_file import StudyConfig
from hpo.engine.checkpoints import resume_history
from hpo.engine.data import ImageData, check_fits, resolve_device
from hpo.engine.models import build_model
from hpo.engine.runs import RunSummary, train_run
from hpo.engine.sources import load_data
from hpo.storages.retries import mask
from hpo.study.faults import check_failure_budget
from hpo.study.handle import COUNTED, StudyHandle
from hpo.study.identity import open_study
from hpo.study.progress import Progress
from hpo.study.queue import check_target, set_target, suggest, top_up
from hpo.workers.exits import WorkersFailed, run_command
from hpo.workers.gate import gate
from hpo.workers.members import auto_population, check_population, work_population
from hpo.workers.runner import Outcome, run_trial, say
from hpo.workers.slots import Idle, Options, claim, heartbeat, prune, record, take


@dataclass(frozen=True)
class Objective:
    """A trial's training run: its parameters, a run folder of its own, ``train_run`` (reporting each
    epoch to the pruner), and its best checkpoint stored as the trial's artifact."""

    handle: StudyHandle
    data: ImageData
    device: torch.device
    opts: Options

    def __call__(self, trial: optuna.trial.Trial) -> RunSummary:
        opts = self.opts
        run_dir = claim(trial, str(self.device), opts.out, self.handle.cfg.study.name)
        history = resume_history(run_dir)

        def on_epoch(stats) -> bool:
            history.append(dataclasses.asdict(stats))
            trial.report(stats.val_acc, stats.epoch)  # every epoch: the pruner and the dashboard's live curve
            return prune(trial, stats.epoch, cfg.train.epochs)

        cfg = self.handle.cfg.with_params(suggest(trial, self.handle.cfg))
        summary = train_run(cfg, self.device, run_dir.parent, self.data, on_epoch, log=None, run_dir=run_dir,
                            save_every=opts.checkpoint_every)
        record(trial, summary, history, opts.artifacts)
        return summary


def work(handle: StudyHandle, run: Callable[[optuna.trial.Trial], Outcome | None],
         max_failures: int | None = None) -> int:
    """Pop queued trials and ``run`` each (it must tell the study how the trial ended) under a
    heartbeat, until the study holds N finished trials; returns how many ran here. Raises
    TooManyFailures once the study holds ``max_failures`` trials that failed on their own (see
    faults.check_failure_budget)."""
    check_failure_budget(handle, max_failures)
    ran, idle = 0, Idle()
    while (trial := take(handle, idle)) is not None:
        with heartbeat(handle.storage, lambda: [trial._trial_id]):
            outcome = run(trial)
        ran += 1
        if outcome is not None and outcome.state == TrialState.FAIL:
            check_failure_budget(handle, max_failures)
    return ran


def _devices(device: str, workers: int) -> list[str]:
    """Round-robin over the visible GPUs when the device is auto/cuda; several per GPU is fine."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(workers)]
    return [str(resolve_device(device))] * workers


def with_population(cfg: StudyConfig, opts: Options, data: ImageData) -> Options:
    """``opts`` with the population size it runs: its own, else the study file's; refused where the
    search space varies what members share, or the model does not stack."""
    opts = dataclasses.replace(opts, population=cfg.study.population if opts.population is None else opts.population)
    check_population(cfg, opts.population, data)
    return opts


def prepare(cfg: StudyConfig, opts: Options, n_trials: int | None, create: bool,
            data: ImageData | None = None) -> tuple[StudyHandle, Options, ImageData]:
    """What every way into a study does first, in this order, so that bad input fails before the
    study is written: the target N against the search space, the data (``data``: loaded already) against
    the splits and augmentation, the model built once for it, the population size, then the study opened
    (``create``: or made) and N set. N is ``n_trials``, else the study file's when creating; a worker
    that joins without one keeps the study's."""
    target = n_trials or (cfg.study.n_trials if create else None)
    if target:
        check_target(cfg, target)
    data = data if data is not None else load_data(cfg.data.path)
    check_fits(cfg, data)
    with torch.random.fork_rng(devices=[]):  # ModelError: the factory is broken (the RNG stays as it was)
        build_model(cfg.model, data.input_shape, len(data.classes))
    opts = with_population(cfg, opts, data)
    handle = open_study(cfg, opts.storage, create=create, liveness=opts.liveness)
    if target:
        set_target(handle, target)
    return handle, opts, data


def _work(handle: StudyHandle, data: ImageData, device: torch.device, opts: Options) -> int:
    """Trials one at a time, or ``opts.population`` of them at once (0: as many as fit); how many ran here."""
    size = opts.population or auto_population(handle.cfg, device, data.input_shape, len(data.classes),
                                              handle.target)
    if size > 1:
        if not opts.population:
            say(f"population {size}: trains up to {size} trials at once (automatic, from {device}'s free memory)")
        return work_population(handle, data, device, dataclasses.replace(opts, population=size))
    objective = Objective(handle, data, device, opts)
    return work(handle, lambda trial: run_trial(handle, trial, objective), opts.max_failures)


@dataclass(frozen=True)
class StudyRun:
    """What ``hpo run`` ends with."""

    study: str
    storage: str  # the URL without its password
    finished: int  # COMPLETE and PRUNED trials, the study's N once it is done
    failed: int  # FAIL attempts, retried ones included
    wall_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        return (f"study {self.study}: {self.finished} finished, {self.failed} failed, {self.wall_seconds:.1f}s, "
                f"storage {self.storage}")


@dataclass(frozen=True)
class WorkerRun:
    """What ``hpo worker`` ends with."""

    study: str
    ran: int  # trials this worker ran to the end
    finished: int  # the study's finished trials, all workers'

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        return f"worker done: ran {self.ran} trials; the study has {self.finished} finished"


def run_study(cfg: StudyConfig, opts: Options, n_trials: int | None = None, workers: int = 1,
              quiet: bool = False, data: ImageData | None = None) -> StudyRun:
    """``hpo run``: create or resume the study, pass the gate, queue N slots, run K workers (``data``:
    the study's, loaded already; each worker process loads its own)."""
    devices = _devices(opts.device, workers)
    handle, opts, data = prepare(cfg, opts, n_trials, create=True, data=data)
    target = handle.target
    gate(handle.study, cfg, data, resolve_device(devices[0]), skip=opts.skip_checks)
    top_up(handle)
    t0 = time.perf_counter()
    with Progress(handle, enabled=not quiet):
        if workers == 1:
            _work(handle, data, resolve_device(devices[0]), opts)
        else:
            failed = _spawn(cfg, [dataclasses.replace(opts, device=d) for d in devices], target)
            check_failure_budget(handle, opts.max_failures)  # the reason the workers gave up, if so
            if failed:
                raise WorkersFailed(failed)
    return StudyRun(cfg.study.name, mask(opts.storage), len(handle.trials(COUNTED)),
                    len(handle.trials((TrialState.FAIL,))), round(time.perf_counter() - t0, 1))


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


def join_study(cfg: StudyConfig, opts: Options, n_trials: int | None = None, quiet: bool = False) -> WorkerRun:
    """``hpo worker``: join a study that ``hpo run`` created, from this or any machine."""
    device = resolve_device(opts.device)
    handle, opts, data = prepare(cfg, opts, n_trials, create=False)
    gate(handle.study, cfg, data, device, skip=opts.skip_checks)  # returns at once if it passed before
    with Progress(handle, enabled=not quiet):
        ran = _work(handle, data, device, opts)
    return WorkerRun(cfg.study.name, ran, len(handle.trials(COUNTED)))
