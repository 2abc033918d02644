"""The storage layer on its own: SQLite's read and write locks, which database errors are retried,
bad settings, pickling, and processes that open one empty database at the same instant."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable

import optuna
import pytest
import sqlalchemy
from conftest import CutProxy
from optuna.distributions import FloatDistribution
from optuna.study import StudyDirection
from optuna.trial import TrialState
from sqlalchemy import event

import hpo.storage as hs

MAXIMIZE = [StudyDirection.MAXIMIZE]
WRITES = ("INSERT", "UPDATE", "DELETE")


@pytest.fixture
def mysql_url():
    """A new, empty database on the real MariaDB server, dropped afterwards."""
    import pymysql

    name = f"hpo_test_{uuid.uuid4().hex[:10]}"
    with pymysql.connect(host="127.0.0.1", user="root") as conn:
        conn.cursor().execute(f"CREATE DATABASE {name}")
    yield f"mysql+pymysql://root@127.0.0.1:3306/{name}"
    with pymysql.connect(host="127.0.0.1", user="root") as conn:
        conn.cursor().execute(f"DROP DATABASE IF EXISTS {name}")


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def any_url(request, tmp_path) -> str:
    """A fresh, real database of each kind hpo coordinates workers on."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue({"postgresql": "postgres_url", "mysql": "mysql_url"}[request.param])


def sqlite_storage(tmp_path, monkeypatch, db_timeout: float = 0) -> hs.ResilientRDBStorage:
    """A storage on a SQLite file whose writers give up on a held lock after 2 s, not 60 s."""
    monkeypatch.setattr(hs, "SQLITE_BUSY_TIMEOUT", 2)
    return hs.open_storage(f"sqlite:///{tmp_path / 'study.db'}", db_timeout=db_timeout)


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


# 2. Only a lost connection is retried; any other database error fails at once, in its own words.

def drop_trials(storage: hs.ResilientRDBStorage) -> None:
    """Remove the trials table from under the storage, through another connection."""
    backend = storage.engine.dialect.name
    with storage.engine.begin() as conn:
        if backend == "mysql":
            conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")
        conn.exec_driver_sql("DROP TABLE trials CASCADE" if backend == "postgresql" else "DROP TABLE trials")


def test_a_missing_table_fails_at_once_in_the_databases_words(any_url):
    storage = hs.open_storage(any_url, db_timeout=10)
    study_id = storage.create_new_study(MAXIMIZE, "s")
    drop_trials(storage)
    t0 = time.monotonic()
    with pytest.raises(hs.StorageError) as info:
        storage.get_all_trials(study_id)
    assert time.monotonic() - t0 < 5, str(info.value)  # not 10 s of retries
    missing = {"sqlite": "no such table: trials", "postgresql": 'relation "trials" does not exist',
               "mysql": "trials' doesn't exist"}[storage.engine.dialect.name]
    assert str(info.value).startswith(f"the database at {hs.mask(any_url)} failed: ") and missing in str(info.value)
    assert type(info.value) is hs.DatabaseError and "\n" not in str(info.value)


def test_a_read_only_sqlite_file_fails_at_once(tmp_path):
    path = tmp_path / "study.db"
    study_id = hs.open_storage(f"sqlite:///{path}").create_new_study(MAXIMIZE, "s")
    url = f"sqlite:///file:{path}?mode=ro&uri=true"
    storage = hs.open_storage(url, db_timeout=10)
    assert storage.get_study_user_attrs(study_id) == {}  # reading is fine
    t0 = time.monotonic()
    with pytest.raises(hs.StorageError) as info:
        storage.set_study_user_attr(study_id, "k", 1)
    assert time.monotonic() - t0 < 5, str(info.value)  # not 10 s of retries
    assert str(info.value) == f"the database at {hs.mask(url)} failed: attempt to write a readonly database"
    assert type(info.value) is hs.DatabaseError


def test_a_sqlite_lock_held_too_long_fails_once_the_busy_timeout_is_over(tmp_path, monkeypatch):
    storage = sqlite_storage(tmp_path, monkeypatch, db_timeout=10)
    study_id = storage.create_new_study(MAXIMIZE, "s")
    with storage.engine.connect() as writer:
        writer.exec_driver_sql("INSERT INTO study_user_attributes (study_id, key, value_json) VALUES (?, 'a', '1')",
                               (study_id,))
        t0 = time.monotonic()
        with pytest.raises(hs.StorageError) as info:
            storage.set_study_user_attr(study_id, "k", 1)
        assert time.monotonic() - t0 < 5, str(info.value)  # the 2 s busy timeout, not 10 s of retries
    assert str(info.value) == f"the database at {hs.mask(storage.url)} failed: database is locked"


def test_a_postgresql_lock_timeout_is_not_a_lost_connection(postgres_url):
    import psycopg

    url = postgres_url + "?options=-c%20lock_timeout%3D300"
    storage = hs.open_storage(url, db_timeout=10)
    study_id = storage.create_new_study(MAXIMIZE, "s")
    with psycopg.connect(postgres_url.replace("+psycopg", "")) as other:
        other.execute("LOCK TABLE studies IN ACCESS EXCLUSIVE MODE")
        t0 = time.monotonic()
        with pytest.raises(hs.StorageError) as info:
            storage.get_study_user_attrs(study_id)
        assert time.monotonic() - t0 < 5, str(info.value)  # not 10 s of retries
    assert str(info.value) == f"the database at {hs.mask(url)} failed: canceling statement due to lock timeout"


def test_optunas_own_exceptions_pass_through(any_url):
    storage = hs.open_storage(any_url, db_timeout=5)
    study_id = storage.create_new_study(MAXIMIZE, "s")
    with pytest.raises(optuna.exceptions.DuplicatedStudyError):
        storage.create_new_study(MAXIMIZE, "s")
    with pytest.raises(KeyError):
        storage.get_study_id_from_name("nope")
    trial_id = storage.create_new_trial(study_id)
    storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [1.0])
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_user_attr(trial_id, "k", 1)


@pytest.mark.parametrize("server, port", [("postgres", 5432), ("mysql", 3306)])
def test_a_cut_connection_is_still_retried(request, server, port):
    url = request.getfixturevalue(f"{server}_url")
    proxy = CutProxy(("127.0.0.1", port))
    try:
        via = sqlalchemy.engine.make_url(url).set(port=proxy.port).render_as_string(hide_password=False)
        storage = hs.open_storage(via, db_timeout=30)
        study_id = storage.create_new_study(MAXIMIZE, "s")
        proxy.cut()
        threading.Timer(2, proxy.restore).start()
        t0 = time.monotonic()
        assert storage.get_all_trials(study_id) == []
        assert time.monotonic() - t0 > 1.5  # it waited for the database to come back
    finally:
        proxy.close()


# 3. Bad settings are the caller's, and a pickled storage keeps its SQLite settings.

@pytest.mark.parametrize("kwargs, message", [
    ({"heartbeat": 0}, "heartbeat must be a positive integer (seconds), got 0"),
    ({"grace": -30}, "grace must be a positive integer (seconds), got -30"),
    ({"grace": 2.5}, "grace must be a positive integer (seconds), got 2.5"),
    ({"db_timeout": -1}, "db_timeout must be a finite number of seconds, 0 or more, got -1"),
    ({"db_timeout": math.inf}, "db_timeout must be a finite number of seconds, 0 or more, got inf"),
    ({"db_timeout": math.nan}, "db_timeout must be a finite number of seconds, 0 or more, got nan"),
])
def test_bad_settings_are_value_errors_before_anything_is_opened(tmp_path, kwargs, message):
    with pytest.raises(ValueError) as info:
        hs.open_storage(f"sqlite:///{tmp_path / 'study.db'}", **kwargs)
    assert str(info.value) == message
    assert list(tmp_path.iterdir()) == []


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


# 4. Processes that open one new database at the same instant.

OPEN_AT_ONCE = """
import sys, time
import optuna
from hpo.storage import open_storage
print("ready", flush=True)
at = float(sys.stdin.readline())
time.sleep(max(0.0, at - time.time()))
optuna.create_study(study_name="s", storage=open_storage(sys.argv[1]), load_if_exists=True)
"""


def test_processes_opening_a_new_database_at_once_all_succeed(any_url):
    # Importing Optuna takes seconds on a busy machine: the instant is set once every process is ready.
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT_ONCE, any_url], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(6)]
    for p in procs:
        assert p.stdout.readline() == "ready\n", p.communicate()[1]
    at = time.time() + 0.5
    for p in procs:
        p.stdin.write(f"{at}\n")
        p.stdin.flush()
    errors = [err.strip().splitlines()[-1] for p in procs for err in [p.communicate(timeout=120)[1]] if p.returncode]
    assert errors == []
    assert optuna.get_all_study_names(any_url) == ["s"]
