"""Workers: pop a queued trial, train it under a heartbeat, report, repeat until the study holds
N finished trials. ``run_study`` is what ``hpo run`` does; ``join_study`` what ``hpo worker`` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import subprocess
import sys
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
from hpo.config import ConfigError, StudyConfig
from hpo.data import ImageData, load_data
from hpo.progress import Progress
from hpo.runs import new_run_dir, resume_history, train_run
from hpo.storage import (
    CHECKPOINT_EVERY,
    DB_TIMEOUT,
    GRACE_PERIOD,
    HEARTBEAT_INTERVAL,
    StorageUnavailable,
    fail_stale_trials,
    mask,
)
from hpo.study import COUNTED, StudyHandle, distributions, open_study, pop_waiting, set_target, top_up
from hpo.train import TrainingDiverged, resolve_device

# A trial's own fault: it fails with the reason recorded and the worker goes on.
TRIAL_FAILURES = (TrainingDiverged, torch.OutOfMemoryError, ConfigError)
IDLE_POLL = 2.0  # seconds an idle worker waits while others still run (their trials may come back)


class WorkersFailed(RuntimeError):
    """Some of the worker processes of ``hpo run --workers K`` did not finish cleanly."""


@dataclass(frozen=True)
class Options:
    """How workers run: where results go and on which device."""

    storage: str
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    out: str = "runs"  # run directories, one per trial
    artifacts: str = "hpo-artifacts"  # Optuna artifact store; shared storage for many machines
    skip_checks: bool = False
    heartbeat: int = HEARTBEAT_INTERVAL  # seconds between a running trial's heartbeats
    grace: int = GRACE_PERIOD  # a trial silent this long is failed and queued again
    db_timeout: float = DB_TIMEOUT  # a worker that cannot reach the database this long exits
    # Seconds between a trial's checkpoint (and history) writes: a retried trial redoes at most
    # this much. Writing every epoch costs more than a GPU epoch of the subset.
    checkpoint_every: float = CHECKPOINT_EVERY


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


def suggest(trial: optuna.trial.Trial, cfg: StudyConfig) -> dict[str, Any]:
    """The trial's parameters: queued values come back as they were drawn, TPE samples now."""
    out = {}
    for key, dist in distributions(cfg).items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            out[key] = trial.suggest_categorical(key, dist.choices)
        elif isinstance(dist, optuna.distributions.IntDistribution):
            out[key] = trial.suggest_int(key, dist.low, dist.high, log=dist.log, step=dist.step)
        else:
            out[key] = trial.suggest_float(key, dist.low, dist.high, log=dist.log, step=dist.step)
    return out


def run_trial(handle: StudyHandle, trial: optuna.trial.Trial, data: ImageData, device: torch.device,
              opts: Options) -> None:
    """Train one trial and tell the study how it ended. Early stopping completes the trial with
    its best epoch (so it can be best); the comparative pruner prunes it."""
    study = handle.study
    trial.set_user_attr("device", str(device))
    trial.set_user_attr("hostname", platform.node())
    trial.set_user_attr("worker", f"{platform.node()}:{os.getpid()}")
    # A retried trial carries its first attempt's run directory: it goes on from its last epoch
    # there (when this machine sees that directory: a shared filesystem across machines).
    name = handle.cfg.study.name
    run_dir = Path(trial.user_attrs.get("run_dir") or new_run_dir(Path(opts.out) / name, f"{name}-trial{trial.number}"))
    trial.set_user_attr("run_dir", str(run_dir))
    history = resume_history(run_dir)
    written = time.perf_counter()

    def on_epoch(stats) -> str | None:
        nonlocal written
        history.append(dataclasses.asdict(stats))
        trial.report(stats.val_acc, stats.epoch)  # every epoch: the pruner compares these
        if time.perf_counter() - written >= opts.checkpoint_every:  # the dashboard's live curves
            trial.set_user_attr("history", history)
            written = time.perf_counter()
        return "pruned" if trial.should_prune() else None

    try:
        params = suggest(trial, handle.cfg)
        cfg = handle.cfg.with_params(params)
        result = train_run(cfg, device, run_dir.parent, data, on_epoch, log=None, run_dir=run_dir,
                           save_every=opts.checkpoint_every)
    except TRIAL_FAILURES as e:
        trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}")
        study.tell(trial, state=TrialState.FAIL)
        return
    except StorageUnavailable:  # no database to tell: the heartbeat's silence will fail the trial
        raise
    except BaseException as e:  # Ctrl-C, a bug: never leave the trial RUNNING
        trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
        study.tell(trial, state=TrialState.FAIL)
        raise
    store = optuna.artifacts.FileSystemArtifactStore(opts.artifacts)
    artifact = optuna.artifacts.upload_artifact(artifact_store=store, file_path=result["checkpoint"],
                                                study_or_trial=trial)
    trial.set_user_attr("history", history)
    for key in ("best_epoch", "epochs_run", "stop_reason", "seconds", "resumed_from_epoch"):
        trial.set_user_attr(key, result[key])
    trial.set_user_attr("checkpoint_artifact", artifact)
    if result["stop_reason"] == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, result["best_val_acc"])


def work(handle: StudyHandle, run: Callable[[optuna.trial.Trial], None]) -> int:
    """Pop queued trials and ``run`` each (it must tell the study how the trial ended) under a
    heartbeat, until the study holds N finished trials; returns how many ran here."""
    ran, checked = 0, -float("inf")
    while True:
        # Dead workers' trials come back queued. They turn stale only after the grace period, so
        # looking once a heartbeat interval is enough (and saves a query per trial).
        if time.monotonic() - checked >= handle.storage.get_heartbeat_interval():
            fail_stale_trials(handle.study)
            checked = time.monotonic()
        popped = pop_waiting(handle)
        if popped is None:
            if top_up(handle):  # a failed trial left a gap
                continue
            if len(handle.trials(COUNTED)) >= handle.target or not handle.trials((TrialState.RUNNING,)):
                return ran
            time.sleep(IDLE_POLL)
            continue
        trial, trial_id = popped
        with heartbeat(handle.storage, trial_id):
            run(trial)
        ran += 1


def _trainer(handle: StudyHandle, data: ImageData, device: torch.device,
             opts: Options) -> Callable[[optuna.trial.Trial], None]:
    Path(opts.artifacts).mkdir(parents=True, exist_ok=True)
    return lambda trial: run_trial(handle, trial, data, device, opts)


def _devices(device: str, workers: int) -> list[str]:
    """Round-robin over the visible GPUs when the device is auto/cuda; several per GPU is fine."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(workers)]
    return [str(resolve_device(device))] * workers


def run_study(cfg: StudyConfig, opts: Options, n_trials: int | None = None, workers: int = 1,
              worker_args: list[str] | None = None, quiet: bool = False) -> dict[str, Any]:
    """``hpo run``: create or resume the study, pass the gate, queue N slots, run K workers.
    ``worker_args`` is how a worker process re-reads the same config (study file, --param, --data)."""
    handle = open_study(cfg, opts.storage, create=True, heartbeat=opts.heartbeat, grace=opts.grace,
                        db_timeout=opts.db_timeout)
    set_target(handle, n_trials or cfg.study.n_trials)
    devices = _devices(opts.device, workers)
    data = load_data(cfg.data.path)
    gate(handle.study, cfg, data, resolve_device(devices[0]), skip=opts.skip_checks)
    top_up(handle)
    t0 = time.perf_counter()
    with Progress(handle, enabled=not quiet):
        if workers == 1:
            work(handle, _trainer(handle, data, resolve_device(devices[0]), opts))
        else:
            _spawn(devices, opts, worker_args or [], handle.target)
    return {"study": cfg.study.name, "storage": mask(opts.storage), "finished": len(handle.trials(COUNTED)),
            "failed": len(handle.trials((TrialState.FAIL,))), "wall_seconds": round(time.perf_counter() - t0, 1)}


def _spawn(devices: list[str], opts: Options, worker_args: list[str], target: int) -> None:
    env = {**os.environ, "HPO_STORAGE": opts.storage}  # not argv: other users can read argv
    if all(d == "cpu" for d in devices):  # share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(devices)))
    procs = [subprocess.Popen([sys.executable, "-m", "hpo.cli", "worker", *worker_args, "--device", d,
                               "--n-trials", str(target), "--out", opts.out, "--artifacts", opts.artifacts,
                               "--heartbeat", str(opts.heartbeat), "--grace", str(opts.grace),
                               "--db-timeout", str(opts.db_timeout), "--checkpoint-every", str(opts.checkpoint_every),
                               "--quiet"], env=env)
             for d in devices]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:  # the workers got the same Ctrl-C; let them fail their trials
        for p in procs:
            p.wait()
        raise
    if any(codes):
        raise WorkersFailed(f"{sum(c != 0 for c in codes)} of {len(procs)} workers exited with an error "
                            f"(exit codes {codes}); their messages are above")


def join_study(cfg: StudyConfig, opts: Options, n_trials: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """``hpo worker``: join a study that ``hpo run`` created, from this or any machine."""
    handle = open_study(cfg, opts.storage, create=False, heartbeat=opts.heartbeat, grace=opts.grace,
                        db_timeout=opts.db_timeout)
    if n_trials:
        set_target(handle, n_trials)
    device = resolve_device(opts.device)
    data = load_data(cfg.data.path)
    gate(handle.study, cfg, data, device, skip=opts.skip_checks)  # returns at once if it passed before
    with Progress(handle, enabled=not quiet):
        ran = work(handle, _trainer(handle, data, device, opts))
    return {"study": cfg.study.name, "ran": ran, "finished": len(handle.trials(COUNTED))}
