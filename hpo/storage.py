"""Where studies live: Optuna's RDBStorage on SQLite (the default file) or PostgreSQL (many
workers), with heartbeats, a cross-process study lock, and URLs printed without passwords."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
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


class StorageError(RuntimeError):
    """The storage URL cannot be used; the message says why, without the password."""


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


def open_storage(url: str, stale_callback: Callable | None = None) -> optuna.storages.RDBStorage:
    """An RDBStorage with heartbeats on; ``stale_callback(study, trial)`` sees trials of dead workers."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise StorageError(f"--storage {mask(url)}: not a database URL; use e.g. sqlite:///hpo.db or "
                           "postgresql+psycopg://user@host/db") from None
    sqlite = parsed.get_backend_name() == "sqlite"
    kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}} if sqlite else {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():  # heartbeats are 'experimental' in Optuna, and what we need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD,
                heartbeat_stale_trial_callback=stale_callback)
    except ModuleNotFoundError as e:
        raise StorageError(f"--storage {mask(url)}: the database driver is not installed ({e.name}); "
                           "pip install it, e.g. psycopg[binary] for postgresql+psycopg://") from None
    except (sqlalchemy.exc.SQLAlchemyError, ValueError) as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0].replace(url, mask(url))
        raise StorageError(f"--storage {mask(url)}: cannot open the database: {reason}") from None
    if sqlite:
        _serialize_sqlite_writes(storage.engine)
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
    with storage.engine.connect() as conn:
        conn.execute(sqlalchemy.text(take), {"k": key if backend == "postgresql" else f"hpo-{key}"})
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text(give), {"k": key if backend == "postgresql" else f"hpo-{key}"})


def fail_stale_trials(study: optuna.Study) -> None:
    """Mark the RUNNING trials of dead workers (no heartbeat for GRACE_PERIOD) failed; the storage's
    stale callback then queues them again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
