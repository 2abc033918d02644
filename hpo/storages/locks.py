"""Mutual exclusion across processes and machines: an advisory lock on PostgreSQL and MySQL, a file
lock beside a SQLite database. One guards Optuna's table creation, one each study's queue."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy

from hpo.storages.retries import DatabaseError, StorageError, mask, retry_lost_connection


@contextlib.contextmanager
def schema_lock(url: str, engine_kwargs: dict[str, Any]) -> Iterator[None]:
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
    database session to hold one: the proxy alone changes the queue (hpo.storages.remote)."""
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
