"""Studies on real storage (a SQLite file and a PostgreSQL server), run by real worker processes."""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from conftest import hpo_cli
from optuna.trial import TrialState

from hpo.config import load_study
from hpo.study import DRAW_ATTR, draw, open_study

SEARCH = """augment = "none"
[study]
n_trials = 4
[train]
epochs = 1
[search]
"train.lr" = [0.01, 0.003, 0.001]
"train.batch_size" = [32, 64]
"""


def trials(url: str, name: str = "small") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def states(url: str, name: str = "small") -> dict[str, int]:
    out: dict[str, int] = {}
    for t in trials(url, name):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


@pytest.mark.parametrize("workers, n", [(2, 6), (4, 10)])
def test_workers_finish_exactly_n(study_file, storage_url, tmp_path, workers, n):
    path = study_file(SEARCH)
    r = hpo_cli("run", path, "--storage", storage_url, "--n-trials", n, "--workers", workers, "--device", "cpu",
                "--skip-checks", "--out", tmp_path / "runs", "--artifacts", tmp_path / "art", "--json")
    assert r.returncode == 0, r.stderr
    assert states(storage_url) == {"COMPLETE": n}
    done = trials(storage_url)
    assert sorted(t.number for t in done) == list(range(n))  # no duplicate, none missing
    assert sorted(t.user_attrs[DRAW_ATTR] for t in done) == list(range(n))  # each queued slot ran once
    cfg = load_study(path)
    assert all(t.params == draw(cfg, t.user_attrs[DRAW_ATTR]) for t in done)  # seeded per slot
    assert len({t.user_attrs["hostname"] for t in done}) == 1 and all(len(t.user_attrs["history"]) == 1 for t in done)
    summary = json.loads(r.stdout.splitlines()[-1])
    assert summary["finished"] == n and summary["value"] == max(t.value for t in done)

    again = hpo_cli("run", path, "--storage", storage_url, "--n-trials", n, "--device", "cpu", "--skip-checks",
                    "--out", tmp_path / "runs", "--artifacts", tmp_path / "art")
    assert again.returncode == 0, again.stderr
    assert len(trials(storage_url)) == n  # a finished study gets no new trial


def test_queued_slots_hold_their_draw_and_running_one_writes_no_parameter(study_file, storage_url):
    import sqlalchemy

    from hpo.study import pop_waiting, set_target, top_up
    from hpo.worker import suggest

    cfg = load_study(study_file(SEARCH))
    handle = open_study(cfg, storage_url, create=True)
    set_target(handle, 3)
    assert top_up(handle) == 3
    waiting = handle.trials((TrialState.WAITING,))
    assert [t.params for t in waiting] == [draw(cfg, i) for i in range(3)]  # visible before they run
    engine = sqlalchemy.create_engine(storage_url)

    def param_rows() -> int:
        with engine.connect() as conn:
            return conn.execute(sqlalchemy.text("SELECT count(*) FROM trial_params")).scalar_one()

    before = param_rows()
    trial, _ = pop_waiting(handle)
    assert suggest(trial, cfg) == draw(cfg, trial.user_attrs[DRAW_ATTR])
    assert param_rows() == before == 3 * len(cfg.search)  # read back, not written again
    engine.dispose()


def test_a_step_range_queues_its_top_value(study_file, tmp_path):
    """0.004 + 5 * 0.01 is 0.054000000000000006 in floats, above high; the slot must still be queued,
    with the grid's top value."""
    from hpo.study import distributions, set_target, top_up

    cfg = load_study(study_file(SEARCH.replace('"train.lr" = [0.01, 0.003, 0.001]',
                                               '"train.lr" = {low = 0.004, high = 0.054, step = 0.01}')))
    handle = open_study(cfg, f"sqlite:///{tmp_path / 'study.db'}", create=True)
    set_target(handle, 16)
    assert top_up(handle) == 16
    lrs = {t.params["train.lr"] for t in handle.trials((TrialState.WAITING,))}
    assert 0.054 in lrs and lrs <= {0.004 + 0.01 * k for k in range(5)} | {0.054}
    lr = distributions(cfg)["train.lr"]
    assert all(lr._contains(draw(cfg, i)["train.lr"]) for i in range(100))


def test_the_gate_blocks_a_broken_config(study_file, storage_url, tmp_path):
    r = hpo_cli("run", study_file(SEARCH), "--storage", storage_url, "--param", "train.lr=0.0", "--device", "cpu",
                "--out", tmp_path / "runs")
    assert r.returncode == 3, r.stderr
    assert "sanity checks failed: fit_one_sample" in r.stderr
    assert trials(storage_url) == []
    attrs = optuna.load_study(study_name="small", storage=storage_url).user_attrs
    assert any(k.startswith("gate:") and v["passed"] is False for k, v in attrs.items())


def test_early_stopping_completes_the_trial_and_it_can_be_best(study_file, storage_url, tmp_path):
    # lr 0.003 reaches 100 % val accuracy on the easy synthetic data, then plateaus: stopped
    # after `patience` epochs. lr 1e-5 barely moves and runs all its epochs.
    path = study_file("""augment = "none"
[study]
sampler = "grid"
n_trials = 2
[train]
epochs = 25
patience = 3
[search]
"train.lr" = [0.003, 0.00001]
""")
    r = hpo_cli("run", path, "--storage", storage_url, "--device", "cpu", "--skip-checks", "--out", tmp_path / "r",
                "--artifacts", tmp_path / "art")
    assert r.returncode == 0, r.stderr
    fast, slow = sorted(trials(storage_url), key=lambda t: -t.params["train.lr"])
    assert fast.state == TrialState.COMPLETE and fast.user_attrs["stop_reason"] == "early_stopping"
    assert fast.user_attrs["epochs_run"] == fast.user_attrs["best_epoch"] + 3 < 25
    assert fast.value == max(h["val_acc"] for h in fast.user_attrs["history"])  # its best epoch, not its last
    assert slow.value < fast.value

    best = hpo_cli("best", path, "--storage", storage_url, "--json")
    assert best.returncode == 0, best.stderr
    info = json.loads(best.stdout.splitlines()[-1])
    assert (info["number"], info["value"], info["stop_reason"]) == (fast.number, fast.value, "early_stopping")
    assert info["params"] == {"train.lr": 0.003} and info["checkpoint_artifact"]
    assert list((tmp_path / "art").rglob(info["checkpoint_artifact"]))  # the checkpoint is in the store


def test_invalid_combinations_fail_with_a_reason_and_are_replaced(study_file, tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    path = study_file("""[study]
n_trials = 4
[train]
epochs = 1
[search]
"data.subset_size" = [300, 700]
""")  # 700 > train_size 600: invalid
    r = hpo_cli("run", path, "--storage", url, "--device", "cpu", "--skip-checks", "--out", tmp_path / "r",
                "--artifacts", tmp_path / "art")
    assert r.returncode == 0, r.stderr
    failed = [t for t in trials(url) if t.state == TrialState.FAIL]
    assert states(url)["COMPLETE"] == 4 and failed
    assert all("data.subset_size: must be <= data.train_size" in t.user_attrs["fail_reason"] for t in failed)
    assert all(t.params == {"data.subset_size": 700} for t in failed)


def _mid_training(url: str) -> bool:
    try:
        return any(t.state == TrialState.RUNNING and t.user_attrs.get("history") for t in trials(url))
    except KeyError:  # the study is not created yet
        return False


def test_ctrl_c_fails_the_running_trial(study_file, tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    path = study_file("[study]\nn_trials = 3\n[train]\nepochs = 400\n[search]\n'train.lr' = [0.001]")
    # --checkpoint-every 0 writes the history every epoch, so a RUNNING trial with a history is one mid-training
    # (at the default 10 s cadence a fast machine could finish all three before any history shows).
    proc = subprocess.Popen([sys.executable, "-m", "hpo.cli", "run", str(path), "--storage", url, "--device", "cpu",
                             "--skip-checks", "--checkpoint-every", "0", "--out", str(tmp_path / "r")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not _mid_training(url):
        assert time.time() < deadline and proc.poll() is None, "no trial was seen mid-training"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "RUNNING" not in states(url) and states(url)["FAIL"] == 1
    (failed,) = [t for t in trials(url) if t.state == TrialState.FAIL]
    assert failed.user_attrs["fail_reason"] == "KeyboardInterrupt"


def test_a_study_name_with_another_config_is_refused(study_file, tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = load_study(study_file(SEARCH))
    open_study(cfg, url, create=True)
    other = load_study(study_file(SEARCH.replace("[0.01, 0.003, 0.001]", "[0.1]")))
    with pytest.raises(Exception, match="already exists with a different search space"):
        open_study(other, url, create=True)


@pytest.mark.parametrize("args, message", [
    (["--n-trials", "0"], "--n-trials must be a positive integer, got 0"),
    (["--n-trials", "-3"], "--n-trials must be a positive integer, got -3"),
    (["--workers", "0"], "--workers must be a positive integer"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be 0 (every epoch) or more seconds, got -1.0"),
    (["--device", "tpu"], "unknown device"),
    (["--storage", "not a url"], "not a database URL"),
])
def test_bad_run_options(study_file, tmp_path, args, message):
    r = hpo_cli("run", study_file(SEARCH), "--out", tmp_path / "r", *args, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert not (tmp_path / "hpo.db").exists() or not trials(f"sqlite:///{tmp_path / 'hpo.db'}")


WORKER = """
import json, sys
from hpo import load_study, open_study
from hpo.worker import suggest, work
handle = open_study(load_study(sys.argv[2]), sys.argv[1], create=False)
def trivial(trial):
    handle.study.tell(trial, suggest(trial, handle.cfg)["train.lr"])
print(json.dumps({"ran": work(handle, trivial)}))
"""


def test_eight_workers_a_hundred_trials_on_postgresql(study_file, postgres_url):
    """The load case: 8 processes race for 100 slots of a trivial objective."""
    from hpo.study import set_target, top_up

    path = study_file(SEARCH)
    handle = open_study(load_study(path), postgres_url, create=True)
    set_target(handle, 100)
    top_up(handle)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, postgres_url, str(path)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(8)]
    ran = [json.loads(p.communicate(timeout=300)[0].splitlines()[-1])["ran"] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    done = trials(postgres_url)
    assert sum(ran) == 100 and len(done) == 100 and all(t.state == TrialState.COMPLETE for t in done)
    assert sorted(t.number for t in done) == list(range(100))
    assert sorted(t.user_attrs[DRAW_ATTR] for t in done) == list(range(100))
