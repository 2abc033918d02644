"""The storage suite: hpo/storages/ (rdb, retries, locks) on each database hpo coordinates workers
on (SQLite, PostgreSQL, MariaDB), each test given a fresh one by StorageSupplier, as Optuna's own
storage tests get theirs.

1. SQLite's locks: only writes take the write lock up front.
2. The wrapped calls: every call that reaches the database rides out a lost connection; any other
   error is a DatabaseError at once, in the database's own words.
3. Transient failures, ridden out. A cut connection is the servers' (CutProxy drops every connection
   and refuses new ones). SQLite has no connection to lose: its transient failure is another process
   holding the write lock, which a write waits out on the busy timeout (held too long, it fails: 2.).
4. The study lock: two processes contend for real; a waiter waits while the holder lives; the lock is
   the server's own (pg_advisory_lock, GET_LOCK), and a wait the server ends is an error, never the lock.
5. Heartbeats: a trial silent past the grace period is failed and queued again, once, by the callback.
6. Bad settings, pickling, and processes opening one new database at the same instant.
7. A worker's hot path: the trials it takes, kept in memory, read as the database holds them.

Processes are forked: they start at once with hpo imported, where a new interpreter takes seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import multiprocessing
import pickle
import queue
import sqlite3
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from conftest import KINDS, SERVERS, CutProxy, fresh_database
from optuna.distributions import FloatDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import event

import hpo.storages.rdb as hs
from hpo.storages.locks import study_lock
from hpo.storages.retries import DatabaseError, Liveness, StorageError, mask

MAXIMIZE = [StudyDirection.MAXIMIZE]
WRITES = ("INSERT", "UPDATE", "DELETE")
FORK = multiprocessing.get_context("fork")
PORTS = {"postgresql": 5432, "mysql": 3306}


class StorageSupplier(contextlib.AbstractContextManager):
    """A fresh storage of one kind, opened by ``open_storage(url, liveness=Liveness(**kwargs))``, as in Optuna's
    optuna/testing/storages.py: ``with StorageSupplier("mysql", tmp_path, db_timeout=10) as storage``.
    ``.url`` is the storage's URL; with ``cuttable`` it reaches the server through ``.proxy``, a CutProxy."""

    def __init__(self, kind: str, tmp_path: Path, cuttable: bool = False, **kwargs: Any) -> None:
        self.kind, self.tmp_path, self.cuttable, self.kwargs = kind, tmp_path, cuttable, kwargs
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> hs.ResilientRDBStorage:
        self.url = self.stack.enter_context(fresh_database(self.kind, self.tmp_path))
        if self.cuttable:
            server = sqlalchemy.engine.make_url(self.url)
            self.proxy = CutProxy((server.host, server.port or PORTS[self.kind]))
            self.stack.callback(self.proxy.close)
            self.url = server.set(host="127.0.0.1", port=self.proxy.port).render_as_string(hide_password=False)
        storage = hs.open_storage(self.url, liveness=Liveness(**self.kwargs))
        self.stack.callback(storage.engine.dispose)  # before the database is dropped
        return storage

    def __exit__(self, *exc: object) -> None:
        self.stack.close()


def _report(results: multiprocessing.Queue, index: int, fn: Callable[..., Any], *args: Any) -> None:
    try:
        results.put((index, True, fn(*args)))
    except BaseException:
        results.put((index, False, traceback.format_exc()))


@contextlib.contextmanager
def forked(*calls: tuple, timeout: float = 60) -> Iterator[list]:
    """Each ``(fn, *args)`` runs in a forked process while the block runs; after it, the yielded list
    holds their results in order. A process that raises, dies or does not report in time fails the test."""
    results = FORK.Queue()
    procs = [FORK.Process(target=_report, args=(results, i, *call), daemon=True) for i, call in enumerate(calls)]
    for p in procs:
        p.start()
    out: list = []
    try:
        yield out
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(procs):
            try:
                index, ok, value = results.get(timeout=0.2)
            except queue.Empty:
                dead = {i: p.exitcode for i, p in enumerate(procs) if i not in got and p.exitcode not in (None, 0)}
                assert not dead and time.monotonic() < deadline, \
                    f"{len(procs) - len(got)} of {len(procs)} processes did not report in {timeout}s; exit codes {dead}"
                continue
            assert ok, f"process {index} failed:\n{value}"
            got[index] = value
        out.extend(got[i] for i in range(len(procs)))
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.exitcode is None:
                p.kill()
                p.join()


class InThread:
    """``fn()`` running in a thread; ``done(timeout)`` says whether it finished by then, and raises what it raised."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except BaseException as e:
            self.error = e

    def done(self, timeout: float) -> bool:
        self.thread.join(timeout)
        if self.error is not None:
            raise self.error
        return not self.thread.is_alive()


def sqlite_storage(tmp_path, monkeypatch, db_timeout: float = 0) -> hs.ResilientRDBStorage:
    """A storage on a SQLite file whose writers give up on a held lock after 2 s, not 60 s."""
    monkeypatch.setattr(hs, "SQLITE_BUSY_TIMEOUT", 2)
    return hs.open_storage(f"sqlite:///{tmp_path / 'study.db'}", liveness=Liveness(db_timeout=db_timeout))


def transactions(storage: hs.ResilientRDBStorage, call: Callable[[], object]) -> list[list[str]]:
    """The SQL statements ``call`` sends, one list per transaction (each begins at a BEGIN)."""
    sent: list[list[str]] = []

    def record(_conn, _cursor, statement: str, *_) -> None:
        if statement.startswith("BEGIN") or not sent:
            sent.append([])
        sent[-1].append(statement)

    event.listen(storage.engine, "before_cursor_execute", record)
    try:
        call()
    finally:
        event.remove(storage.engine, "before_cursor_execute", record)
    return sent


def begins(storage: hs.ResilientRDBStorage, call: Callable[[], object]) -> list[str]:
    return [t[0] for t in transactions(storage, call)]


# 1. SQLite: only writes take the write lock up front.

def test_a_write_goes_through_while_the_same_thread_holds_a_read_open(tmp_path, monkeypatch):
    storage = sqlite_storage(tmp_path, monkeypatch)
    study_id = storage.create_new_study(MAXIMIZE, "s")
    with storage.engine.connect() as reader:
        reader.exec_driver_sql("SELECT count(*) FROM studies").scalar()
        storage.set_study_user_attr(study_id, "k", 1)  # waiting on the lock would raise after 2 s
    assert storage.get_study_user_attrs(study_id) == {"k": 1}


def test_optunas_schema_check_passes_on_an_open_storage(tmp_path, monkeypatch):
    """It reads in a session, then opens a second connection to read the alembic version."""
    storage = sqlite_storage(tmp_path, monkeypatch)
    storage._version_manager.check_table_schema_compatibility()


def test_readers_go_on_while_a_write_is_open(tmp_path, monkeypatch):
    storage = sqlite_storage(tmp_path, monkeypatch)
    study_id = storage.create_new_study(MAXIMIZE, "s")
    with storage.engine.connect() as writer:
        writer.exec_driver_sql("INSERT INTO study_user_attributes (study_id, key, value_json) VALUES (?, 'k', '1')",
                               (study_id,))
        assert storage.get_study_user_attrs(study_id) == {}  # the last commit, not the open write


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask/tell without optimize, on purpose
def test_every_optuna_write_takes_the_lock_up_front_and_reads_do_not(tmp_path, monkeypatch):
    """A deferred transaction that reads and then writes fails at once with 'database is locked' when
    another process committed meanwhile; so each transaction that writes must begin IMMEDIATE."""
    storage = sqlite_storage(tmp_path, monkeypatch)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")

    def work() -> None:
        optuna.create_study(study_name="s", storage=storage, direction="maximize", load_if_exists=True)
        study.set_user_attr("k", 1)
        study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params={"x": 0.1},
                                                  distributions={"x": FloatDistribution(0, 1)}))
        study.enqueue_trial({"x": 0.2})
        for _ in range(3):
            trial = study.ask()
            storage.record_heartbeat(trial._trial_id)
            storage.record_heartbeat(trial._trial_id)
            x = trial.suggest_float("x", 0, 1)
            trial.report(x, 1)
            trial.set_user_attr("history", [x])
            study.tell(trial, x)
        hs.fail_stale_trials(study)

    def read() -> None:
        assert study.trials and study.best_trial and study.user_attrs
        optuna.get_all_study_summaries(storage)
        optuna.load_study(study_name="s", storage=storage)

    def written(sent: list[list[str]]) -> list[list[str]]:
        return [t for t in sent if any(s.startswith(WRITES) for s in t)]

    work_writes = written(transactions(storage, work))
    assert len(work_writes) > 15 and {t[0] for t in work_writes} == {"BEGIN IMMEDIATE"}, work_writes
    assert set(begins(storage, read)) == {"BEGIN"}
    delete_writes = written(transactions(storage, lambda: optuna.delete_study(study_name="s", storage=storage)))
    assert delete_writes and {t[0] for t in delete_writes} == {"BEGIN IMMEDIATE"}, delete_writes


# 2. The wrapped calls: a lost connection is retried; any other database error fails at once, in its own words.

# RDBStorage's public methods that reach the database only through wrapped ones, or only while opening
# (the schema version), where a wrong URL must fail at once.
NOT_WRAPPED = {"check_trial_is_updatable", "get_best_trial", "get_trial_params", "get_heartbeat_interval",
               "get_heartbeat_stale_trial_callback", "remove_session", "upgrade", "get_current_version",
               "get_head_version", "get_all_versions"}


def test_every_call_that_reaches_the_database_is_wrapped_once_as_a_read_or_a_write():
    """A method that Optuna adds fails this until it is listed: unlisted, it would not ride out an outage.
    (Which list it is on decides SQLite's BEGIN: test_every_optuna_write_takes_the_lock_up_front...)"""
    public = {name for cls in (optuna.storages.BaseStorage, optuna.storages.RDBStorage)
              for name, attr in vars(cls).items() if callable(attr) and not name.startswith("_")}
    wrapped = {name for name, attr in vars(hs._RetryingRDBStorage).items() if hasattr(attr, "__wrapped__")}
    assert public - wrapped == NOT_WRAPPED
    assert wrapped == set(hs._READS + hs._WRITES) and len(wrapped) == len(hs._READS) + len(hs._WRITES)


def drop_trials(storage: hs.ResilientRDBStorage) -> None:
    """Remove the trials table from under the storage, through another connection."""
    backend = storage.engine.dialect.name
    with storage.engine.begin() as conn:
        if backend == "mysql":
            conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")
        conn.exec_driver_sql("DROP TABLE trials CASCADE" if backend == "postgresql" else "DROP TABLE trials")


@pytest.mark.parametrize("kind", KINDS)
def test_a_missing_table_fails_at_once_in_the_databases_words(kind, tmp_path):
    with StorageSupplier(kind, tmp_path, db_timeout=10) as storage:
        study_id = storage.create_new_study(MAXIMIZE, "s")
        trial_id = storage.create_new_trial(study_id)
        drop_trials(storage)
        missing = {"sqlite": "no such table: trials", "postgresql": 'relation "trials" does not exist',
                   "mysql": "trials' doesn't exist"}[kind]
        # a read, and a write (not create_new_trial: Optuna retries its errors 5 times itself, for seconds)
        for call in (lambda: storage.get_all_trials(study_id), lambda: storage.set_trial_user_attr(trial_id, "k", 1)):
            t0 = time.monotonic()
            with pytest.raises(StorageError) as info:
                call()
            assert time.monotonic() - t0 < 5, str(info.value)  # not 10 s of retries
            reason = str(info.value)
            assert reason.startswith(f"the database at {mask(storage.url)} failed: ") and missing in reason
            assert type(info.value) is DatabaseError and "\n" not in reason


def test_a_read_only_sqlite_file_fails_at_once(tmp_path):
    path = tmp_path / "study.db"
    study_id = hs.open_storage(f"sqlite:///{path}").create_new_study(MAXIMIZE, "s")
    url = f"sqlite:///file:{path}?mode=ro&uri=true"
    storage = hs.open_storage(url, liveness=Liveness(db_timeout=10))
    assert storage.get_study_user_attrs(study_id) == {}  # reading is fine
    t0 = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.set_study_user_attr(study_id, "k", 1)
    assert time.monotonic() - t0 < 5, str(info.value)  # not 10 s of retries
    assert str(info.value) == f"the database at {mask(url)} failed: attempt to write a readonly database"
    assert type(info.value) is DatabaseError


def test_a_sqlite_lock_held_too_long_fails_once_the_busy_timeout_is_over(tmp_path, monkeypatch):
    storage = sqlite_storage(tmp_path, monkeypatch, db_timeout=10)
    study_id = storage.create_new_study(MAXIMIZE, "s")
    with storage.engine.connect() as writer:
        writer.exec_driver_sql("INSERT INTO study_user_attributes (study_id, key, value_json) VALUES (?, 'a', '1')",
                               (study_id,))
        t0 = time.monotonic()
        with pytest.raises(StorageError) as info:
            storage.set_study_user_attr(study_id, "k", 1)
        assert time.monotonic() - t0 < 5, str(info.value)  # the 2 s busy timeout, not 10 s of retries
    assert str(info.value) == f"the database at {mask(storage.url)} failed: database is locked"


# A URL query after which the server ends a statement that waits on a lock: PostgreSQL after 0.3 s; MariaDB
# a row lock's wait after 1 s, any statement (GET_LOCK's wait among them) after 2 s.
LIMITS = {"postgresql": "?options=-c%20lock_timeout%3D300",
          "mysql": "?init_command=SET%20SESSION%20innodb_lock_wait_timeout%3D1%2C%20SESSION%20max_statement_time%3D2"}


@pytest.mark.parametrize("kind, hold, call, words", [
    ("postgresql", "LOCK TABLE studies IN ACCESS EXCLUSIVE MODE", lambda s, study_id: s.get_study_user_attrs(study_id),
     "canceling statement due to lock timeout"),
    ("mysql", "SELECT * FROM studies FOR UPDATE", lambda s, study_id: s.set_study_user_attr(study_id, "k", 1),
     "(1205, 'Lock wait timeout exceeded; try restarting transaction')"),
], ids=SERVERS)
def test_a_lock_timeout_is_not_a_lost_connection(kind, hold, call, words, tmp_path):
    supplier = StorageSupplier(kind, tmp_path)
    with supplier as other:
        url = supplier.url + LIMITS[kind]
        storage = hs.open_storage(url, liveness=Liveness(db_timeout=10))
        study_id = storage.create_new_study(MAXIMIZE, "s")
        with other.engine.connect() as conn:
            conn.exec_driver_sql(hold)  # held until the connection's transaction ends
            t0 = time.monotonic()
            with pytest.raises(StorageError) as info:
                call(storage, study_id)
            assert time.monotonic() - t0 < 5, str(info.value)  # not 10 s of retries
        storage.engine.dispose()
    assert str(info.value) == f"the database at {mask(url)} failed: {words}"


@pytest.mark.parametrize("kind", KINDS)
def test_optunas_own_exceptions_pass_through(kind, tmp_path):
    with StorageSupplier(kind, tmp_path, db_timeout=5) as storage:
        study_id = storage.create_new_study(MAXIMIZE, "s")
        with pytest.raises(optuna.exceptions.DuplicatedStudyError):
            storage.create_new_study(MAXIMIZE, "s")
        with pytest.raises(KeyError):
            storage.get_study_id_from_name("nope")
        trial_id = storage.create_new_trial(study_id)
        storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [1.0])
        with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
            storage.set_trial_user_attr(trial_id, "k", 1)


# 3. Transient failures, ridden out: a cut connection (the servers), a write lock held a while (SQLite).

def take_lock(storage: hs.ResilientRDBStorage, name: str = "s") -> None:
    with study_lock(storage, name):
        pass


def across_a_cut(proxy: CutProxy, seconds: float, call: Callable[[], Any]) -> Any:
    """``call()``, made while every connection is cut for ``seconds``; it must wait for the database to come back."""
    proxy.cut()
    threading.Timer(seconds, proxy.restore).start()
    t0 = time.monotonic()
    result = call()
    waited = time.monotonic() - t0
    assert waited > 0.75 * seconds, f"returned after {waited:.1f}s of a {seconds}s cut"
    return result


@pytest.mark.parametrize("kind", SERVERS)
def test_a_cut_connection_is_still_retried(kind, tmp_path):
    supplier = StorageSupplier(kind, tmp_path, cuttable=True, db_timeout=30)
    with supplier as storage:
        study_id = storage.create_new_study(MAXIMIZE, "s")
        assert across_a_cut(supplier.proxy, 1, lambda: storage.get_all_trials(study_id)) == []
        across_a_cut(supplier.proxy, 1, lambda: storage.set_study_user_attr(study_id, "k", 1))
        assert storage.get_study_user_attrs(study_id) == {"k": 1}
        across_a_cut(supplier.proxy, 1, lambda: take_lock(storage))
        with study_lock(storage, "s"):
            supplier.proxy.cut()  # the lock's session ends, and the server gives its lock back
        supplier.proxy.restore()
        assert InThread(lambda: take_lock(storage)).done(10), "the server kept the lock of a cut connection"


def hold_sqlite_write_lock(path: str, holding: Event, seconds: float) -> float:
    """Another process's write transaction, open for ``seconds``; returns when it began to commit."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    holding.set()
    time.sleep(seconds)
    committing = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process on Linux
    conn.execute("COMMIT")
    return committing


def test_a_sqlite_write_waits_out_another_processs_write_lock(tmp_path):
    supplier = StorageSupplier("sqlite", tmp_path, db_timeout=10)
    with supplier as storage:
        study_id = storage.create_new_study(MAXIMIZE, "s")
        holding = FORK.Event()
        with forked((hold_sqlite_write_lock, sqlalchemy.engine.make_url(supplier.url).database, holding, 1)) as out:
            assert holding.wait(30), "the other process never took the write lock"
            storage.set_study_user_attr(study_id, "k", 1)
            written = time.monotonic()
        assert written > out[0] and storage.get_study_user_attrs(study_id) == {"k": 1}


# 4. The study lock.

HOLD = 0.05  # seconds a turn holds the lock: long against a database call


def take_turns(url: str, start: Barrier, turns: int) -> list[tuple[float, float, float]]:
    """A worker process: ``turns`` times, under the study lock, read the study's count, pause, and write it
    plus one (updates are lost unless the lock excludes the other); returns (asked, entered, left) of each."""
    storage = hs.open_storage(url, liveness=Liveness(db_timeout=10))
    study_id = storage.get_study_id_from_name("s")
    start.wait(timeout=30)
    times = []
    for _ in range(turns):
        asked = time.monotonic()
        with study_lock(storage, "s"):
            entered = time.monotonic()
            count = storage.get_study_user_attrs(study_id)["count"]
            time.sleep(HOLD)
            storage.set_study_user_attr(study_id, "count", count + 1)
            left = time.monotonic()
        times.append((asked, entered, left))
        time.sleep(HOLD / 5)  # most often the other's turn now
    return times


@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_contending_for_the_study_lock_take_turns(kind, tmp_path):
    supplier = StorageSupplier(kind, tmp_path)
    with supplier as storage:
        study_id = storage.create_new_study(MAXIMIZE, "s")
        storage.set_study_user_attr(study_id, "count", 0)
        start = FORK.Barrier(2)
        with forked((take_turns, supplier.url, start, 4), (take_turns, supplier.url, start, 4)) as results:
            pass
        assert storage.get_study_user_attrs(study_id)["count"] == 8  # no update lost
    # on CLOCK_MONOTONIC, one clock for every process on Linux
    turns = sorted((entered, left, asked, who) for who, times in enumerate(results) for asked, entered, left in times)
    assert all(left <= entered for (_, left, _, _), (entered, *_) in itertools.pairwise(turns)), turns  # never both in
    assert any(asked < left <= entered for entered, _, asked, who in turns  # one asked while the other held it,
               for _, left, _, other in turns if other != who), turns  # and entered once the other had left


def held_on_the_server(url: str, name: str) -> bool:
    """Whether another session of the server (any machine's) sees hpo's lock on ``name`` held. PostgreSQL:
    any advisory lock in the test's own database; MariaDB: GET_LOCK's name for it, which is server-wide."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)  # hpo's key for it
    query = {"postgresql": "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
                           "database = (SELECT oid FROM pg_database WHERE datname = current_database())",
             "mysql": f"SELECT IS_USED_LOCK('hpo-{key}') IS NOT NULL"}[engine.dialect.name]
    try:
        with engine.connect() as conn:
            return bool(conn.exec_driver_sql(query).scalar())
    finally:
        engine.dispose()


def hold_until_killed(url: str, holding: Event) -> None:
    with study_lock(hs.open_storage(url), "s"):
        holding.set()
        time.sleep(60)


@pytest.mark.parametrize("kind", KINDS)
def test_a_waiter_gets_the_study_lock_only_once_its_holder_died(kind, tmp_path):
    """Its session (or its file) goes with the process: a dead worker does not block the study."""
    supplier = StorageSupplier(kind, tmp_path, db_timeout=10)
    with supplier as storage:
        holding = FORK.Event()
        holder = FORK.Process(target=hold_until_killed, args=(supplier.url, holding), daemon=True)
        holder.start()
        try:
            assert holding.wait(30), "the other process never took the lock"
            assert kind == "sqlite" or held_on_the_server(supplier.url, "s")  # the server's own lock
            waiter = InThread(lambda: take_lock(storage))
            assert not waiter.done(1), "entered while another process held the lock"
        finally:
            holder.kill()
            holder.join()
        assert waiter.done(10), "the lock of a killed process was never given back"
        assert kind == "sqlite" or not held_on_the_server(supplier.url, "s")


@pytest.mark.parametrize("kind", SERVERS)
def test_a_lock_wait_the_server_ends_is_an_error_never_the_lock(kind, tmp_path):
    """MariaDB's GET_LOCK gives NULL, not an error, when the server ends its wait (max_statement_time,
    KILL QUERY): taken for the lock, two processes would be inside at once."""
    supplier = StorageSupplier(kind, tmp_path)
    entered = False
    with supplier as storage, study_lock(storage, "s"):
        impatient = hs.open_storage(supplier.url + LIMITS[kind], liveness=Liveness(db_timeout=10))
        with pytest.raises(DatabaseError) as info, study_lock(impatient, "s"):
            entered = True
        impatient.engine.dispose()
    assert not entered
    words = {"postgresql": "canceling statement due to lock timeout", "mysql": "GET_LOCK gave NULL"}[kind]
    assert str(info.value).startswith(f"the database at {mask(impatient.url)} failed: ") and words in str(info.value)


# 5. Heartbeats, and the retry of a dead worker's trial.

def reap(url: str, start: Barrier) -> list[tuple[int, str]]:
    """A worker process, reaping at the same instant as another: fail_stale_trials, with a callback that
    records what it was given and queues the trial again under the study lock, as hpo.study.queue.requeue does."""
    seen = []

    def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
        seen.append((trial.number, trial.state.name))
        with study_lock(storage, study.study_name):
            study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params=trial.params,
                                                      distributions=trial.distributions,
                                                      user_attrs={"retry_of": trial.number}))

    storage = hs.open_storage(url, requeue, Liveness(heartbeat=1, grace=2, db_timeout=10))
    study = optuna.load_study(study_name="s", storage=storage)
    start.wait(timeout=30)
    hs.fail_stale_trials(study)
    return seen


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask without optimize, on purpose
@pytest.mark.parametrize("kind", KINDS)
def test_a_trial_silent_past_the_grace_period_is_failed_and_queued_again_once(kind, tmp_path):
    supplier = StorageSupplier(kind, tmp_path, heartbeat=1, grace=2, db_timeout=10)
    with supplier as storage:
        study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
        silent, beating = (study.ask({"x": FloatDistribution(0, 1)}) for _ in range(2))
        since = time.monotonic()
        storage.record_heartbeat(silent._trial_id)
        stale: list[int] = []
        while silent._trial_id not in stale:
            assert time.monotonic() - since < 10, "a trial silent for 10 s never went stale"
            storage.record_heartbeat(beating._trial_id)
            stale = storage._get_stale_trial_ids(study._study_id)
            assert beating._trial_id not in stale
            time.sleep(0.1)
        assert time.monotonic() - since > 2  # not before the grace period
        storage.set_trial_state_values(beating._trial_id, TrialState.COMPLETE, [0.5])
        start = FORK.Barrier(2)
        with forked((reap, supplier.url, start), (reap, supplier.url, start)) as seen:
            pass
        assert sorted(seen) == [[], [(silent.number, "FAIL")]]  # one of them failed it, and queued it again
        trials = storage.get_all_trials(study._study_id)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.WAITING]
    assert trials[2].params == trials[0].params and trials[2].user_attrs == {"retry_of": silent.number}


# 6. Bad settings are the caller's, a pickled storage keeps its SQLite settings, and processes that open
# one new database at the same instant all succeed.

@pytest.mark.parametrize("kwargs, message", [
    ({"heartbeat": 0}, "--heartbeat must be a positive integer (seconds), got 0"),
    ({"grace": -30}, "--grace must be a positive integer (seconds), got -30"),
    ({"grace": 2.5}, "--grace must be a positive integer (seconds), got 2.5"),
    ({"heartbeat": True}, "--heartbeat must be a positive integer (seconds), got True"),
    ({"heartbeat": 10, "grace": 10}, "--grace (10s) must be longer than --heartbeat (10s)"),
    ({"db_timeout": -1}, "--db-timeout must be 0 (give up at once) or more seconds, got -1"),
    ({"db_timeout": math.inf}, "--db-timeout must be 0 (give up at once) or more seconds, got inf"),
    ({"db_timeout": math.nan}, "--db-timeout must be 0 (give up at once) or more seconds, got nan"),
])
def test_bad_settings_are_value_errors_before_anything_is_opened(tmp_path, kwargs, message):
    with pytest.raises(ValueError) as info:
        hs.open_storage(f"sqlite:///{tmp_path / 'study.db'}", liveness=Liveness(**kwargs))
    assert str(info.value) == message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("grace, message", [(1, "--grace must be 2 or more seconds, got 1"),
                                            (3.0, "--grace must be 2 or more seconds, got 3.0")])
def test_a_proxy_looks_for_silent_trials_more_often_than_its_grace_period(grace, message):
    assert Liveness.watching(2) == Liveness(heartbeat=1, grace=2)
    assert Liveness.watching(300, 7) == Liveness(heartbeat=10, grace=300, db_timeout=7)
    with pytest.raises(ValueError) as info:
        Liveness.watching(grace)
    assert str(info.value) == message


def test_a_pickled_storage_keeps_its_sqlite_settings(tmp_path, monkeypatch):
    storage = sqlite_storage(tmp_path, monkeypatch, db_timeout=7)
    study_id = storage.create_new_study(MAXIMIZE, "s")
    copy = pickle.loads(pickle.dumps(storage))
    assert begins(copy, lambda: copy.set_study_user_attr(study_id, "k", 1)) == ["BEGIN IMMEDIATE"]
    assert begins(copy, lambda: copy.get_study_user_attrs(study_id)) == ["BEGIN"]
    with copy.engine.connect() as reader:
        reader.exec_driver_sql("SELECT count(*) FROM studies").scalar()
        copy.set_study_user_attr(study_id, "k", 2)
    assert copy.get_study_user_attrs(study_id) == {"k": 2} and copy.db_timeout == 7
    assert event.contains(copy.engine, "connect", hs._sqlite_connect)
    assert event.contains(copy.engine, "begin", hs._sqlite_begin)


def open_at_once(url: str, start: Barrier) -> None:
    start.wait(timeout=30)
    optuna.create_study(study_name="s", storage=hs.open_storage(url), load_if_exists=True)


@pytest.mark.parametrize("kind", KINDS)
def test_processes_opening_a_new_database_at_once_all_succeed(kind, tmp_path):
    with fresh_database(kind, tmp_path) as url:
        start = FORK.Barrier(6)
        with forked(*[(open_at_once, url, start)] * 6) as errors:  # a process that raised fails the test
            pass
        assert errors == [None] * 6
        assert optuna.get_all_study_names(url) == ["s"]


# 7. A worker's hot path (hpo/storages/owned.py): the queue filled and read in a few statements, the trials a
# worker takes kept in memory as it writes them, and what it keeps is what the database holds.

@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask without optimize, on purpose
@pytest.mark.parametrize("kind", KINDS)
def test_a_taken_trial_kept_in_memory_reads_as_the_database_holds_it(kind, tmp_path):
    x = FloatDistribution(0, 1)
    with StorageSupplier(kind, tmp_path) as storage:
        study_id = storage.create_new_study(MAXIMIZE, "s")
        optuna.create_study(storage=storage, study_name="t").ask()  # another study's trial: not numbered with these
        storage.create_waiting_trials(study_id, [({"x": 0.25}, {"draw": 0}), ({"x": 0.5}, {"draw": 1})], {"x": x})
        other = hs.open_storage(storage.url)  # another process's view: nothing kept in memory
        try:
            first, second = storage.waiting_trial_ids(study_id, 8)
            assert [(t.number, t.params, t.user_attrs, t.state) for t in map(other.get_trial, (first, second))] == [
                (0, {"x": 0.25}, {"draw": 0}, TrialState.WAITING), (1, {"x": 0.5}, {"draw": 1}, TrialState.WAITING)]
            assert storage.set_trial_state_values(first, TrialState.RUNNING)
            assert not other.set_trial_state_values(first, TrialState.RUNNING)  # taken once, whoever asks
            assert storage.waiting_trial_ids(study_id, 8) == [second]
            storage.set_trial_user_attrs(first, {"a": 1, "b": [2, 3]})
            storage.set_trial_system_attr(first, "k", "v")
            storage.set_trial_intermediate_value(first, 1, 0.5)
            storage.set_trial_param(first, "y", 1.5, FloatDistribution(0, 2))
            assert storage.get_trial(first) == other.get_trial(first)
            storage.set_trial_state_values(first, TrialState.COMPLETE, [0.75])
            assert storage.get_trial(first) == other.get_trial(first)  # its end as the database stamped it
            assert other.set_trial_state_values(second, TrialState.RUNNING)  # taken elsewhere: nothing kept here
            other.set_trial_user_attr(second, "c", 4)
            assert storage.get_trial(second) == other.get_trial(second)
        finally:
            other.engine.dispose()
