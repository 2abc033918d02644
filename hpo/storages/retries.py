"""What every storage here shares: the defaults and how live a worker must stay (Liveness), the errors
a person can act on, URLs printed without passwords, and retrying a call while the database
connection is lost."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import optuna
import sqlalchemy

T = TypeVar("T")

DEFAULT_STORAGE = "sqlite:///hpo.db"  # an embedded file in the working directory
HEARTBEAT_INTERVAL = 10  # seconds between a running trial's heartbeats
GRACE_PERIOD = 30  # a RUNNING trial silent this long belongs to a dead worker
SQLITE_BUSY_TIMEOUT = 60  # seconds a SQLite writer waits for the lock before giving up
CONNECT_TIMEOUT = 10  # seconds to reach a database server before a connection attempt fails


DB_TIMEOUT = 300  # seconds a worker keeps retrying a lost database before it gives up
CHECKPOINT_EVERY = 10.0  # seconds between a trial's checkpoint writes; a retry redoes at most this
# A trial system attribute that stands for a heartbeat where no heartbeat call exists (Optuna's gRPC
# proxy, hpo.storages.remote): the storage records a heartbeat instead of storing it.
HEARTBEAT_KEY = "hpo:heartbeat"


@dataclass(frozen=True)
class Liveness:
    """How a storage tells a live worker from a dead one, and how long a call waits for a lost
    database. Checked once, here, whoever makes it (the CLI from its flags, a script); the messages
    name the flags."""

    heartbeat: int = HEARTBEAT_INTERVAL  # seconds between a running trial's heartbeats
    grace: int = GRACE_PERIOD  # a RUNNING trial silent this long belongs to a dead worker
    db_timeout: float = DB_TIMEOUT  # seconds a call keeps retrying a lost database before it gives up

    def __post_init__(self) -> None:
        for flag, value in (("--heartbeat", self.heartbeat), ("--grace", self.grace)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be a positive integer (seconds), got {value!r}")
        timeout = self.db_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout < math.inf:  # NaN too
            raise ValueError(f"--db-timeout must be 0 (give up at once) or more seconds, got {timeout!r}")
        if self.grace <= self.heartbeat:  # a live worker's trial would be failed between two beats
            raise ValueError(f"--grace ({self.grace}s) must be longer than --heartbeat ({self.heartbeat}s)")

    @classmethod
    def watching(cls, grace: int = GRACE_PERIOD, db_timeout: float = DB_TIMEOUT) -> Liveness:
        """What `hpo proxy` runs with: it beats for no trial, and looks for silent ones once a heartbeat
        interval, kept below the grace period."""
        if isinstance(grace, bool) or not isinstance(grace, int) or grace < 2:
            raise ValueError(f"--grace must be 2 or more seconds, got {grace!r}")
        return cls(min(HEARTBEAT_INTERVAL, grace - 1), grace, db_timeout)


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


def unwrapped(error: BaseException) -> BaseException:
    """What SQLAlchemy raised, where Optuna wrapped it in a StorageInternalError of its own words
    ("An exception is raised during the commit...")."""
    if isinstance(error, optuna.exceptions.StorageInternalError) and error.__cause__:
        return error.__cause__
    return error


def reason(error: BaseException, url: str) -> str:
    """The database's (or its driver's) own first line, without the password."""
    lines = str(getattr(error, "orig", None) or error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__).replace(url, mask(url))


def with_backoff(fn: Callable[[], T], timeout: float, errors: tuple[type[BaseException], ...],
                 lost: Callable[[BaseException], bool], final: Callable[[BaseException], StorageError],
                 gone: Callable[[], str]) -> T:
    """``fn()``, retried with backoff (0.5 s, doubling up to 10 s) for up to ``timeout`` seconds
    while it raises one of ``errors`` that ``lost`` says waiting fixes; then StorageUnavailable
    (``gone()`` says what was lost). Any other of ``errors`` raises ``final(error)`` at once."""
    deadline, pause = time.monotonic() + timeout, 0.5
    while True:
        try:
            return fn()
        except errors as e:
            if not lost(e):
                raise final(e) from e
            if time.monotonic() + pause > deadline:
                raise StorageUnavailable(gone()) from None
            time.sleep(pause)  # a database's pre-ping replaces the dead pooled connections meanwhile
            pause = min(pause * 2, 10.0)


def retry_lost_connection(fn: Callable[[], T], url: str, timeout: float) -> T:
    """``fn()``, retried while the database connection is lost, for up to ``timeout``; any other
    database error raises DatabaseError at once. Optuna's own exceptions (KeyError for an unknown
    study, DuplicatedStudyError...) pass through."""
    return with_backoff(
        fn, timeout, (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError),
        lost=lambda e: _transient(unwrapped(e), sqlalchemy.engine.make_url(url).get_backend_name()),
        final=lambda e: DatabaseError(f"the database at {mask(url)} failed: {reason(unwrapped(e), url)}"),
        gone=lambda: f"lost the database at {mask(url)} for more than {timeout:g}s; is it running and reachable? "
                     "(--db-timeout sets the limit)")


def mask(url: str) -> str:
    """The URL with its password replaced by ***, safe to print or log."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return "<malformed storage URL>"
