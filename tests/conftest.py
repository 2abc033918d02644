"""Shared fixtures: small real data made on the fly (a fresh checkout has no ../shared)."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

XDIST = bool(os.environ.get("PYTEST_XDIST_WORKER"))  # the suite runs on two workers (pyproject's addopts)
if XDIST:  # before torch loads OpenMP: one thread in each worker and in each hpo process a test starts
    # (two workers on two cores: more threads only wait for each other), whose waiting threads sleep soon
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

# A shell starts background jobs (`nohup pytest &`) with SIGINT ignored, and an ignored signal stays ignored in
# every process the tests start: the Ctrl-C tests would then wait for nothing. A handler here is reset to the
# default when a child execs, so each hpo process takes Ctrl-C as it does from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

SMALL_DATA = """
[data]
path = "synthetic"
train_size = 600
val_size = 200
subset_size = 300
"""
FULL_DATA = SMALL_DATA + 'train_on = "full"\n'  # 600 training images


# Device tests run on the CPU everywhere and on CUDA where there is one (bench/gpu.sh: pytest -m cuda).
ON_CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="no CUDA device here")])
DEVICES = ["cpu", ON_CUDA]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session decodes into its own cache, never the user's ~/.cache/hpo."""
    monkeypatch.setenv("HPO_CACHE", str(tmp_path_factory.getbasetemp() / "hpo-cache"))


@pytest.fixture
def study_file(tmp_path: Path):
    """Write a study file (TOML text) on top of the small synthetic data section."""

    def write(body: str = "", name: str = "small", data: str = SMALL_DATA) -> Path:
        # Plain keys (augment) must precede tables in TOML, so the body's leading lines go first.
        path = tmp_path / f"{name}.toml"
        path.write_text(body + "\n" + data)
        return path

    return write


# The study that tests of what reads a finished study share (report, retrain, the dashboard, a
# pipeline after a search): trained once per test run, copied into each test.
TRAINED_STUDY = """augment = "none"
[study]
n_trials = 4
[train]
epochs = 3
[search]
"train.lr" = [0.01, 0.003, 0.001]
"train.batch_size" = [32, 64]
"""


@pytest.fixture(scope="session")
def _trained_study(tmp_path_factory) -> Path:
    """TRAINED_STUDY run by `hpo run` as a user runs it (gate included), once for the two xdist workers
    together: the first to come trains it under a lock, in the folder the run's workers share."""
    root = tmp_path_factory.getbasetemp()
    shared = (root.parent if XDIST else root) / "trained-study"
    shared.mkdir(exist_ok=True)
    with open(shared.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not shared.with_suffix(".done").exists():  # a worker whose training failed leaves none
            path = shared / "small.toml"
            path.write_text(TRAINED_STUDY + SMALL_DATA)
            r = hpo_cli("run", path, "--storage", f"sqlite:///{shared / 'study.db'}", "--device", "cpu",
                        "--out", shared / "runs", "--artifacts", shared / "art")
            assert r.returncode == 0, r.stderr
            shared.with_suffix(".done").touch()
    return shared


@pytest.fixture
def finished_study(_trained_study, tmp_path) -> tuple[Path, Path, str]:
    """A copy of the trained study for one test to read and add to: (its folder, with the run folders
    and the artifact store ``art``; the study file; the storage URL)."""
    copy = tmp_path / "study"
    shutil.copytree(_trained_study, copy)
    return copy, copy / "small.toml", f"sqlite:///{copy / 'study.db'}"


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A tiny ImageFolder dataset of real PNG files: 3 classes, 8 train and 4 test images each."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for split, n in (("train", 8), ("test", 4)):
        for c in ("ant", "bee", "cow"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


ADMIN_ENV = {"postgresql": "HPO_TEST_POSTGRES", "mysql": "HPO_TEST_MYSQL"}
SERVER_NAMES = {"postgresql": "PostgreSQL", "mysql": "MariaDB (or MySQL)"}
PG_ADMIN = os.environ.get(ADMIN_ENV["postgresql"], "postgresql://postgres@127.0.0.1:5432/postgres")
MYSQL_ADMIN = os.environ.get(ADMIN_ENV["mysql"], "mysql+pymysql://root@127.0.0.1:3306/")
KINDS = ["sqlite", "postgresql", "mysql"]  # the databases hpo coordinates workers on; CI runs both servers
SERVERS = KINDS[1:]
ADMIN_URLS = {"postgresql": PG_ADMIN.replace("postgresql://", "postgresql+psycopg://", 1), "mysql": MYSQL_ADMIN}


@contextlib.contextmanager
def fresh_database(kind: str, tmp_path: Path) -> Iterator[str]:
    """The URL of a new, empty database of ``kind``: a file under ``tmp_path``, or a database on the
    real server, dropped afterwards."""
    import sqlalchemy

    name = f"hpo_test_{uuid.uuid4().hex[:10]}"
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / name}.db"
        return
    admin_url = sqlalchemy.engine.make_url(ADMIN_URLS[kind])
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
    except sqlalchemy.exc.OperationalError as e:
        pytest.fail(f"no {SERVER_NAMES[kind]} at {admin_url.render_as_string()}: the storage tests need a real server "
                    f"({type(e.orig).__name__}); start one, or point {ADMIN_ENV[kind]} at one (README, Set-up)",
                    pytrace=False)
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            if kind == "mysql":  # a session left in a transaction would hold DROP DATABASE up (PostgreSQL: FORCE)
                query = f"SELECT id FROM information_schema.processlist WHERE db = '{name}'"
                for (session,) in conn.exec_driver_sql(query).all():
                    with contextlib.suppress(sqlalchemy.exc.DBAPIError):  # it ended meanwhile
                        conn.exec_driver_sql(f"KILL {session}")
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}" + (" WITH (FORCE)" if kind == "postgresql" else ""))
        admin.dispose()


@pytest.fixture
def postgres_url(tmp_path):
    """A new, empty database on the real PostgreSQL server, dropped afterwards."""
    with fresh_database("postgresql", tmp_path) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    """A fresh, real database of each kind: a SQLite file, or a new PostgreSQL database."""
    with fresh_database(request.param, tmp_path) as url:
        yield url


class CutProxy:
    """A TCP proxy in front of a database server (PostgreSQL unless told) that can cut every connection,
    as an outage does."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432)):
        self.target, self.up, self.sockets = target, True, []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.up = False
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.sockets = []

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self.server.close()


@pytest.fixture
def proxy():
    p = CutProxy()
    yield p
    p.close()


def hpo_cli(*args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """``hpo`` as a user runs it: a real process."""
    return subprocess.run([sys.executable, "-m", "hpo.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, timeout=timeout)


def hpo_main(*args, cwd=None) -> subprocess.CompletedProcess:
    """``hpo`` in this process (``hpo.cli.main``), for tests of validation and messages: the exit code
    and the lines a real process prints, without its start-up. Tests of signals, kills and separate
    processes use :func:`hpo_cli`."""
    from hpo.cli import main

    out, err, sigterm = io.StringIO(), io.StringIO(), signal.getsignal(signal.SIGTERM)
    with contextlib.chdir(cwd or os.getcwd()), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            code = e.code
        finally:
            signal.signal(signal.SIGTERM, sigterm)  # main() takes SIGTERM as Ctrl-C
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def stop(proc: subprocess.Popen, grace: float = 30) -> None:
    """A test's own process ended, whatever it is doing: SIGTERM, as a user stops it, then SIGKILL after
    ``grace`` seconds (a loaded machine can hold a clean shutdown up), so no teardown waits forever."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def browser_paths() -> tuple[str, str]:
    """Chromium and its chromedriver, which the dashboard test drives; a test fails in one line without them."""
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail(f"no {'chromium' if not chromium else 'chromedriver'} on PATH: the dashboard test drives a real "
                    f"browser; install it (Debian: apt-get install chromium chromium-driver)", pytrace=False)
    return chromium, driver


def first_checkpoint(out: Path, proc: subprocess.Popen) -> None:
    """Until a trial under ``out`` has written its first last.pt: mid-training, with something to resume.
    The files, not the database, are watched: a poll must be quick, or the trials end before it sees one."""
    deadline = time.time() + 120
    while not list(out.glob("*/*/last.pt")):
        assert time.time() < deadline and proc.poll() is None, "no trial was seen mid-training"
        time.sleep(0.05)
