"""Storage overhead per trial: K worker processes run N trials of a trivial objective (no
training), so all the time is hpo's queue and Optuna's storage (pop, params, heartbeat, tell).

    python bench/storage.py [--workers 8] [--trials 100] [--postgres postgresql://postgres@127.0.0.1/postgres]

Runs on a fresh SQLite file and a fresh PostgreSQL database; writes bench/results/storage.{md,json}.

With ``--population 8`` it measures a population's storage instead: one worker trains N real trials
(synthetic data, a few epochs) one at a time and as a population of 8, on PostgreSQL, and times
every call into the storage; writes bench/results/storage-population.{md,json}.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from optuna.trial import TrialState

HERE = Path(__file__).resolve().parent
STUDY = """[study]
name = "storage-bench"
[search]
"train.lr" = {low = 1e-5, high = 1e-1, log = true}
"train.batch_size" = [16, 32, 64, 128, 256]
"""


def worker(storage: str, study_file: str) -> None:
    """One worker: pop trivial trials until the study is done; print its busy seconds and what it sent."""
    from sqlalchemy import event

    from hpo import load_study, open_study
    from hpo.study.queue import suggest
    from hpo.workers.worker import work

    handle = open_study(load_study(study_file), storage, create=False)
    # Statements and commits sent: the round trips a trial costs, steady where timings on a shared
    # VM are not.
    sent = collections.Counter(statements=0, commits=0)
    event.listen(handle.storage.engine, "before_cursor_execute", lambda *_: sent.update(["statements"]))
    event.listen(handle.storage.engine, "commit", lambda *_: sent.update(["commits"]))

    def trivial(trial) -> None:
        params = suggest(trial, handle.cfg)
        handle.study.tell(trial, params["train.lr"])

    t0 = time.perf_counter()
    ran = work(handle, trivial)
    print(json.dumps({"ran": ran, "seconds": time.perf_counter() - t0, **sent}))


POPULATION_STUDY = """augment = "none"
[study]
name = "storage-population-bench"
n_trials = {trials}
[train]
epochs = {epochs}
[search]
"train.lr" = {{low = 1e-4, high = 1e-2, log = true}}
"train.batch_size" = [32, 64]
[data]
path = "synthetic"
train_size = 600
val_size = 200
subset_size = 100
"""


def population_worker(storage: str, study_file: str, population: str, out: str) -> None:
    """One worker that trains the study's trials, ``population`` at a time, with every public storage
    method timed (a process of its own: the timing wraps the class)."""
    import functools

    from sqlalchemy import engine, event

    from hpo import load_study
    from hpo.storages.rdb import ResilientRDBStorage
    from hpo.workers.slots import Options
    from hpo.workers.worker import run_study

    spent, calls, sent = collections.Counter(), collections.Counter(), collections.Counter()
    for name in dir(ResilientRDBStorage):
        method = getattr(ResilientRDBStorage, name)
        if name.startswith("_") or not callable(method) or name == "get_heartbeat_interval":
            continue

        def timed(*args, _method=method, _name=name, **kwargs):
            t0 = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                spent[_name] += time.perf_counter() - t0
                calls[_name] += 1
        setattr(ResilientRDBStorage, name, functools.wraps(method)(timed))
    event.listen(engine.Engine, "before_cursor_execute", lambda *_, **__: sent.update(["statements"]))
    event.listen(engine.Engine, "commit", lambda *_, **__: sent.update(["commits"]))
    cfg = load_study(study_file)
    t0 = time.perf_counter()
    run_study(cfg, Options(storage=storage, device="cpu", out=f"{out}/runs", artifacts=f"{out}/artifacts",
                           skip_checks=True, population=int(population)), quiet=True)
    n, top = cfg.study.n_trials, spent.most_common(6)
    print(json.dumps({"population": int(population), "trials": n, "epochs": cfg.train.epochs,
                      "wall_s": round(time.perf_counter() - t0, 1),
                      "storage_ms_per_trial": round(1000 * sum(spent.values()) / n, 1),
                      "statements_per_trial": round(sent["statements"] / n, 1),
                      "commits_per_trial": round(sent["commits"] / n, 1),
                      "top_calls": {k: [round(calls[k] / n, 1), round(1000 * v / n, 2)] for k, v in top}}))


def population_rows(postgres: str, trials: int, epochs: int, population: int, repeats: int = 3) -> dict:
    """Each size ``repeats`` times, interleaved; the run with the median storage time is its row."""
    runs = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        study_file = Path(tmp) / "bench.toml"
        study_file.write_text(POPULATION_STUDY.format(trials=trials, epochs=epochs))
        for repeat in range(repeats):
            for size in (1, population):
                with fresh_postgres(postgres) as url:
                    done = subprocess.run([sys.executable, __file__, "--population-worker", url, str(study_file),
                                           str(size), f"{tmp}/{size}-{repeat}"], capture_output=True, text=True,
                                          check=True)
                    runs[f"population {size}"].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = {}
    for name, done in runs.items():
        done.sort(key=lambda r: r["storage_ms_per_trial"])
        rows[name] = {**done[len(done) // 2], "storage_ms_per_repeat": [r["storage_ms_per_trial"] for r in done]}
    return rows


@contextlib.contextmanager
def fresh_postgres(admin: str) -> Iterator[str]:
    """A new, empty PostgreSQL database's URL, dropped afterwards."""
    import psycopg

    name = f"hpo_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin.rsplit('/', 1)[0].replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def measure(storage: str, study_file: str, workers: int, trials: int) -> dict:
    from hpo import load_study, open_study
    from hpo.study.queue import set_target

    handle = open_study(load_study(study_file), storage, create=True)
    set_target(handle, trials)  # the workers queue every trial themselves: its cost is counted
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", storage, study_file], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(workers)]
    reports = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    wall = time.perf_counter() - t0
    states = [t.state for t in handle.study.get_trials(deepcopy=False)]
    numbers = [t.number for t in handle.study.get_trials(deepcopy=False)]
    busy = sum(r["seconds"] for r in reports)
    return {"workers": workers, "trials": trials, "complete": states.count(TrialState.COMPLETE),
            "other_states": len(states) - states.count(TrialState.COMPLETE),
            "distinct_numbers": len(set(numbers)) == len(numbers), "ran_per_worker": [r["ran"] for r in reports],
            "ms_per_trial": round(1000 * busy / trials, 1),
            "statements_per_trial": round(sum(r["statements"] for r in reports) / trials, 1),
            "commits_per_trial": round(sum(r["commits"] for r in reports) / trials, 1),
            "trials_per_s": round(trials / max(r["seconds"] for r in reports), 1),
            "wall_s_with_startup": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin URL")
    ap.add_argument("--population", type=int, help="measure a population of this size instead (see above)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per trial, with --population")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--population-worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    if args.population_worker:
        return population_worker(*args.population_worker)

    sys.path.insert(0, str(HERE))
    import torch
    from engine import machine, write_results

    if args.population:
        rows = population_rows(args.postgres, args.trials, args.epochs, args.population)
        header = {"machine": machine(torch.device("cpu")), "trials": args.trials, "epochs": args.epochs}
        body = [f"One worker trains {args.trials} trials ({args.epochs} epochs each, synthetic data, CPU) on a fresh",
                "PostgreSQL database, one at a time and as a population. storage ms: the time spent inside the",
                "storage's public methods (Optuna's RDBStorage under hpo's retries), over the trials; top calls:",
                "calls and ms per trial. The median of 3 interleaved runs (all 3 in the JSON).", "",
                "| run | wall s | storage ms per trial | statements per trial | commits per trial | top calls |",
                "|---|---|---|---|---|---|",
                *(f"| {k} | {r['wall_s']} | {r['storage_ms_per_trial']} | {r['statements_per_trial']} | "
                  f"{r['commits_per_trial']} | "
                  + ", ".join(f"{c} {n}x {ms} ms" for c, (n, ms) in r["top_calls"].items()) + " |"
                  for k, r in rows.items())]
        return write_results(HERE / "results", "storage-population", "Storage per trial in a population", header,
                             body, {"rows": rows})

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        study_file = Path(tmp) / "bench.toml"
        study_file.write_text(STUDY)
        for workers in sorted({1, args.workers}):
            rows[f"sqlite, {workers} workers"] = measure(f"sqlite:///{tmp}/bench{workers}.db", str(study_file),
                                                         workers, args.trials)
            with fresh_postgres(args.postgres) as url:
                rows[f"postgresql, {workers} workers"] = measure(url, str(study_file), workers, args.trials)
    header = {"machine": machine(torch.device("cpu")), "workers": args.workers, "trials": args.trials}
    body = [f"{args.trials} trials of a trivial objective (no training) per row. ms per trial: the workers' busy",
            "time over the trials (with several workers on 2 cores it includes waiting for a core); trials/s:",
            "the whole study's rate; statements and commits: what the workers sent, per trial (queueing",
            "the trials included: the workers queue every one).", "",
            "| storage | complete | other states | distinct numbers | ms per trial (worker time) | trials/s "
            "| statements per trial | commits per trial |",
            "|---|---|---|---|---|---|---|---|",
            *(f"| {k} | {r['complete']} | {r['other_states']} | {r['distinct_numbers']} | {r['ms_per_trial']} | "
              f"{r['trials_per_s']} | {r['statements_per_trial']} | {r['commits_per_trial']} |"
              for k, r in rows.items())]
    write_results(HERE / "results", "storage", "Storage overhead per trial", header, body, {"rows": rows})


if __name__ == "__main__":
    main()
