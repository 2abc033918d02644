"""What a person watching a study sees (hpo/progress.py): a line per finished trial on stdout, read from
a real study in a real database, whoever wrote the trial."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import struct
import termios
import threading
import time
from collections.abc import Callable
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

import hpo.study.progress
from hpo.config.study_file import load_study
from hpo.storages.rdb import open_storage
from hpo.storages.retries import Liveness
from hpo.study.handle import StudyHandle
from hpo.study.progress import Progress, trial_line
from hpo.study.records import TARGET_ATTR

# Anything the watcher thread raises besides the StorageError it handles is a failure, not a warning.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

SPACE = {"train.lr": FloatDistribution(1e-5, 1e-1, log=True), "model.hidden": IntDistribution(8, 256),
         "train.optimizer": CategoricalDistribution(("adam", "sgd")), "model.dropout": FloatDistribution(0.0, 0.5)}
TARGET = 4  # the study's N, set as `hpo run --n-trials` sets it (the study file says 20)
ETA = "ETA ~ min"  # in an expected line: an ETA, whose value depends on the machine's speed


def params(lr: float) -> dict[str, Any]:
    """A point of SPACE: floats (shown with :g), an int and a choice."""
    return {"train.lr": lr, "model.hidden": 64, "train.optimizer": "sgd", "model.dropout": 0.25}


def trial(state: TrialState, value: float | None, lr: float, **attrs: Any) -> FrozenTrial:
    """A finished trial as a worker leaves it: parameters from the study's space and the user attrs it sets."""
    # A pruned trial's value is its last reported epoch: that is what study.tell stores for it.
    steps = {0: value} if state == TrialState.PRUNED else {}
    return create_trial(state=state, value=value, params=params(lr), distributions=SPACE, user_attrs=attrs,
                        intermediate_values=steps)


def complete(value: float, lr: float = 1e-3) -> FrozenTrial:
    return trial(TrialState.COMPLETE, value, lr, best_epoch=7, epochs_run=10, stop_reason="early_stopping",
                 seconds=12.34)


def pruned(value: float, lr: float = 1e-3) -> FrozenTrial:
    return trial(TrialState.PRUNED, value, lr, best_epoch=2, epochs_run=3, stop_reason="pruned", seconds=4.0)


def failed(lr: float = 0.1) -> FrozenTrial:
    return trial(TrialState.FAIL, None, lr, fail_reason="TrainingDiverged: loss is nan")


def make_handle(study_file, url: str, db_timeout: float = 0) -> StudyHandle:
    """A study of N = TARGET at ``url`` holding, from before, trial #0 (COMPLETE, 0.8125) and #1 (FAIL)."""
    cfg = load_study(study_file())
    storage = open_storage(url, liveness=Liveness(db_timeout=db_timeout))
    study = optuna.create_study(study_name=cfg.study.name, storage=storage, direction="maximize")
    study.set_user_attr(TARGET_ATTR, TARGET)
    study.add_trial(complete(0.8125, lr=3e-5))
    study.add_trial(failed())
    return StudyHandle(study, storage, cfg)


@pytest.fixture
def handle(study_file, tmp_path) -> StudyHandle:
    return make_handle(study_file, f"sqlite:///{tmp_path / 'study.db'}")


@pytest.fixture(autouse=True)
def _quiet_optuna():
    """Optuna logs each new study on stderr, which the tests read as what the bar wrote."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(level)


def wait_until(done: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Until ``done()``; fails with ``what`` if that does not happen within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"{what} within {timeout:g}s"
        time.sleep(0.01)


def assert_lines(out: str, expected: list[str]) -> None:
    """``out`` is exactly the ``expected`` lines, where ``ETA ~ min`` stands for any ETA in minutes."""
    lines = out.splitlines()
    assert len(lines) == len(expected), out
    for line, want in zip(lines, expected, strict=True):
        assert re.fullmatch(re.escape(want).replace(re.escape(ETA), r"ETA \d+\.\d min"), line), (line, want)


# 1. One trial's line: what the user reads, so it is checked to the character.

def test_a_line_per_state_shows_the_value_short_params_and_where_it_stopped(handle):
    handle.study.add_trial(pruned(0.4375, lr=0.01))
    done, fail, prune = handle.trials()
    assert trial_line(done) == ("trial   0 COMPLETE  val_acc 0.8125  lr=3e-05 hidden=64 optimizer=sgd dropout=0.25  "
                                "best epoch 7/10 (early_stopping)  12.3s")
    assert trial_line(fail) == ("trial   1 FAIL      lr=0.1 hidden=64 optimizer=sgd dropout=0.25  "
                                "TrainingDiverged: loss is nan")
    assert trial_line(prune) == ("trial   2 PRUNED    val_acc 0.4375  lr=0.01 hidden=64 optimizer=sgd dropout=0.25  "
                                 "best epoch 2/3 (pruned)  4.0s")


# 2. Progress over a running study.

def test_it_prints_each_trial_that_finishes_while_the_body_runs_once_whoever_wrote_it(handle, monkeypatch, capsys):
    monkeypatch.setattr(hpo.study.progress, "POLL", 0.02)
    # Another worker: its own connection to the same SQLite file, as a process elsewhere has.
    other = optuna.load_study(study_name=handle.study.study_name, storage=handle.storage.url)
    # Waits are on what the watcher has seen, not on the output: reading capsys while the watcher
    # writes could drop a line (readouterr empties the buffer the thread writes into).
    with Progress(handle) as progress:
        handle.study.add_trial(complete(0.9))  # #2, by this worker
        wait_until(lambda: 2 in progress.seen, "the watcher did not see trial 2")
        other.add_trial(pruned(0.5))  # #3
        other.add_trial(failed())  # #4: a failure is shown, but not counted
        wait_until(lambda: {3, 4} <= progress.seen, "the watcher did not see the other worker's trials")
    out, err = capsys.readouterr()
    # #0 and #1 had finished before: not shown again. The final poll, after the watcher's, adds nothing.
    assert_lines(out, [
        "trial   2 COMPLETE  val_acc 0.9000  lr=0.001 hidden=64 optimizer=sgd dropout=0.25  best epoch 7/10 "
        f"(early_stopping)  12.3s  | 2/4 done, best 0.9000 (#2), {ETA}",
        "trial   3 PRUNED    val_acc 0.5000  lr=0.001 hidden=64 optimizer=sgd dropout=0.25  best epoch 2/3 "
        f"(pruned)  4.0s  | 3/4 done, best 0.9000 (#2), {ETA}",
        "trial   4 FAIL      lr=0.1 hidden=64 optimizer=sgd dropout=0.25  TrainingDiverged: loss is nan"
        f"  | 3/4 done, best 0.9000 (#2), {ETA}",
    ])
    assert err == ""  # stderr is no terminal here: the bar stays off


def test_the_final_poll_prints_what_finished_after_the_last_look_in_number_order(handle, monkeypatch, capsys):
    monkeypatch.setattr(hpo.study.progress, "POLL", 3600.0)  # the watcher never looks: the exit printed it
    other = optuna.load_study(study_name=handle.study.study_name, storage=handle.storage.url)
    with Progress(handle):
        handle.study.add_trial(complete(0.7))  # #2
        other.enqueue_trial(params(0.02))  # #3 and #4, started side by side...
        other.enqueue_trial(params(0.03))
        first, second = other.ask(SPACE), other.ask(SPACE)
        other.tell(second, 0.95)  # ...and #4 ends first, told without the attrs a worker sets
        for key, value in pruned(0.5).user_attrs.items():  # #3 as a worker prunes it: report, then tell
            first.set_user_attr(key, value)
        first.report(0.5, 0)
        other.tell(first, state=TrialState.PRUNED)
    out, _ = capsys.readouterr()
    # The tail is the study at the poll's time, not at each trial's end: N reached, so no ETA, and
    # the best is #4 on every line, #2's and #3's included.
    tail = "  | 4/4 done, best 0.9500 (#4)"
    assert_lines(out, [
        "trial   2 COMPLETE  val_acc 0.7000  lr=0.001 hidden=64 optimizer=sgd dropout=0.25  best epoch 7/10 "
        "(early_stopping)  12.3s" + tail,
        "trial   3 PRUNED    val_acc 0.5000  lr=0.02 hidden=64 optimizer=sgd dropout=0.25  best epoch 2/3 (pruned)  "
        "4.0s" + tail,
        "trial   4 COMPLETE  val_acc 0.9500  lr=0.03 hidden=64 optimizer=sgd dropout=0.25  best epoch None/None "
        "(None)  0.0s" + tail,
    ])


def test_an_error_in_the_body_propagates_after_the_final_poll(handle, monkeypatch, capsys):
    """A Ctrl-C's trial, the failure that spent the budget: the last lines are what the user needs."""
    monkeypatch.setattr(hpo.study.progress, "POLL", 3600.0)  # only the final poll could print #2
    with pytest.raises(KeyboardInterrupt), Progress(handle) as progress:
        handle.study.add_trial(failed())  # #2
        raise KeyboardInterrupt
    assert not progress.thread.is_alive()
    out, err = capsys.readouterr()
    assert_lines(out, ["trial   2 FAIL      lr=0.1 hidden=64 optimizer=sgd dropout=0.25  TrainingDiverged: loss is "
                       "nan  | 1/4 done, best 0.8125 (#0)"])  # no ETA: nothing counted finished here
    assert err == ""


def test_a_pruned_trial_without_a_value_has_its_line(handle):
    handle.study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, params=params(0.01),
                                                     distributions=SPACE, user_attrs=pruned(0.5).user_attrs))
    assert trial_line(handle.trials()[-1]).startswith("trial   2 PRUNED    val_acc -  lr=0.01 ")


def test_disabled_it_prints_nothing_and_starts_no_thread(handle, capsys):
    with Progress(handle, enabled=False):
        handle.study.add_trial(complete(0.9))
        assert "progress" not in {t.name for t in threading.enumerate()}
    assert capsys.readouterr() == ("", "")


def read_terminal(fd: int) -> str:
    """All that was written to the terminal whose master side is ``fd``; its other side must be closed."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: nothing left, and nobody will write any more
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode()


def test_on_a_terminal_the_bar_shows_the_count_and_the_best(handle, monkeypatch, capsys):
    monkeypatch.setattr(hpo.study.progress, "POLL", 3600.0)
    master, slave = pty.openpty()  # a real terminal, 120 columns wide
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    # redirect_stderr, not monkeypatch: that would put capsys's stream back after capsys has gone
    with open(slave, "w") as terminal, contextlib.redirect_stderr(terminal):
        with Progress(handle):
            handle.study.add_trial(complete(0.9))  # #2
    screen = read_terminal(master)
    assert re.search(r"\b1/4 ", screen), screen  # where it started: #0 had finished before
    assert re.search(r"\b2/4 \[.*best 0\.9000 #2\]", screen), screen  # where it ended
    assert capsys.readouterr().out.startswith("trial   2 COMPLETE  val_acc 0.9000")  # lines stay on stdout


# 3. The database away: the watcher stops, the run goes on, and the exit catches up.

def test_a_lost_database_stops_the_watcher_but_not_the_body(study_file, postgres_url, proxy, monkeypatch, capsys):
    monkeypatch.setattr(hpo.study.progress, "POLL", 0.02)
    # The storage as a worker opens it (db_timeout: how long its calls retry a lost connection), via the proxy.
    handle = make_handle(study_file, postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"), db_timeout=1)
    with Progress(handle) as progress:
        proxy.cut()  # every connection dropped, new ones refused: the watcher's calls give up after 1 s
        wait_until(lambda: not progress.thread.is_alive(), "the watcher did not stop")
        proxy.restore()
        handle.study.add_trial(complete(0.9))  # #2: the body goes on, with the database back
    out, err = capsys.readouterr()
    assert_lines(out, [
        "trial   2 COMPLETE  val_acc 0.9000  lr=0.001 hidden=64 optimizer=sgd dropout=0.25  best epoch 7/10 "
        f"(early_stopping)  12.3s  | 2/4 done, best 0.9000 (#2), {ETA}",
    ])
    assert err == ""  # the user is not told that the progress lines stopped
