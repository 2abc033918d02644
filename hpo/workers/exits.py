"""How a command ends: each error as one line on stderr and an exit code. The ``hpo`` command and
the worker processes of ``hpo run --workers K`` (which end as ``hpo worker`` would) share it."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from hpo.config.schema import ConfigError
from hpo.engine.records import CheckpointError, DataError, GateFailed, ModelError, TrainingDiverged
from hpo.files import WriteError
from hpo.storages.retries import DatabaseError, StorageError, StorageUnavailable
from hpo.study.faults import TooManyFailures
from hpo.study.handle import StudyError

EXIT_FAILED = 1  # trials failed past the budget, a worker failed, the one training run failed
EXIT_BAD_INPUT = 2
EXIT_CHECKS_FAILED = 3
EXIT_STORAGE_LOST = 4
EXIT_CANNOT_WRITE = 5
EXIT_INTERRUPTED = 130  # as a shell reports a Ctrl-C


class UsageError(Exception):
    """Bad input from the command line; the message is the one line the user sees."""


class WorkersFailed(RuntimeError):
    """Some of the worker processes of ``hpo run --workers K`` did not finish cleanly."""


# The errors a person can act on, in the order they are matched: (kind, exit code, what precedes the message).
EXPECTED: tuple[tuple[tuple[type[BaseException], ...], int, str], ...] = (
    ((StorageUnavailable, DatabaseError), EXIT_STORAGE_LOST, ""),
    ((GateFailed,), EXIT_CHECKS_FAILED, ""),
    ((WriteError,), EXIT_CANNOT_WRITE, ""),
    ((DataError, ModelError, CheckpointError, UsageError, StorageError, StudyError), EXIT_BAD_INPUT, ""),
    ((WorkersFailed, TooManyFailures), EXIT_FAILED, ""),
    ((TrainingDiverged,), EXIT_FAILED, "training diverged: "),
)


def _out_of_memory(e: Exception) -> bool:
    """torch's OOM, without importing torch: a command that never loaded it cannot have run out."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(e, torch.OutOfMemoryError)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # a supervisor's SIGTERM ends a run as Ctrl-C does: trials failed and queued again


def run_command(command: Callable[[], int]) -> int:
    """``command``'s exit code; an error it raises a person can act on is one line on stderr and
    its own code. SIGTERM is taken as Ctrl-C. Anything else (a bug) raises with its traceback."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return command()
    except ConfigError as e:
        for line in e.problems:
            print(f"hpo: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("hpo: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if _out_of_memory(e):
            print(f"hpo: out of memory: {str(e).splitlines()[0]}", file=sys.stderr)
            return EXIT_FAILED
        for kinds, code, prefix in EXPECTED:
            if isinstance(e, kinds):
                print(f"hpo: {prefix}{e}", file=sys.stderr)
                return code
        raise
