"""What a person watching a study sees: a line per finished trial and a progress bar with the best
value and an ETA. It watches the storage, so it shows every worker's trials, on any machine."""

from __future__ import annotations

import contextlib
import sys
import threading
import time

from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from hpo.storages.retries import StorageError
from hpo.study.handle import COUNTED, StudyHandle
from hpo.study.records import TrialRecord

POLL = 1.0  # seconds between looks at the storage


def trial_line(t: FrozenTrial) -> str:
    """One line for a finished trial: number, state, value, params, where it stopped."""
    params = " ".join(f"{k.rpartition('.')[2]}={v:g}" if isinstance(v, float) else f"{k.rpartition('.')[2]}={v}"
                      for k, v in t.params.items())
    r = TrialRecord.of(t)
    if t.state == TrialState.FAIL:
        return f"trial {t.number:>3} FAIL      {params}  {r.fail_reason or ''}"
    value = "-" if t.value is None else f"{t.value:.4f}"  # a trial pruned before it reported has none
    return (f"trial {t.number:>3} {t.state.name:<9} val_acc {value}  {params}  best epoch "
            f"{r.best_epoch}/{r.epochs_run} ({r.stop_reason})  {r.seconds or 0:.1f}s")


class Progress:
    """Context manager that reports finished trials while the body runs the study."""

    def __init__(self, handle: StudyHandle, enabled: bool = True):
        self.handle, self.enabled = handle, enabled
        self.seen: set[int] = set()
        self.stop = threading.Event()

    def __enter__(self) -> Progress:
        if not self.enabled:
            return self
        done = self.handle.trials(COUNTED + (TrialState.FAIL,))
        self.seen = {t.number for t in done}
        self.start, self.start_count = time.perf_counter(), sum(t.state in COUNTED for t in done)
        self.bar = tqdm(total=self.handle.target, initial=self.start_count, unit="trial", file=sys.stderr,
                        disable=not sys.stderr.isatty(), dynamic_ncols=True)
        self.thread = threading.Thread(target=self._watch, name="progress", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if not self.enabled:
            return
        self.stop.set()
        self.thread.join()
        # The last trials (after a Ctrl-C too: its trial's FAIL line), unless the database is what
        # failed; a failing last look must not hide the error that ended the body.
        if exc_type is None:
            self._poll()
        elif not issubclass(exc_type, StorageError):
            with contextlib.suppress(Exception):
                self._poll()
        self.bar.close()

    def _watch(self) -> None:
        while not self.stop.wait(POLL):
            try:
                self._poll()
            except StorageError:  # the database is away: the worker itself retries and reports
                return

    def _poll(self) -> None:
        trials = self.handle.trials(COUNTED + (TrialState.FAIL,))
        counted = [t for t in trials if t.state in COUNTED]
        complete = [t for t in counted if t.state == TrialState.COMPLETE]
        best = max(complete, key=lambda t: t.value) if complete else None
        new_here = len(counted) - self.start_count
        left = self.handle.target - len(counted)
        eta = (time.perf_counter() - self.start) / new_here * left if new_here > 0 else None
        for t in sorted((t for t in trials if t.number not in self.seen), key=lambda t: t.number):
            self.seen.add(t.number)
            tail = f"  | {len(counted)}/{self.handle.target} done"
            tail += f", best {best.value:.4f} (#{best.number})" if best else ""
            tail += f", ETA {eta / 60:.1f} min" if eta is not None and left > 0 else ""
            self.bar.write(trial_line(t) + tail, file=sys.stdout)
        self.bar.n = len(counted)
        if best:
            self.bar.set_postfix_str(f"best {best.value:.4f} #{best.number}", refresh=False)
        self.bar.refresh()
