"""Workers that die: SIGKILL mid-trial, and the trial comes back and resumes from its checkpoint."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import FULL_DATA, first_checkpoint, hpo_main
from optuna.trial import TrialState

from hpo.engine.checkpoints import load_checkpoint

# Trials of about 2 s (600 images, batch 16, 60 epochs); heartbeats every second, dead after 3.
LONG = """augment = "none"
[study]
n_trials = 2
[train]
epochs = 60
batch_size = 16
[search]
"train.lr" = [0.001]
"""


# On SQLite the same kill and retry is test_a_retry_whose_checkpoint_is_damaged_starts_from_scratch_...
@pytest.mark.parametrize("storage_url, population", [("postgresql", 1), ("postgresql", 2)], indirect=["storage_url"])
def test_a_killed_worker_s_trial_is_retried_from_its_checkpoint(study_file, storage_url, tmp_path, population):
    """With --population 2 both trials train as one population when the worker dies; both come back."""
    path = study_file(LONG, data=FULL_DATA)
    common = [str(path), "--storage", storage_url, "--device", "cpu", "--skip-checks", "--out", str(tmp_path / "r"),
              "--artifacts", str(tmp_path / "a"), "--heartbeat", "1", "--grace", "3", "--checkpoint-every", "0",
              "--population", str(population)]
    _kill_mid_trial(common, storage_url)
    killed = [t.number for t in _running(storage_url, 0)]  # RUNNING until a worker finds them silent
    assert len(killed) == population

    r = hpo_main("run", *common)  # a new worker finds the dead one's trials once their heartbeats are stale
    assert r.returncode == 0, r.stderr
    trials = optuna.load_study(study_name="small", storage=storage_url).trials
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    assert len(by_state[TrialState.COMPLETE]) == 2 and not by_state[TrialState.RUNNING]
    assert [t.number for t in by_state[TrialState.FAIL]] == killed
    resumed = []
    for number in killed:
        (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == number]
        assert retry.state == TrialState.COMPLETE and retry.params == trials[number].params
        resumed.append(retry.user_attrs["resumed_from_epoch"])
        history = retry.user_attrs["history"]
        assert [h["epoch"] for h in history] == list(range(1, 61))  # the whole run, once
        assert retry.user_attrs["run_dir"] != trials[number].user_attrs["run_dir"]  # each attempt has its own folder
        results = json.loads((Path(retry.user_attrs["run_dir"]) / "results.json").read_text())
        assert [h["epoch"] for h in results["history"]] == list(range(1, 61))
    assert max(resumed) >= 5 and min(resumed) >= 1  # went on from the last epoch checkpoint, not from scratch
    print(f"killed trial(s) {killed} at epoch >= 6; the retries resumed from epochs {resumed}")


def _kill_mid_trial(common: list[str], url: str) -> None:
    """SIGKILL an `hpo run` once a trial of it has reported 6 epochs: its epoch 5 is checkpointed by
    then (an epoch is reported before its checkpoint is written, so at 5 reported it may not be yet)."""
    victim = subprocess.Popen([sys.executable, "-m", "hpo.cli", "run", *common], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not _running(url, 6):
        assert time.time() < deadline and victim.poll() is None, victim.stderr.read()
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)


def _running(url: str, epochs: int) -> list[optuna.trial.FrozenTrial]:
    try:
        return [t for t in optuna.load_study(study_name="small", storage=url).trials
                if t.state == TrialState.RUNNING and len(t.intermediate_values) >= epochs]
    except KeyError:  # no study yet
        return []


def test_a_stalled_worker_that_wakes_up_drops_its_attempt(study_file, postgres_url, tmp_path):
    """SIGSTOP past the grace period: another worker fails the trial and runs it again; on SIGCONT the stalled
    worker finds it lost the trial, says so in one line, and leaves the retry's files alone."""
    storage_url = postgres_url  # many machines: where a worker stalls, and is taken for dead
    path = study_file(LONG.replace("n_trials = 2", "n_trials = 1"), data=FULL_DATA)
    common = [str(path), "--storage", storage_url, "--device", "cpu", "--skip-checks", "--out", str(tmp_path / "r"),
              "--artifacts", str(tmp_path / "a"), "--heartbeat", "1", "--grace", "3", "--checkpoint-every", "0"]
    stalled = subprocess.Popen([sys.executable, "-m", "hpo.cli", "run", *common], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not _running(storage_url, 5):
        assert time.time() < deadline and stalled.poll() is None, "no trial was seen mid-training"
        time.sleep(0.2)
    stalled.send_signal(signal.SIGSTOP)
    try:
        r = hpo_main("worker", *common)  # fails the silent trial after the grace period, runs it again
    finally:
        stalled.send_signal(signal.SIGCONT)
    assert r.returncode == 0, r.stderr
    _, err = stalled.communicate(timeout=120)
    assert stalled.returncode == 0, err
    assert err.strip().splitlines() == [
        "hpo: trial 0 was failed and queued again by another worker while this one was stalled "
        "(no heartbeat for over 3s); this attempt is dropped"]
    trials = optuna.load_study(study_name="small", storage=storage_url).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    retry = trials[1]
    assert retry.user_attrs["retry_of"] == 0 and retry.user_attrs["run_dir"] != trials[0].user_attrs["run_dir"]
    results = json.loads((Path(retry.user_attrs["run_dir"]) / "results.json").read_text())
    assert results["best_val_acc"] == retry.value and len(results["history"]) == 60


def test_sigint_to_the_parent_alone_stops_its_workers(study_file, tmp_path):
    """A supervisor signals `hpo run --workers 2` alone, not its process group: the workers stop too."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    path = study_file(LONG.replace("n_trials = 2", "n_trials = 20"), data=FULL_DATA)  # far more than they run
    run = subprocess.Popen([sys.executable, "-m", "hpo.cli", "run", str(path), "--storage", url, "--workers", "2",
                            "--device", "cpu", "--skip-checks", "--out", str(tmp_path / "r"), "--checkpoint-every", "0",
                            "--artifacts", str(tmp_path / "a")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)  # so that the signal reaches it alone
    first_checkpoint(tmp_path / "r", run)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    trials = optuna.load_study(study_name="small", storage=url).trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert interrupted and all(t.user_attrs["fail_reason"] == "KeyboardInterrupt" for t in interrupted)
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) < 20  # the workers did not go on
    retried = {t.user_attrs.get("retry_of") for t in trials if t.state == TrialState.WAITING}
    assert {t.number for t in interrupted} <= retried


def test_a_retry_whose_checkpoint_is_damaged_starts_from_scratch_and_the_study_finishes(study_file, tmp_path):
    """A last.pt cut to 100 bytes (a worker that died mid-copy) is said in one line and never copied on."""
    path = study_file(LONG.replace("n_trials = 2", "n_trials = 1"), data=FULL_DATA)
    url = f"sqlite:///{tmp_path / 'damaged.db'}"
    common = [str(path), "--storage", url, "--device", "cpu", "--skip-checks", "--out", str(tmp_path / "r"),
              "--artifacts", str(tmp_path / "a"), "--heartbeat", "1", "--grace", "3", "--checkpoint-every", "0"]
    _kill_mid_trial(common, url)
    (killed,) = _running(url, 0)
    last = Path(killed.user_attrs["run_dir"]) / "last.pt"
    last.write_bytes(last.read_bytes()[:100])

    r = hpo_main("run", *common)
    assert r.returncode == 0, r.stderr
    assert [line for line in r.stderr.splitlines() if "last.pt" in line] == [
        f"hpo: {last}: not a readable checkpoint (File is not a zip file); starting from scratch"]
    trials = optuna.load_study(study_name="small", storage=url).trials
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_epoch"] == 0
    assert [h["epoch"] for h in retry.user_attrs["history"]] == list(range(1, 61))
    assert load_checkpoint(Path(retry.user_attrs["run_dir"]) / "last.pt")["history"][-1]["epoch"] == 60
    assert not list(Path(retry.user_attrs["run_dir"]).glob(".*.tmp"))  # no half copy left behind
