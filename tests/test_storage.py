"""The database side: outages, bad URLs, passwords never shown (SQLite with several writers: test_study)."""

import subprocess
import sys
import time

import optuna
import pytest
from conftest import FULL_DATA, hpo_main
from optuna.trial import TrialState

from hpo.storages.retries import mask

TRIALS = """augment = "none"
[study]
n_trials = 3
[train]
epochs = 40
batch_size = 16
[search]
"train.lr" = [0.001, 0.003]
"""


def via(proxy, url: str, password: str = "") -> str:
    """The same database, reached through the proxy (with a password trust auth ignores)."""
    auth = f"postgres:{password}@" if password else "postgres@"
    return url.replace("postgres@127.0.0.1:5432", f"{auth}127.0.0.1:{proxy.port}")


def start_run(study_file, url: str, tmp_path, *extra) -> subprocess.Popen:
    args = ["run", study_file(TRIALS, data=FULL_DATA), "--storage", url, "--device", "cpu", "--skip-checks",
            "--out", tmp_path / "r", "--artifacts", tmp_path / "a", "--checkpoint-every", "0", *extra]
    return subprocess.Popen([sys.executable, "-m", "hpo.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_epochs(proc: subprocess.Popen, url: str, epochs: int) -> None:
    """Until some trial of the study has ``epochs`` epochs behind it (read past the proxy) while the run goes
    on; each epoch's value is reported as it ends, so this is mid-trial, not at a trial's end. Fails, with
    what it saw and the run's stderr, if the run ends or 120 s pass first: a cut after that would test
    nothing."""
    deadline, seen = time.time() + 120, "no study yet"
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
        try:
            trials = optuna.load_study(study_name="small", storage=url).trials
        except KeyError:  # no study yet
            continue
        done = [len(t.intermediate_values) for t in trials]
        seen = f"epochs per trial: {done}"
        if max(done, default=0) >= epochs and proc.poll() is None:
            return
    ended = "ran past 120 s" if proc.poll() is None else f"exited {proc.returncode}"
    proc.kill()
    pytest.fail(f"no trial had {epochs} epochs while the run went on ({seen}; the run {ended}); "
                f"its stderr:\n{proc.communicate(timeout=30)[1]}")


def test_workers_ride_out_a_database_outage(study_file, postgres_url, proxy, tmp_path):
    worker = start_run(study_file, via(proxy, postgres_url), tmp_path)
    wait_for_epochs(worker, postgres_url, 3)
    proxy.cut()  # every connection dropped, new ones refused...
    time.sleep(5)
    proxy.restore()  # ...for five seconds
    out, err = worker.communicate(timeout=180)
    assert worker.returncode == 0, err
    trials = optuna.load_study(study_name="small", storage=postgres_url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3  # nothing lost, nothing doubled
    assert all([h["epoch"] for h in t.user_attrs["history"]] == list(range(1, 41)) for t in trials)


def test_a_worker_gives_up_after_the_limit_with_one_line(study_file, postgres_url, proxy, tmp_path):
    worker = start_run(study_file, via(proxy, postgres_url, password="s3cret-pw"), tmp_path, "--db-timeout", "3")
    wait_for_epochs(worker, postgres_url, 1)
    proxy.cut()
    t0 = time.time()
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 4, err
    assert time.time() - t0 < 60
    assert err.strip().splitlines()[-1].startswith("hpo: lost the database at postgresql+psycopg://postgres:***@")
    assert "s3cret-pw" not in out + err


@pytest.mark.parametrize("url, message", [
    ("sqlite3:///x.db", "cannot open the database"),
    ("not-a-url", "not a database URL"),
    ("postgresql+psycopg://postgres:hunter2@127.0.0.1:1/nope", "cannot open the database"),  # unreachable
    ("mysql+pymysql://root:wrong-password@127.0.0.1:3306/test", "Access denied"),  # MariaDB, wrong password
    ("mysql+mysqldb://root:hunter2@127.0.0.1:3306/test", "driver is not installed (MySQLdb)"),
])
def test_bad_storage_urls_are_one_line_exit_2(study_file, tmp_path, url, message):
    r = hpo_main("run", study_file(TRIALS, data=FULL_DATA), "--storage", url, "--device", "cpu",
                 "--out", tmp_path / "r", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert "hunter2" not in r.stderr + r.stdout and "wrong-password" not in r.stderr + r.stdout
    assert not (tmp_path / "r").exists()


def test_a_study_with_another_config_is_refused_and_left_as_it_was(study_file, storage_url, tmp_path):
    common = ["--storage", storage_url, "--device", "cpu", "--skip-checks", "--out", tmp_path / "r",
              "--artifacts", tmp_path / "a"]
    path = study_file(TRIALS.replace("epochs = 40", "epochs = 1"), data=FULL_DATA)
    assert hpo_main("run", path, *common).returncode == 0
    before = [(t.number, t.state, t.params) for t in optuna.load_study(study_name="small", storage=storage_url).trials]
    attrs = optuna.load_study(study_name="small", storage=storage_url).user_attrs
    r = hpo_main("run", path, *common, "--param", "train.batch_size=64")
    assert r.returncode == 2, r.stderr
    assert "made with another config (train.batch_size: 16 in the study, 64 in the file)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    study = optuna.load_study(study_name="small", storage=storage_url)
    assert [(t.number, t.state, t.params) for t in study.trials] == before and study.user_attrs == attrs


def test_masked_urls():
    assert mask("postgresql+psycopg://bob:pa55@db:5432/hpo") == "postgresql+psycopg://bob:***@db:5432/hpo"
    assert mask("sqlite:///hpo.db") == "sqlite:///hpo.db"
    assert "pa55" not in mask("postgresql://bob:pa55@[bad")
