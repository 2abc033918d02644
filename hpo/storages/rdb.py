"""Where studies live: Optuna's RDBStorage on SQLite (the default file) or PostgreSQL (many
workers), with heartbeats, retried while the database is out of reach, SQLite's writes taken in
turn; ``open_storage`` opens one (or, for a grpc:// URL, a client of `hpo proxy`)."""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable
from typing import Any

import optuna
import sqlalchemy
from sqlalchemy import event

from hpo.storages.locks import schema_lock
from hpo.storages.owned import RDBShortcuts
from hpo.storages.remote import GrpcStorage, open_grpc
from hpo.storages.retries import (
    CONNECT_TIMEOUT,
    HEARTBEAT_KEY,
    SQLITE_BUSY_TIMEOUT,
    Liveness,
    StorageError,
    mask,
    reason,
    retry_lost_connection,
    unwrapped,
)

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
    worker's hot path cut to the round trips it needs (hpo.storages.owned)."""

    direct = True  # holds the database itself: may take the study lock and keep the queue

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if key == HEARTBEAT_KEY:  # a worker behind `hpo proxy`, beating
            return self.record_heartbeat(trial_id)
        super().set_trial_system_attr(trial_id, key, value)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if self.engine.dialect.name == "sqlite":  # the engine is a new one, without our listeners
            _serialize_sqlite_writes(self.engine)


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


def open_storage(url: str, stale_callback: Callable | None = None,
                 liveness: Liveness = Liveness()) -> ResilientRDBStorage | GrpcStorage:
    """An RDBStorage with heartbeats on; ``stale_callback(study, trial)`` sees trials of dead workers.
    A ``grpc://host:port`` URL gives a client of `hpo proxy` instead (hpo.storages.remote)."""
    if url.startswith("grpc:"):
        return open_grpc(url, liveness)
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise StorageError(f"--storage {mask(url)}: not a database URL; use e.g. sqlite:///hpo.db or "
                           "postgresql+psycopg://user@host/db") from None
    sqlite = parsed.get_backend_name() == "sqlite"
    kwargs = ({"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}} if sqlite else
              {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT}})
    try:
        with schema_lock(url, kwargs), warnings.catch_warnings():
            # heartbeats are 'experimental' in Optuna, and what we need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = ResilientRDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=liveness.heartbeat, grace_period=liveness.grace,
                heartbeat_stale_trial_callback=stale_callback)
    except ImportError as e:  # Optuna re-raises the driver's ModuleNotFoundError as a bare ImportError
        missing = getattr(e.__cause__ or e, "name", None) or parsed.get_driver_name()
        raise StorageError(f"--storage {mask(url)}: the database driver is not installed ({missing}); "
                           "pip install it, e.g. psycopg[binary] for postgresql+psycopg://") from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ValueError, OSError) as e:
        raise StorageError(f"--storage {mask(url)}: cannot open the database: {reason(unwrapped(e), url)}") from None
    if sqlite:
        _serialize_sqlite_writes(storage.engine)
    storage.db_timeout = liveness.db_timeout  # set after opening: a bad URL must fail at once, not retry
    return storage


def fail_stale_trials(study: optuna.Study) -> None:
    """Mark the RUNNING trials of dead workers (no heartbeat for GRACE_PERIOD) failed; the storage's
    stale callback then queues them again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
