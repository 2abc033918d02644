"""Workers that die: SIGKILL mid-trial, and the trial comes back and resumes from its checkpoint."""

import os
import signal
import subprocess
import sys
import time

import optuna
from conftest import FULL_DATA, hpo_cli
from optuna.trial import TrialState

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


def test_a_killed_worker_s_trial_is_retried_from_its_checkpoint(study_file, storage_url, tmp_path):
    path = study_file(LONG, data=FULL_DATA)
    common = [str(path), "--storage", storage_url, "--device", "cpu", "--skip-checks", "--out", str(tmp_path / "r"),
              "--artifacts", str(tmp_path / "a"), "--heartbeat", "1", "--grace", "3", "--checkpoint-every", "0"]
    victim = subprocess.Popen([sys.executable, "-m", "hpo.cli", "run", *common], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    deadline, killed = time.time() + 120, None
    while time.time() < deadline and killed is None and victim.poll() is None:
        time.sleep(0.2)
        try:
            running = [t for t in optuna.load_study(study_name="small", storage=storage_url).trials
                       if t.state == TrialState.RUNNING and len(t.user_attrs.get("history", [])) >= 5]
        except KeyError:  # no study yet
            continue
        if running:
            victim.send_signal(signal.SIGKILL)
            killed = running[0].number
    victim.wait(timeout=30)
    assert killed is not None, victim.stderr.read()

    r = hpo_cli("run", *common)  # a new worker finds the dead one's trial once its heartbeat is stale
    assert r.returncode == 0, r.stderr
    trials = optuna.load_study(study_name="small", storage=storage_url).trials
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    assert len(by_state[TrialState.COMPLETE]) == 2 and not by_state[TrialState.RUNNING]
    assert [t.number for t in by_state[TrialState.FAIL]] == [killed]
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == killed]
    assert retry.state == TrialState.COMPLETE and retry.params == trials[killed].params
    resumed = retry.user_attrs["resumed_from_epoch"]
    assert resumed >= 5  # went on from the last epoch checkpoint, not from scratch
    history = retry.user_attrs["history"]
    assert [h["epoch"] for h in history] == list(range(1, 61))  # the whole run, once
    assert retry.user_attrs["run_dir"] == trials[killed].user_attrs["run_dir"]
    print(f"killed trial {killed} at epoch >= 5; retry {retry.number} resumed from epoch {resumed}; "
          f"val_acc by epoch: {[round(h['val_acc'], 3) for h in history[:resumed + 3]]}...")
    assert os.path.isfile(os.path.join(retry.user_attrs["run_dir"], "last.pt"))
