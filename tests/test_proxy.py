"""`hpo proxy` (hpo.workers.proxy, hpo.storages.remote): Optuna's gRPC storage proxy in front of a real PostgreSQL,
real worker processes behind it on grpc://, and the faults a worker there must survive."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import optuna
import pytest
from conftest import FULL_DATA, hpo_cli, hpo_main, stop
from optuna.trial import TrialState

from hpo.storages.remote import parse
from hpo.storages.retries import StorageError
from hpo.study.records import TrialRecord

SHORT = """augment = "none"
[study]
n_trials = 6
[train]
epochs = 2
[search]
"train.lr" = {low = 1e-3, high = 1e-1, log = true}
"""
LONG = """augment = "none"
[study]
n_trials = {n}
[train]
epochs = 60
batch_size = 16
[search]
"train.lr" = [0.001]
"""


class HpoProxy:
    """`hpo proxy` as a user starts it, on a free port."""

    def __init__(self, database: str, *flags: str, port: int | None = None):
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port, self.url = port, f"grpc://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "hpo.cli", "proxy", "--storage", database,
                                      "--port", str(port), *flags], stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()  # its one line once it listens
        assert f"storage proxy on {self.url}" in line, line + self.proc.stderr.read()

    def stop(self) -> None:
        stop(self.proc)


@pytest.fixture
def hpo_proxy(postgres_url):
    started: list[HpoProxy] = []

    def start(*flags: str, database: str = postgres_url, port: int | None = None) -> HpoProxy:
        started.append(HpoProxy(database, *flags, port=port))
        return started[-1]

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.stop()


def trials(url: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="small", storage=url).trials


def until(what, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    """Wait until ``what()`` holds; fails if it does not within ``timeout`` or ``proc`` ends first."""
    deadline = time.time() + timeout
    while not what():
        assert time.time() < deadline, f"waited {timeout}s in vain"
        assert proc is None or proc.poll() is None, f"the run exited {proc.returncode}: {proc.stderr.read()}"
        time.sleep(0.2)


def mid_training(url: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return [t for t in trials(url) if t.state == TrialState.RUNNING and len(t.intermediate_values) >= 3]
    except KeyError:  # no study yet
        return []


def test_workers_behind_the_proxy_run_exactly_n_trials(study_file, postgres_url, hpo_proxy, tmp_path):
    proxy = hpo_proxy()
    r = hpo_cli("run", study_file(SHORT), "--storage", proxy.url, "--workers", "2", "--device", "cpu",
                "--out", tmp_path / "r", "--artifacts", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    done = trials(postgres_url)  # read from the database itself
    assert [t.state for t in done] == [TrialState.COMPLETE] * 6
    assert sorted(t.number for t in done) == list(range(6))
    assert all(t.user_attrs["history"] and t.user_attrs["run_dir"] for t in done)
    best = hpo_main("best", study_file(SHORT), "--storage", proxy.url)
    assert best.returncode == 0 and f"val_acc {max(t.value for t in done):.4f}" in best.stdout, best.stderr


def test_a_killed_worker_s_trial_is_failed_by_the_proxy_and_run_again(study_file, postgres_url, hpo_proxy,
                                                                      tmp_path):
    """Its heartbeat, sent through the proxy, goes silent; the proxy fails it and queues it again."""
    proxy = hpo_proxy("--grace", "3")
    common = [str(study_file(LONG.format(n=1), data=FULL_DATA)), "--storage", proxy.url, "--device", "cpu",
              "--skip-checks", "--out", str(tmp_path / "r"), "--artifacts", str(tmp_path / "a"), "--heartbeat", "1",
              "--checkpoint-every", "0"]
    victim = subprocess.Popen([sys.executable, "-m", "hpo.cli", "run", *common], stderr=subprocess.PIPE, text=True)
    until(lambda: mid_training(postgres_url), proc=victim)
    victim.kill()
    victim.wait(timeout=30)
    (killed,) = [t.number for t in trials(postgres_url) if t.state == TrialState.RUNNING]

    r = hpo_main("worker", *common)
    assert r.returncode == 0, r.stderr
    by_state = {s: [t for t in trials(postgres_url) if t.state == s] for s in TrialState}
    assert [t.number for t in by_state[TrialState.FAIL]] == [killed] and not by_state[TrialState.RUNNING]
    (retry,) = by_state[TrialState.COMPLETE]
    assert TrialRecord.of(retry).retry_of == killed and TrialRecord.of(retry).resumed_from_epoch >= 1


def test_an_interrupted_worker_s_trial_is_queued_again_by_the_proxy(study_file, postgres_url, hpo_proxy, tmp_path):
    """A worker behind the proxy cannot take the study lock: it marks the trial, the proxy queues it."""
    proxy = hpo_proxy()
    worker = subprocess.Popen([sys.executable, "-m", "hpo.cli", "run", str(study_file(LONG.format(n=1),
                               data=FULL_DATA)), "--storage", proxy.url, "--device", "cpu", "--skip-checks",
                               "--out", str(tmp_path / "r"), "--artifacts", str(tmp_path / "a")],
                              stderr=subprocess.PIPE, text=True)
    until(lambda: mid_training(postgres_url), proc=worker)
    worker.send_signal(signal.SIGINT)
    assert worker.wait(timeout=60) == 130
    (failed,) = [t for t in trials(postgres_url) if t.state == TrialState.FAIL]
    assert TrialRecord.of(failed).requeue is True
    until(lambda: [t for t in trials(postgres_url) if t.state == TrialState.WAITING], timeout=10)
    (queued,) = [t for t in trials(postgres_url) if t.state == TrialState.WAITING]
    assert TrialRecord.of(queued).retry_of == failed.number and "requeue" not in queued.user_attrs
    assert queued.params == failed.params


def test_workers_ride_out_a_database_outage_and_a_proxy_restart(study_file, postgres_url, hpo_proxy, proxy,
                                                                 tmp_path):
    """The database behind the proxy is cut for 3 s, then the proxy itself restarts; the run goes on."""
    through_cut = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    first = hpo_proxy(database=through_cut)
    run = subprocess.Popen([sys.executable, "-m", "hpo.cli", "run", str(study_file(LONG.format(n=2), data=FULL_DATA)),
                            "--storage", first.url, "--device", "cpu", "--skip-checks", "--out", str(tmp_path / "r"),
                            "--artifacts", str(tmp_path / "a")], stderr=subprocess.PIPE, text=True)
    until(lambda: mid_training(postgres_url), proc=run)
    proxy.cut()
    time.sleep(3)
    proxy.restore()
    first.stop()
    hpo_proxy(database=through_cut, port=first.port)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    assert [t.state for t in trials(postgres_url)] == [TrialState.COMPLETE] * 2



def test_a_proxy_whose_database_is_down_stops_when_told(postgres_url, hpo_proxy, proxy):
    """A supervisor's SIGTERM ends it in seconds, not once its keeper gave up waiting for the database
    (--db-timeout, 300 s)."""
    served = hpo_proxy(database=postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"))
    proxy.cut()
    time.sleep(3)  # the keeper's pass now waits for the database
    since = time.monotonic()
    served.proc.terminate()
    assert served.proc.wait(timeout=60) == 130
    assert time.monotonic() - since < 15, time.monotonic() - since

@pytest.mark.parametrize("url", ["grpc://", "grpc://host:notaport", "grpc://host:13000/db", "grpc://host:0"])
def test_a_malformed_proxy_url_is_refused_in_one_line(url):
    with pytest.raises(StorageError, match="not a proxy URL; use grpc://HOST:PORT"):
        parse(url)


def test_bad_proxy_input_is_one_line_and_exit_2(postgres_url, hpo_proxy, study_file):
    taken = hpo_proxy()
    cases = {("proxy", "--storage", postgres_url, "--port", "70000"): "--port must be a TCP port",
             ("proxy", "--storage", taken.url): "the proxy needs the database's own URL",
             ("proxy", "--storage", postgres_url, "--port", str(taken.port)): "cannot listen there",
             ("best", study_file(SHORT), "--storage", "grpc://127.0.0.1:1"): "no storage proxy answers there"}
    for args, message in cases.items():
        r = hpo_main(*args)
        lines = [line for line in r.stderr.splitlines() if line.startswith("hpo: ")]
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], (args, r.stderr)
