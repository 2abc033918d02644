"""`hpo proxy`: Optuna's gRPC storage proxy in front of the database, so that workers by the
hundred (``--storage grpc://host:port``, hpo.storages.remote) share a few database connections instead of
holding their own and polling the trial list each.

Besides serving Optuna's storage calls, the proxy keeps every hpo study's queue, which needs the
study lock that only a database session can take (workers behind it have none): it queues slots up
to N, fails and queues again the trials of dead workers (their heartbeats reach it as
HEARTBEAT_KEY writes), and queues again the attempts marked for retry.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC's own log lines off: hpo says what failed
import grpc  # noqa: E402
import optuna
from optuna.storages._cached_storage import _CachedStorage  # what run_grpc_proxy_server's docs ask for
from optuna.storages._grpc.auto_generated import api_pb2_grpc
from optuna.storages._grpc.servicer import OptunaStorageProxyService
from optuna.trial import TrialState

from hpo.config.study_file import StudyConfig
from hpo.storages.rdb import ResilientRDBStorage, open_storage
from hpo.storages.remote import QUEUE_KEY
from hpo.storages.retries import Liveness, StorageError, mask
from hpo.study.faults import reap
from hpo.study.handle import COUNTED, StudyHandle
from hpo.study.queue import requeue, top_up
from hpo.study.records import CONFIG_ATTR, TARGET_ATTR
from hpo.workers.exits import UsageError
from hpo.workers.runner import say

KEEP_EVERY = 0.5  # seconds between the keeper's passes over the studies
QUEUE_HEAD = 256  # WAITING trial ids published to the workers (hpo.storages.remote.QUEUE_KEY)
# The proxy's gRPC threads (Optuna's default), each holding at most one database connection, within
# SQLAlchemy's pool of 5 + 10 overflow beside the keeper's.
THREADS = 10


@dataclass(frozen=True)
class ProxyOptions:
    """How `hpo proxy` runs."""

    storage: str  # the database's URL (not grpc://)
    host: str = "127.0.0.1"  # the interface to listen on; 0.0.0.0 for other machines
    port: int = 13000  # Optuna's default
    liveness: Liveness = Liveness.watching()  # its grace period and database timeout (Liveness.watching)

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"--port must be a TCP port, 1 to 65535, got {self.port}")


def keep(storage: ResilientRDBStorage, stop: threading.Event, every: float = KEEP_EVERY) -> None:
    """Keep the queue of every unfinished hpo study until ``stop`` is set (see above). An error is
    said and the next pass tries again: the proxy must outlive a bad study or a database outage."""
    handles: dict[int, StudyHandle] = {}
    reaped = -float("inf")
    while not stop.wait(every):
        try:
            # Trials that nobody runs any more count as such only after the grace period, so
            # looking once a heartbeat interval is enough.
            reaping = time.monotonic() - reaped >= storage.get_heartbeat_interval()
            for study in storage.get_all_studies():
                if CONFIG_ATTR not in study.user_attrs or TARGET_ATTR not in study.user_attrs:
                    continue  # not hpo's, or not started yet
                if study._study_id not in handles:
                    loaded = optuna.load_study(study_name=study.study_name, storage=storage)
                    handles[study._study_id] = StudyHandle(loaded, storage,
                                                           StudyConfig.from_dict(study.user_attrs[CONFIG_ATTR]))
                _keep_one(handles[study._study_id], reaping)
            reaped = time.monotonic() if reaping else reaped
        except (StorageError, optuna.exceptions.OptunaError, KeyError, ValueError) as e:
            say(f"proxy: keeping the queue failed, tried again in {every:g}s: {e}")


def _keep_one(handle: StudyHandle, reaping: bool) -> None:
    """One pass over a study. Every listing re-reads the unfinished trials (Optuna's trial cache), so
    the pass lists once and does only what that listing shows is needed."""
    trials = handle.trials()
    if sum(t.state in COUNTED for t in trials) >= handle.target:
        return
    if reaping:
        reap(handle)
    changed = top_up(handle)  # the slots of attempts marked requeue first
    head = [t._trial_id for t in (handle.trials() if changed else trials) if t.state == TrialState.WAITING]
    storage, study_id = handle.storage, handle.study._study_id
    if head[:QUEUE_HEAD] != storage.get_study_system_attrs(study_id).get(QUEUE_KEY):
        storage.set_study_system_attr(study_id, QUEUE_KEY, head[:QUEUE_HEAD])


def serve(opts: ProxyOptions, ready: Callable[[str], None] | None = None) -> None:
    """Serve until interrupted; ``ready(url)`` once clients can connect."""
    if opts.storage.startswith("grpc:"):
        raise StorageError(f"--storage {opts.storage}: the proxy needs the database's own URL (e.g. "
                           "postgresql+psycopg://user@host/db), not another proxy's")
    holder: list[ResilientRDBStorage] = []
    storage = open_storage(opts.storage, lambda s, t: requeue(holder[0], s, t), opts.liveness)
    holder.append(storage)
    # Optuna's make_server, but with SO_REUSEPORT off (gRPC's default is on): a second proxy on the
    # same port must fail, not share the clients with the first.
    server = grpc.server(ThreadPoolExecutor(max_workers=THREADS), options=[("grpc.so_reuseport", 0)])
    api_pb2_grpc.add_StorageServiceServicer_to_server(OptunaStorageProxyService(_CachedStorage(storage)), server)
    try:
        server.add_insecure_port(f"{opts.host}:{opts.port}")
    except RuntimeError:  # grpc: "Failed to bind to address"
        raise UsageError(f"--host {opts.host} --port {opts.port}: cannot listen there (the port is taken, or the "
                         "address is not this machine's); pick another --port") from None
    stop = threading.Event()
    keeper = threading.Thread(target=keep, args=(storage, stop), name="keeper", daemon=True)
    server.start()
    keeper.start()
    url = f"grpc://{opts.host}:{opts.port}"
    (ready or say)(f"storage proxy on {url} for {mask(opts.storage)}; workers: --storage {url}")
    try:
        server.wait_for_termination()
    finally:
        stop.set()
        server.stop(grace=5).wait()
        # Not for longer: a keeper waiting out a lost database (--db-timeout) would hold the exit for
        # minutes. Whatever it was writing rolls back with its connection, and its lock goes with it.
        keeper.join(timeout=5)
