"""Where studies live: Optuna's RDBStorage on SQLite (the default file) or PostgreSQL (many
workers), with heartbeats, a cross-process study lock, and URLs printed without passwords."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy import event

DEFAULT_STORAGE = "sqlite:///hpo.db"  # an embedded file in the working directory
HEARTBEAT_INTERVAL = 10  # seconds between a running trial's heartbeats
GRACE_PERIOD = 30  # a RUNNING trial silent this long belongs to a dead worker
SQLITE_BUSY_TIMEOUT = 60  # seconds a SQLite writer waits for the lock before giving up
CONNECT_TIMEOUT = 10  # seconds to reach a database server before a connection attempt fails


DB_TIMEOUT = 300  # seconds a worker keeps retrying a lost database before it gives up
CHECKPOINT_EVERY = 10.0  # seconds between a trial's checkpoint writes; a retry redoes at most this


class StorageError(RuntimeError):
    """The storage URL cannot be used; the message says why, without the password."""


class StorageUnavailable(StorageError):
    """The database stayed out of reach for longer than the configured limit."""


def _connection_lost(e: BaseException) -> bool:
    """A dropped or refused connection (worth retrying), as opposed to a bad query or data."""
    cause = e.__cause__ if isinstance(e, optuna.exceptions.StorageInternalError) else e
    if isinstance(cause, sqlalchemy.exc.DBAPIError) and cause.connection_invalidated:
        return True
    return isinstance(cause, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError))


def retry_lost_connection(fn: Callable, url: str, timeout: float):
    """``fn()``, retried with backoff while the database connection is lost, for up to ``timeout``."""
    deadline, pause = time.monotonic() + timeout, 0.5
    while True:
        try:
            return fn()
        except Exception as e:
            if not _connection_lost(e):
                raise
            if time.monotonic() + pause > deadline:
                raise StorageUnavailable(f"lost the database at {mask(url)} for more than {timeout:g}s; "
                                         "is it running and reachable? (--db-timeout sets the limit)") from None
            time.sleep(pause)  # pre-ping replaces the dead pooled connections meanwhile
            pause = min(pause * 2, 10.0)


def _retrying(method: Callable) -> Callable:
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        return retry_lost_connection(lambda: method(self, *args, **kwargs), self.url, self.db_timeout)

    return call


class ResilientRDBStorage(optuna.storages.RDBStorage):
    """RDBStorage whose calls ride out a restarted or unreachable database: each retries with
    backoff for up to ``db_timeout`` seconds, then raises StorageUnavailable. (A write whose
    commit went through just before the connection broke may be applied twice; Optuna's own
    calls are idempotent but for creating a trial.)"""

    db_timeout: float = 0.0  # no retries while opening: a wrong URL must fail at once


for _name in ("create_new_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
              "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
              "get_all_studies", "create_new_trial", "set_trial_param", "get_trial_id_from_study_id_trial_number",
              "get_trial_number_from_id", "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
              "set_trial_user_attr", "set_trial_system_attr", "get_trial", "get_all_trials", "get_n_trials",
              "record_heartbeat", "_get_stale_trial_ids",
              # what Optuna's trial cache calls on the storage behind it
              "_create_new_trial", "_get_best_trial_id", "_get_trials", "_set_trial_param"):
    setattr(ResilientRDBStorage, _name, _retrying(getattr(optuna.storages.RDBStorage, _name)))


def mask(url: str) -> str:
    """The URL with its password replaced by ***, safe to print or log."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return "<malformed storage URL>"


def _serialize_sqlite_writes(engine: sqlalchemy.Engine) -> None:
    """Every transaction takes SQLite's write lock up front (BEGIN IMMEDIATE), so concurrent
    workers queue on the busy timeout instead of failing with 'database is locked' when a
    read transaction tries to become a write one."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # let us issue BEGIN ourselves
        dbapi_connection.execute("PRAGMA journal_mode=WAL")

    @event.listens_for(engine, "begin")
    def _begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners existed must go


def open_storage(url: str, stale_callback: Callable | None = None, heartbeat: int = HEARTBEAT_INTERVAL,
                 grace: int = GRACE_PERIOD, db_timeout: float = DB_TIMEOUT) -> ResilientRDBStorage:
    """An RDBStorage with heartbeats on; ``stale_callback(study, trial)`` sees trials of dead workers."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise StorageError(f"--storage {mask(url)}: not a database URL; use e.g. sqlite:///hpo.db or "
                           "postgresql+psycopg://user@host/db") from None
    sqlite = parsed.get_backend_name() == "sqlite"
    kwargs = ({"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}} if sqlite else
              {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT}})
    try:
        with warnings.catch_warnings():  # heartbeats are 'experimental' in Optuna, and what we need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = ResilientRDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=heartbeat, grace_period=grace,
                heartbeat_stale_trial_callback=stale_callback)
    except ImportError as e:  # Optuna re-raises the driver's ModuleNotFoundError as a bare ImportError
        missing = getattr(e.__cause__ or e, "name", None) or parsed.get_driver_name()
        raise StorageError(f"--storage {mask(url)}: the database driver is not installed ({missing}); "
                           "pip install it, e.g. psycopg[binary] for postgresql+psycopg://") from None
    except (sqlalchemy.exc.SQLAlchemyError, ValueError) as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0].replace(url, mask(url))
        raise StorageError(f"--storage {mask(url)}: cannot open the database: {reason}") from None
    if sqlite:
        _serialize_sqlite_writes(storage.engine)
    storage.db_timeout = db_timeout  # set after opening: a bad URL must fail at once, not retry
    return storage


@contextlib.contextmanager
def study_lock(storage: optuna.storages.RDBStorage, study_name: str) -> Iterator[None]:
    """Mutual exclusion across processes and machines for one study's queue: an advisory lock
    on PostgreSQL and MySQL, a file lock beside a SQLite database."""
    url = sqlalchemy.engine.make_url(storage.url)
    key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
    backend = url.get_backend_name()
    if backend == "sqlite":
        path = Path(url.database or "memory").with_suffix(".lock")
        with open(path if url.database else os.devnull, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    take, give = {
        "postgresql": ("SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)"),
        "mysql": ("SELECT GET_LOCK(:k, 600)", "SELECT RELEASE_LOCK(:k)"),
        "mariadb": ("SELECT GET_LOCK(:k, 600)", "SELECT RELEASE_LOCK(:k)"),
    }.get(backend, (None, None))
    if take is None:
        raise StorageError(f"{backend}: hpo coordinates workers on SQLite, PostgreSQL or MySQL only")
    # The lock lives in its own connection: it goes with the process if the process dies.
    arg = {"k": key if backend == "postgresql" else f"hpo-{key}"}

    def acquire() -> sqlalchemy.Connection:
        conn = storage.engine.connect()
        try:
            conn.execute(sqlalchemy.text(take), arg)
        except Exception:
            conn.close()
            raise
        return conn

    conn = retry_lost_connection(acquire, storage.url, storage.db_timeout)
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
