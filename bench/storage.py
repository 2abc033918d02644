"""Storage overhead per trial: K worker processes run N trials of a trivial objective (no
training), so all the time is hpo's queue and Optuna's storage (pop, params, heartbeat, tell).

    python bench/storage.py [--workers 8] [--trials 100] [--postgres postgresql://postgres@127.0.0.1/postgres]

Runs on a fresh SQLite file and a fresh PostgreSQL database; writes bench/results/storage.{md,json}.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
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
    from hpo.worker import suggest, work

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


def measure(storage: str, study_file: str, workers: int, trials: int) -> dict:
    from hpo import load_study, open_study
    from hpo.study import set_target, top_up

    handle = open_study(load_study(study_file), storage, create=True)
    set_target(handle, trials)
    top_up(handle)
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
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    import psycopg

    sys.path.insert(0, str(HERE))
    import torch
    from engine import machine, write_results

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        study_file = Path(tmp) / "bench.toml"
        study_file.write_text(STUDY)
        for workers in sorted({1, args.workers}):
            rows[f"sqlite, {workers} workers"] = measure(f"sqlite:///{tmp}/bench{workers}.db", str(study_file),
                                                         workers, args.trials)
            name = f"hpo_bench_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(args.postgres, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            try:
                base = args.postgres.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
                rows[f"postgresql, {workers} workers"] = measure(f"{base}/{name}", str(study_file), workers,
                                                                 args.trials)
            finally:
                with psycopg.connect(args.postgres, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    header = {"machine": machine(torch.device("cpu")), "workers": args.workers, "trials": args.trials}
    body = [f"{args.trials} trials of a trivial objective (no training) per row. ms per trial: the workers' busy",
            "time over the trials (with several workers on 2 cores it includes waiting for a core); trials/s:",
            "the whole study's rate; statements and commits: what the workers sent, per trial (the first",
            "top-up, before the workers start, not counted).", "",
            "| storage | complete | other states | distinct numbers | ms per trial (worker time) | trials/s "
            "| statements per trial | commits per trial |",
            "|---|---|---|---|---|---|---|---|",
            *(f"| {k} | {r['complete']} | {r['other_states']} | {r['distinct_numbers']} | {r['ms_per_trial']} | "
              f"{r['trials_per_s']} | {r['statements_per_trial']} | {r['commits_per_trial']} |"
              for k, r in rows.items())]
    write_results(HERE / "results", "storage", "Storage overhead per trial", header, body, {"rows": rows})


if __name__ == "__main__":
    main()
