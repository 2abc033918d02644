"""Load: K worker processes (OMP_NUM_THREADS=1) run N trivial trials (no training) against
PostgreSQL directly and through `hpo proxy`, so that all their time is hpo's queue and the
storage. Reports trials/s, storage ms per trial, and the database connections held
(pg_stat_activity), and checks that the study ends with exactly N distinct trials.

    python bench/load.py [--workers 1 8 32 64] [--per-worker 10] [--postgres postgresql://postgres@127.0.0.1/postgres]

Writes bench/results/load.{md,json}. Workers are forked from one process that imported hpo already
(64 interpreters importing torch would not fit this machine's memory), and start together once all
have opened the study.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from storage import STUDY, fresh_postgres  # noqa: E402  (bench/storage.py: the same trivial study)


def worker(url: str, study_file: str, ready, go, results) -> None:
    """One worker: open the study, wait for the start, pop and tell trivial trials until it is done."""
    try:
        from hpo import load_study, open_study
        from hpo.study.queue import suggest
        from hpo.workers.worker import work

        handle = open_study(load_study(study_file), url, create=False)

        def trivial(trial) -> None:
            handle.study.tell(trial, suggest(trial, handle.cfg)["train.lr"])

        ready.release()
        go.wait()
        t0 = time.perf_counter()
        ran = work(handle, trivial)
        results.put({"ran": ran, "seconds": time.perf_counter() - t0, "ended": time.time()})
    except BaseException as e:  # said in the row, not lost in a child's traceback
        ready.release()
        results.put({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})


def connections(admin: str, database: str, stop: threading.Event, seen: list[int]) -> None:
    """pg_stat_activity's count of the bench database's connections, every 0.1 s, until ``stop``."""
    import psycopg

    with psycopg.connect(admin, autocommit=True) as conn:
        while not stop.wait(0.1):
            seen.append(conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                                     (database,)).fetchone()[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_proxy(url: str) -> tuple[subprocess.Popen, str]:
    """`hpo proxy` on a free port, as a user starts it; returns once it accepts connections."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hpo.cli", "proxy", "--storage", url, "--port", str(port)],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"grpc://127.0.0.1:{port}"
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("hpo proxy did not start within 60 s")


def measure(admin: str, study_file: str, workers: int, trials: int, via_proxy: bool) -> dict:
    from optuna.trial import TrialState

    from hpo import load_study, open_study
    from hpo.study.queue import set_target, top_up

    with fresh_postgres(admin) as url:
        handle = open_study(load_study(study_file), url, create=True)
        set_target(handle, trials)
        top_up(handle)
        handle.storage.engine.dispose()  # only the workers' (or the proxy's) connections are counted
        proxy, target = start_proxy(url) if via_proxy else (None, url)
        fork = multiprocessing.get_context("fork")  # see the module's docstring
        ready, go, results = fork.Semaphore(0), fork.Event(), fork.Queue()
        procs = [fork.Process(target=worker, args=(target, study_file, ready, go, results)) for _ in range(workers)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.acquire()
        stop, seen = threading.Event(), []
        watcher = threading.Thread(target=connections, args=(admin, url.rsplit("/", 1)[1], stop, seen))
        watcher.start()
        t0 = time.time()
        go.set()
        reports = [results.get() for _ in procs]
        for p in procs:
            p.join()
        stop.set()
        watcher.join()
        if proxy is not None:
            proxy.terminate()
            proxy.wait(timeout=30)
        trials_seen = handle.study.get_trials(deepcopy=False)
        handle.storage.engine.dispose()
    done = [r for r in reports if "error" not in r]
    states = [t.state for t in trials_seen]
    wall = max((r["ended"] for r in done), default=t0) - t0
    return {"via": "proxy" if via_proxy else "direct", "workers": workers, "trials": trials,
            "complete": states.count(TrialState.COMPLETE),
            "other_states": len(states) - states.count(TrialState.COMPLETE),
            "distinct_numbers": len({t.number for t in trials_seen}) == len(trials_seen),
            "workers_failed": len(reports) - len(done), "errors": sorted({r["error"] for r in reports if "error" in r}),
            "trials_per_s": round(trials / wall, 1) if wall > 0 else None,
            "ms_per_trial": round(1000 * sum(r["seconds"] for r in done) / trials, 1),
            "connections_max": max(seen, default=0),
            "connections_median": statistics.median(seen) if seen else 0, "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--per-worker", type=int, default=10, help="trials per worker (at least 100 in all)")
    ap.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin URL")
    args = ap.parse_args()

    import torch
    from engine import machine, write_results

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        study_file = Path(tmp) / "bench.toml"
        study_file.write_text(STUDY)
        for workers in args.workers:
            for via_proxy in (False, True):
                rows.append(measure(args.postgres, str(study_file), workers, max(100, args.per_worker * workers),
                                    via_proxy))
                print(rows[-1], flush=True)
    header = {"machine": machine(torch.device("cpu")), "workers": args.workers, "per_worker": args.per_worker}
    body = ["Trivial trials (no training): all the time is hpo's queue and the storage. trials/s: N over the",
            "time from the common start to the last worker's end; ms per trial: the workers' busy time over",
            "N (with more workers than the 2 cores it includes waiting for a core); connections: the",
            "database's, from pg_stat_activity every 0.1 s during the run (max, median): the workers' own",
            "when direct, the proxy's when through it. PostgreSQL runs on the same 2 cores.", "",
            "| via | workers | N | complete | other states | distinct numbers | workers failed | trials/s "
            "| ms per trial | connections max | connections median |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *(f"| {r['via']} | {r['workers']} | {r['trials']} | {r['complete']} | {r['other_states']} | "
              f"{r['distinct_numbers']} | {r['workers_failed']} | {r['trials_per_s']} | "
              f"{r['ms_per_trial']} | {r['connections_max']} | {r['connections_median']} |" for r in rows),
            "", "Why workers failed (each message once):",
            *(f"- {r['via']}, {r['workers']} workers: {e}" for r in rows for e in r["errors"])]
    write_results(HERE / "results", "load", "Load: workers direct and through hpo proxy", header, body, {"rows": rows})


if __name__ == "__main__":
    main()
