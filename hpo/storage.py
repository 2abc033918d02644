"""Where studies live: Optuna's RDBStorage on SQLite (the default file) or PostgreSQL (many
workers), with heartbeats, a cross-process study lock, and URLs printed without passwords."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import math
import os
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import sqlalchemy
from sqlalchemy import event

from hpo.owned import RDBShortcuts

if TYPE_CHECKING:
    from hpo.remote import GrpcStorage

DEFAULT_STORAGE = "sqlite:///hpo.db"  # an embedded file in the working directory
HEARTBEAT_INTERVAL = 10  # seconds between a running trial's heartbeats
GRACE_PERIOD = 30  # a RUNNING trial silent this long belongs to a dead worker
SQLITE_BUSY_TIMEOUT = 60  # seconds a SQLite writer waits for the lock before giving up
CONNECT_TIMEOUT = 10  # seconds to reach a database server before a connection attempt fails


DB_TIMEOUT = 300  # seconds a worker keeps retrying a lost database before it gives up
CHECKPOINT_EVERY = 10.0  # seconds between a trial's checkpoint writes; a retry redoes at most this
# A trial system attribute that stands for a heartbeat where no heartbeat call exists (Optuna's gRPC
# proxy, hpo.remote): the storage records a heartbeat instead of storing it.
HEARTBEAT_KEY = "hpo:heartbeat"


class StorageError(RuntimeError):
    """The storage URL cannot be used; the message says why, without the password."""


class StorageUnavailable(StorageError):
    """The database stayed out of reach for longer than the configured limit."""


class DatabaseError(StorageError):
    """The database refused a call for a reason that waiting does not fix; the message is its own."""


# What waiting fixes: a connection dropped or refused, a server restarting, a deadlock the server broke
# by rolling one transaction back. Anything else (a bad query, a missing table, a full disk, a lock held
# too long) fails the same way on every try.
_PG_TRANSIENT = ("08", "57P01", "57P02", "57P03", "40001", "40P01")  # SQLSTATE classes and codes
_MYSQL_TRANSIENT = frozenset({1053, 1213, 2002, 2003, 2006, 2013, 2055})  # error numbers


def _transient(error: BaseException, backend: str) -> bool:
    """Worth retrying: see above. SQLite has no connection to lose: its errors are all final."""
    if isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated:
        return True
    if not isinstance(error, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
        return False
    if backend == "postgresql":  # psycopg: sqlstate; psycopg2: pgcode; None: the client lost the server
        state = getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)
        return state is None or state.startswith(_PG_TRANSIENT)
    if backend in ("mysql", "mariadb"):
        return bool(error.orig.args) and error.orig.args[0] in _MYSQL_TRANSIENT
    return False


def _unwrapped(error: BaseException) -> BaseException:
    """What SQLAlchemy raised, where Optuna wrapped it in a StorageInternalError of its own words
    ("An exception is raised during the commit...")."""
    if isinstance(error, optuna.exceptions.StorageInternalError) and error.__cause__:
        return error.__cause__
    return error


def _reason(error: BaseException, url: str) -> str:
    """The database's (or its driver's) own first line, without the password."""
    lines = str(getattr(error, "orig", None) or error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__).replace(url, mask(url))


def retry_lost_connection(fn: Callable, url: str, timeout: float):
    """``fn()``, retried with backoff while the database connection is lost, for up to ``timeout``;
    any other database error raises DatabaseError at once. Optuna's own exceptions (KeyError for an
    unknown study, DuplicatedStudyError...) pass through."""
    deadline, pause = time.monotonic() + timeout, 0.5
    while True:
        try:
            return fn()
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
            error = _unwrapped(e)
            if not _transient(error, sqlalchemy.engine.make_url(url).get_backend_name()):
                raise DatabaseError(f"the database at {mask(url)} failed: {_reason(error, url)}") from e
            if time.monotonic() + pause > deadline:
                raise StorageUnavailable(f"lost the database at {mask(url)} for more than {timeout:g}s; "
                                         "is it running and reachable? (--db-timeout sets the limit)") from None
            time.sleep(pause)  # pre-ping replaces the dead pooled connections meanwhile
            pause = min(pause * 2, 10.0)


_writing = threading.local()  # .on: this thread is inside a storage method that writes


def _retrying(method: Callable, writes: bool) -> Callable:
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        return self._retried(lambda: method(self, *args, **kwargs), writes)

    return call


class _RetryingRDBStorage(optuna.storages.RDBStorage):
    """RDBStorage whose calls ride out a restarted or unreachable database: each retries with
    backoff for up to ``db_timeout`` seconds, then raises StorageUnavailable. (A write whose
    commit went through just before the connection broke may be applied twice; Optuna's own
    calls are idempotent but for creating a trial.)"""

    db_timeout: float = 0.0  # no retries while opening: a wrong URL must fail at once

    def _retried(self, fn: Callable[[], Any], writes: bool) -> Any:
        outer = getattr(_writing, "on", False)
        _writing.on = outer or writes  # a read inside a write stays in the write's transaction kind
        try:
            return retry_lost_connection(fn, self.url, self.db_timeout)
        finally:
            _writing.on = outer


_READS = ("get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
          "get_study_system_attrs", "get_all_studies", "get_trial_id_from_study_id_trial_number",
          "get_trial_number_from_id", "get_trial_param", "get_trial", "get_trial_user_attrs",
          "get_trial_system_attrs", "get_all_trials", "get_n_trials", "_get_stale_trial_ids",
          "_get_best_trial_id", "_get_trials")  # the last two: what Optuna's trial cache calls
_WRITES = ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr", "create_new_trial",
           "set_trial_param", "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr",
           "set_trial_system_attr", "record_heartbeat",
           "_create_new_trial", "_set_trial_param")  # the cache's; study.add_trial goes through the first
for _name in _READS + _WRITES:
    setattr(_RetryingRDBStorage, _name, _retrying(getattr(optuna.storages.RDBStorage, _name), _name in _WRITES))


class ResilientRDBStorage(RDBShortcuts, _RetryingRDBStorage):
    """hpo's RDBStorage: Optuna's, retried while the database is out of reach (above), with a
    worker's hot path cut to the round trips it needs (hpo.owned)."""

    direct = True  # holds the database itself: may take the study lock and keep the queue

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if key == HEARTBEAT_KEY:  # a worker behind `hpo proxy`, beating
            return self.record_heartbeat(trial_id)
        super().set_trial_system_attr(trial_id, key, value)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if self.engine.dialect.name == "sqlite":  # the engine is a new one, without our listeners
            _serialize_sqlite_writes(self.engine)


def mask(url: str) -> str:
    """The URL with its password replaced by ***, safe to print or log."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return "<malformed storage URL>"


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    """WAL: readers go on while one process writes. The begin listener issues BEGIN itself."""
    dbapi_connection.isolation_level = None
    dbapi_connection.execute("PRAGMA journal_mode=WAL")


def _sqlite_begin(connection: sqlalchemy.Connection) -> None:
    """A transaction of a storage method that writes takes SQLite's write lock up front (BEGIN
    IMMEDIATE): a deferred one that reads and then writes fails at once with 'database is locked'
    when another process committed meanwhile, where an immediate one waits its turn on the busy
    timeout. Reads (and transactions outside the storage's methods) stay deferred: they neither
    wait for a writer nor hold one up."""
    connection.exec_driver_sql("BEGIN IMMEDIATE" if getattr(_writing, "on", False) else "BEGIN")


def _serialize_sqlite_writes(engine: sqlalchemy.Engine) -> None:
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    engine.dispose()  # connections opened before the listeners existed must go


def open_storage(url: str, stale_callback: Callable | None = None, heartbeat: int = HEARTBEAT_INTERVAL,
                 grace: int = GRACE_PERIOD, db_timeout: float = DB_TIMEOUT) -> ResilientRDBStorage | GrpcStorage:
    """An RDBStorage with heartbeats on; ``stale_callback(study, trial)`` sees trials of dead workers.
    A ``grpc://host:port`` URL gives a client of `hpo proxy` instead (hpo.remote)."""
    for name, value in (("heartbeat", heartbeat), ("grace", grace)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer (seconds), got {value!r}")
    if not isinstance(db_timeout, (int, float)) or not 0 <= db_timeout < math.inf:  # NaN fails too
        raise ValueError(f"db_timeout must be a finite number of seconds, 0 or more, got {db_timeout!r}")
    if url.startswith("grpc:"):
        from hpo.remote import open_grpc  # it builds on this module

        return open_grpc(url, heartbeat, grace, db_timeout)
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise StorageError(f"--storage {mask(url)}: not a database URL; use e.g. sqlite:///hpo.db or "
                           "postgresql+psycopg://user@host/db") from None
    sqlite = parsed.get_backend_name() == "sqlite"
    kwargs = ({"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}} if sqlite else
              {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT}})
    try:
        with _schema_lock(url, kwargs), warnings.catch_warnings():
            # heartbeats are 'experimental' in Optuna, and what we need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = ResilientRDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=heartbeat, grace_period=grace,
                heartbeat_stale_trial_callback=stale_callback)
    except ImportError as e:  # Optuna re-raises the driver's ModuleNotFoundError as a bare ImportError
        missing = getattr(e.__cause__ or e, "name", None) or parsed.get_driver_name()
        raise StorageError(f"--storage {mask(url)}: the database driver is not installed ({missing}); "
                           "pip install it, e.g. psycopg[binary] for postgresql+psycopg://") from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ValueError, OSError) as e:
        raise StorageError(f"--storage {mask(url)}: cannot open the database: {_reason(_unwrapped(e), url)}") from None
    if sqlite:
        _serialize_sqlite_writes(storage.engine)
    storage.db_timeout = db_timeout  # set after opening: a bad URL must fail at once, not retry
    return storage


@contextlib.contextmanager
def _schema_lock(url: str, engine_kwargs: dict[str, Any]) -> Iterator[None]:
    """Held while Optuna creates its tables, which processes opening one new database at the same
    instant would race on ('duplicate key value', 'table studies already exists')."""
    engine = sqlalchemy.create_engine(url, **engine_kwargs)  # its own connection, gone after
    try:
        with _cross_process_lock(url, engine, "hpo schema", None):
            yield
    finally:
        engine.dispose()


@contextlib.contextmanager
def study_lock(storage: optuna.storages.RDBStorage, study_name: str) -> Iterator[None]:
    """Mutual exclusion across processes and machines for one study's queue: an advisory lock
    on PostgreSQL and MySQL, a file lock beside a SQLite database. Behind `hpo proxy` there is no
    database session to hold one: the proxy alone changes the queue (hpo.remote)."""
    if not storage.direct:
        yield
        return
    with _cross_process_lock(storage.url, storage.engine, study_name, storage.db_timeout):
        yield


_ADVISORY_LOCKS = {  # take, give
    "postgresql": ("SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)"),
    "mysql": ("SELECT GET_LOCK(:k, 600)", "SELECT RELEASE_LOCK(:k)"),
    "mariadb": ("SELECT GET_LOCK(:k, 600)", "SELECT RELEASE_LOCK(:k)"),
}


@contextlib.contextmanager
def _cross_process_lock(url: str, engine: sqlalchemy.Engine, name: str,
                        db_timeout: float | None) -> Iterator[None]:
    """Mutual exclusion by ``name``: an advisory lock taken on a connection of ``engine``, or a file
    lock beside a SQLite database (one for every name). ``db_timeout`` None: no retries, so that a
    bad URL fails at once with its own error."""
    parsed = sqlalchemy.engine.make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        path = parsed.database or ""
        if "uri" in parsed.query:  # sqlite:///file:x.db?mode=ro&uri=true
            path = urllib.parse.urlparse(path).path
        with open(Path(path).with_suffix(".lock") if path not in ("", ":memory:") else os.devnull, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    take, give = _ADVISORY_LOCKS.get(backend, (None, None))
    if take is None:
        raise StorageError(f"{backend}: hpo coordinates workers on SQLite, PostgreSQL or MySQL only")
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    arg = {"k": key if backend == "postgresql" else f"hpo-{key}"}

    def acquire() -> sqlalchemy.Connection:
        # The lock lives in its own connection: it goes with the process if the process dies.
        conn = engine.connect()
        try:
            got = conn.execute(sqlalchemy.text(take), arg).scalar()
            if got == 0:  # MySQL: timed out
                raise StorageError(f"waited 600s for another process's lock on {name!r} at {mask(url)}")
            if backend != "postgresql" and got != 1:  # NULL: the server cut the wait short, and no lock is held
                raise DatabaseError(f"the database at {mask(url)} failed: it ended the wait for the lock on {name!r} "
                                    "(GET_LOCK gave NULL: KILL QUERY, or max_statement_time)")
            conn.commit()  # the lock is the session's: no transaction need stay open meanwhile
        except BaseException:
            conn.close()
            raise
        return conn

    conn = acquire() if db_timeout is None else retry_lost_connection(acquire, url, db_timeout)
    try:
        yield
    finally:
        with contextlib.suppress(sqlalchemy.exc.DBAPIError):  # a dead connection released it already
            conn.execute(sqlalchemy.text(give), arg)
        conn.close()


def fail_stale_trials(study: optuna.Study) -> None:
    """Mark the RUNNING trials of dead workers (no heartbeat for GRACE_PERIOD) failed; the storage's
    stale callback then queues them again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
