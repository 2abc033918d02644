"""How a command ends: each error as one line on stderr and an exit code. The ``hpo`` command and
the worker processes of ``hpo run --workers K`` (which end as ``hpo worker`` would) share it."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

import torch

from hpo.checkpoints import CheckpointError
from hpo.checks import GateFailed
from hpo.config import ConfigError
from hpo.data import DataError
from hpo.faults import TooManyFailures
from hpo.files import WriteError
from hpo.storage import DatabaseError, StorageError, StorageUnavailable
from hpo.study import StudyError
from hpo.train import TrainingDiverged

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
    ((DataError, CheckpointError, UsageError, StorageError, StudyError), EXIT_BAD_INPUT, ""),
    ((WorkersFailed, TooManyFailures), EXIT_FAILED, ""),
    ((TrainingDiverged,), EXIT_FAILED, "training diverged: "),
    ((torch.OutOfMemoryError,), EXIT_FAILED, "out of memory: "),
)


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
        for kinds, code, prefix in EXPECTED:
            if isinstance(e, kinds):
                message = str(e).splitlines()[0] if isinstance(e, torch.OutOfMemoryError) else str(e)
                print(f"hpo: {prefix}{message}", file=sys.stderr)
                return code
        raise
