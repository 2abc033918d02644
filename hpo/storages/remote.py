"""Storage through `hpo proxy`: a ``grpc://host:port`` URL reaches the database through Optuna's
gRPC storage proxy (hpo.workers.proxy) instead of a connection of the worker's own, so that hundreds of
workers do not each hold database connections and poll the trial list.

What differs from a database URL, and why:
- Optuna's proxy has no heartbeat call. A worker beats by setting the trial system attribute
  HEARTBEAT_KEY, which `hpo proxy` records as Optuna's heartbeat (a plain Optuna proxy would
  store it as an attribute, and dead workers' trials would stay RUNNING).
- The study lock is a database session's: a worker here cannot take it. The proxy takes it and
  keeps the queue for every hpo study (queues slots up to N, fails and queues again the trials of
  dead workers and those marked for retry); the worker only pops, trains and tells.
- Listing the queue through Optuna's proxy sends every unfinished trial whole, each time. The proxy
  publishes the queue's head instead, as the study system attribute QUEUE_KEY (trial ids, in order);
  a worker takes from it, and an id another worker took just fails to flip to RUNNING.
- A proxy that restarts is waited for, as a lost database is (``db_timeout``); an outage of the
  database behind it is ridden out by the proxy itself.
"""

from __future__ import annotations

import functools
import os
import urllib.parse
import warnings
from collections.abc import Callable, Mapping
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC's own log lines off: hpo says what failed
import grpc  # noqa: E402
import optuna

from hpo.storages.owned import OwnedTrials
from hpo.storages.retries import CONNECT_TIMEOUT, HEARTBEAT_KEY, DatabaseError, Liveness, StorageError, with_backoff

QUEUE_KEY = "hpo:queue"  # a study system attribute: the first WAITING trials' ids, as the proxy last saw them
DEFAULT_PORT = 13000  # Optuna's run_grpc_proxy_server's
# What a proxy that is down or restarting answers; the call never reached the database.
_WAIT_FOR = (grpc.StatusCode.UNAVAILABLE,)


def parse(url: str) -> tuple[str, int]:
    """``grpc://host:port`` as (host, port); StorageError where it is not one."""
    parsed = urllib.parse.urlsplit(url)
    try:
        port = DEFAULT_PORT if parsed.port is None else parsed.port
    except ValueError:
        port = -1
    if parsed.scheme != "grpc" or not parsed.hostname or port < 1 or parsed.path not in ("", "/") or parsed.query:
        raise StorageError(f"--storage {url}: not a proxy URL; use grpc://HOST:PORT, e.g. grpc://127.0.0.1:13000 "
                           "(`hpo proxy` prints it)")
    return parsed.hostname, port


def _waiting(method: Callable) -> Callable:
    @functools.wraps(method)
    def call(self: _WaitingGrpcStorage, *args: Any, **kwargs: Any) -> Any:
        return with_backoff(
            lambda: method(self, *args, **kwargs), self.db_timeout, (grpc.RpcError,),
            lost=lambda e: e.code() in _WAIT_FOR,  # else the proxy answered: the database's error, in its words
            final=lambda e: DatabaseError(f"the storage proxy at {self.url} failed: {e.details()}"),
            gone=lambda: f"lost the storage proxy at {self.url} for more than {self.db_timeout:g}s; is `hpo proxy` "
                         "running and reachable? (--db-timeout sets the limit)")

    return call


class _WaitingGrpcStorage(optuna.storages.GrpcStorageProxy):
    """Optuna's gRPC proxy client whose calls wait out a proxy that is down (see _waiting)."""


for _name, _method in vars(optuna.storages.GrpcStorageProxy).items():
    if callable(_method) and not _name.startswith("_") and _name not in ("close", "wait_server_ready"):
        setattr(_WaitingGrpcStorage, _name, _waiting(_method))


class GrpcStorage(OwnedTrials, _WaitingGrpcStorage):
    """Optuna's gRPC proxy client with what hpo's workers ask of a storage (see above), and the
    trials it runs kept as it writes them (hpo.storages.owned)."""

    direct = False  # no database session: `hpo proxy` takes the study lock and keeps the queue

    def __init__(self, url: str, liveness: Liveness) -> None:
        host, port = parse(url)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(host=host, port=port)
        self.url, self.heartbeat_interval, self.grace_period = url, liveness.heartbeat, liveness.grace
        self.db_timeout = liveness.db_timeout

    def get_heartbeat_interval(self) -> int:
        return self.heartbeat_interval

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_KEY, True)

    def waiting_trial_ids(self, study_id: int, limit: int) -> list[int]:
        """The queue's head as the proxy published it, however many ``limit`` asks: the workers here
        spread over all of it (some may be taken already)."""
        return list(self.get_study_system_attrs(study_id).get(QUEUE_KEY, []))

    def set_trial_user_attrs(self, trial_id: int, attrs: Mapping[str, Any]) -> None:
        """Several user attributes (Optuna's proxy takes one per call)."""
        for key, value in attrs.items():
            self.set_trial_user_attr(trial_id, key, value)


def open_grpc(url: str, liveness: Liveness) -> GrpcStorage:
    """A client of the proxy at ``url``, which must answer within CONNECT_TIMEOUT seconds."""
    storage = GrpcStorage(url, liveness)
    try:
        storage.wait_server_ready(timeout=CONNECT_TIMEOUT)
    except ConnectionError:
        raise StorageError(f"--storage {url}: no storage proxy answers there within {CONNECT_TIMEOUT}s; "
                           "start one with `hpo proxy --storage DATABASE_URL`") from None
    return storage
