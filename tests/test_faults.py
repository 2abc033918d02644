"""Trials nobody runs any more, and studies whose every trial fails (hpo/faults.py)."""

import subprocess

import optuna
from conftest import FULL_DATA, hpo_cli, hpo_main
from optuna.trial import TrialState

DIVERGES = """augment = "none"
[study]
n_trials = 3
[model]
depth = 4
[train]
optimizer = "sgd"
lr = 10.0
epochs = 3
[search]
"train.seed" = {low = 0, high = 1000}
"""


def test_a_study_whose_every_trial_fails_stops_at_the_failure_budget(study_file, tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    common = [study_file(DIVERGES), "--storage", url, "--device", "cpu", "--skip-checks", "--out", tmp_path / "r"]
    r = hpo_cli("run", *common, timeout=120)  # before the budget: FAILED trials without end
    assert r.returncode == 1, r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith("hpo: study 'small' stopped: 10 trials failed, the failure budget (--max-failures 10)")
    assert "TrainingDiverged: loss is nan" in line
    study = optuna.load_study(study_name="small", storage=url)
    assert [t.state for t in study.trials].count(TrialState.FAIL) == 10  # the record stays
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]

    again = hpo_main("run", *common, "--max-failures", 12)  # a larger budget goes on, then stops
    assert again.returncode == 1 and "12 trials failed" in again.stderr, again.stderr


SLOW = """augment = "none"
[study]
n_trials = 2
[train]
epochs = 2
[search]
"train.lr" = [0.001]
"""


def test_a_running_trial_without_heartbeat_is_failed_after_grace_and_its_slot_runs(study_file, storage_url, tmp_path):
    path = study_file(SLOW, data=FULL_DATA)
    common = [path, "--storage", storage_url, "--device", "cpu", "--skip-checks", "--out", tmp_path / "r",
              "--artifacts", tmp_path / "a", "--heartbeat", 1, "--grace", 3]
    assert hpo_main("run", *common).returncode == 0
    study = optuna.load_study(study_name="small", storage=storage_url)
    asked = study.ask()  # RUNNING, and nothing will ever beat for it
    r = hpo_cli("run", *common, "--n-trials", 3, timeout=120)  # waited forever before
    assert r.returncode == 0, r.stderr
    assert f"waiting for trial(s) {asked.number}, RUNNING elsewhere" in r.stderr
    trials = optuna.load_study(study_name="small", storage=storage_url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL, TrialState.COMPLETE]
    assert "without a heartbeat" in trials[asked.number].user_attrs["fail_reason"]
    assert trials[3].user_attrs["retry_of"] == asked.number


def test_a_full_disk_fails_the_trial_in_one_line_and_queues_it_again(study_file, tmp_path):
    """--out and --artifacts on a 1 MiB filesystem (a real tmpfs: CI runs as root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]).returncode:
        import pytest

        pytest.skip("mounting a small tmpfs needs root")
    try:
        url = f"sqlite:///{tmp_path / 'study.db'}"
        r = hpo_cli("run", study_file(SLOW.replace("epochs = 2", "epochs = 3")), "--storage", url, "--device", "cpu",
                    "--skip-checks", "--out", disk / "runs", "--artifacts", disk / "art", "--param", "model.hidden=512")
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert r.returncode == 5, r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith("hpo: no space left on device writing ") and str(disk) in line, line
    trials = optuna.load_study(study_name="small", storage=url).trials
    assert TrialState.RUNNING not in [t.state for t in trials]
    (failed,) = [t for t in trials if t.state == TrialState.FAIL]
    assert failed.user_attrs["fail_reason"].startswith("WriteError: no space left on device writing")
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == failed.number]
    assert retry.state == TrialState.WAITING and retry.params == failed.params
