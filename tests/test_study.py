"""Studies on real storage (a SQLite file and a PostgreSQL server), run by real worker processes."""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from conftest import TRAINED_STUDY, first_checkpoint, hpo_cli, hpo_main
from optuna.trial import TrialState

from hpo.config.study_file import load_study
from hpo.study.handle import StudyError
from hpo.study.identity import open_study
from hpo.study.queue import draw
from hpo.study.records import TrialRecord
from hpo.workers.slots import Options

SEARCH = TRAINED_STUDY.replace("epochs = 3", "epochs = 1")  # 4 trials of the grid lr x batch size, an epoch each


def trials(url: str, name: str = "small") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def states(url: str, name: str = "small") -> dict[str, int]:
    out: dict[str, int] = {}
    for t in trials(url, name):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


# 8 processes on PostgreSQL: test_eight_workers_a_hundred_trials_on_postgresql.
@pytest.mark.parametrize("storage_url, workers, n, population", [
    ("sqlite", 4, 8, 1),  # four writers on one file: no "database is locked"
    ("postgresql", 4, 10, 1),
    ("postgresql", 2, 10, 3),  # two workers, each training a population, share one study
], indirect=["storage_url"])
def test_workers_finish_exactly_n(study_file, storage_url, tmp_path, workers, n, population):
    path = study_file(SEARCH)
    r = hpo_cli("run", path, "--storage", storage_url, "--n-trials", n, "--workers", workers, "--device", "cpu",
                "--skip-checks", "--out", tmp_path / "runs", "--artifacts", tmp_path / "art", "--json",
                "--population", population)
    assert r.returncode == 0 and "locked" not in r.stderr, r.stderr
    assert states(storage_url) == {"COMPLETE": n}
    done = trials(storage_url)
    assert sorted(t.number for t in done) == list(range(n))  # no duplicate, none missing
    assert sorted(TrialRecord.of(t).draw for t in done) == list(range(n))  # each queued slot ran once
    cfg = load_study(path)
    assert all(t.params == draw(cfg, TrialRecord.of(t).draw) for t in done)  # seeded per slot
    assert len({t.user_attrs["hostname"] for t in done}) == 1 and all(len(t.user_attrs["history"]) == 1 for t in done)
    summary = json.loads(r.stdout.splitlines()[-1])
    assert summary["finished"] == n and summary["value"] == max(t.value for t in done)

    again = hpo_main("run", path, "--storage", storage_url, "--n-trials", n, "--device", "cpu", "--skip-checks",
                     "--out", tmp_path / "runs", "--artifacts", tmp_path / "art")
    assert again.returncode == 0, again.stderr
    assert len(trials(storage_url)) == n  # a finished study gets no new trial


def test_queued_slots_hold_their_draw_and_running_one_writes_no_parameter(study_file, storage_url):
    import sqlalchemy

    from hpo.study.queue import pop_waiting, set_target, suggest, top_up

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
    assert suggest(trial, cfg) == draw(cfg, TrialRecord.of(trial).draw)
    assert param_rows() == before == 3 * len(cfg.search)  # read back, not written again
    engine.dispose()


def test_a_slot_marked_for_requeue_is_retried_by_the_next_top_up_not_filled_with_a_new_draw(study_file, tmp_path):
    """A worker behind the proxy marks its interrupted trial and tells it FAIL; it cannot queue it. The
    next top-up (the proxy's) must queue that attempt again, even where it lists the study between the
    two and finds a gap: the gap is the attempt's own slot."""
    from hpo.study.queue import pop_waiting, set_target, top_up

    handle = open_study(load_study(study_file(SEARCH)), f"sqlite:///{tmp_path / 'study.db'}", create=True)
    set_target(handle, 1)
    assert top_up(handle) == 1
    trial, _ = pop_waiting(handle)
    trial.report(0.3, 1)
    TrialRecord(fail_reason="KeyboardInterrupt", requeue=True).write(trial)
    handle.study.tell(trial, state=TrialState.FAIL)

    assert top_up(handle) == 1 and top_up(handle) == 0
    (queued,) = handle.trials((TrialState.WAITING,))
    assert TrialRecord.of(queued).retry_of == trial.number and queued.params == trial.params
    assert queued.intermediate_values == {1: 0.3}


def test_a_step_range_queues_its_top_value(study_file, tmp_path):
    """0.004 + 5 * 0.01 is 0.054000000000000006 in floats, above high; the slot must still be queued,
    with the grid's top value."""
    from hpo.study.queue import distributions, set_target, top_up

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
    r = hpo_main("run", study_file(SEARCH), "--storage", storage_url, "--param", "train.lr=0.0", "--device", "cpu",
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
    r = hpo_main("run", path, "--storage", storage_url, "--device", "cpu", "--skip-checks", "--out", tmp_path / "r",
                 "--artifacts", tmp_path / "art")
    assert r.returncode == 0, r.stderr
    fast, slow = sorted(trials(storage_url), key=lambda t: -t.params["train.lr"])
    assert fast.state == TrialState.COMPLETE and fast.user_attrs["stop_reason"] == "early_stopping"
    assert fast.user_attrs["epochs_run"] == fast.user_attrs["best_epoch"] + 3 < 25
    assert fast.value == max(h["val_acc"] for h in fast.user_attrs["history"])  # its best epoch, not its last
    assert slow.value < fast.value

    best = hpo_main("best", path, "--storage", storage_url, "--json")
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
    r = hpo_main("run", path, "--storage", url, "--device", "cpu", "--skip-checks", "--out", tmp_path / "r",
                 "--artifacts", tmp_path / "art")
    assert r.returncode == 0, r.stderr
    failed = [t for t in trials(url) if t.state == TrialState.FAIL]
    assert states(url)["COMPLETE"] == 4 and failed
    assert all("data.subset_size: must be <= data.train_size" in t.user_attrs["fail_reason"] for t in failed)
    assert all(t.params == {"data.subset_size": 700} for t in failed)


@pytest.mark.parametrize("population", [1, 3])
def test_ctrl_c_queues_the_trial_again_and_a_rerun_resumes_it(study_file, tmp_path, population):
    """With --population 3 the grid's three trials train as one population: each is failed and queued again."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    args = [sys.executable, "-m", "hpo.cli", "run", str(study_file(GRID)), "--storage", url, "--device", "cpu",
            "--skip-checks", "--checkpoint-every", "0.25", "--out", str(tmp_path / "r"),
            "--population", str(population)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_checkpoint(tmp_path / "r", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "RUNNING" not in states(url) and states(url)["FAIL"] == population
    failed = [t for t in trials(url) if t.state == TrialState.FAIL]
    assert all(t.user_attrs["fail_reason"] == "KeyboardInterrupt" for t in failed)
    for t in failed:
        (retry,) = [r for r in trials(url) if r.user_attrs.get("retry_of") == t.number]
        assert retry.state == TrialState.WAITING and retry.params == t.params

    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    done = [t for t in trials(url) if t.state == TrialState.COMPLETE]
    assert sorted(t.params["train.lr"] for t in done) == [0.0001, 0.001, 0.01]  # no grid point lost
    retries = [t for t in done if t.user_attrs.get("retry_of") in {f.number for f in failed}]
    assert len(retries) == population and any(t.user_attrs["resumed_from_epoch"] >= 1 for t in retries)
    assert all([h["epoch"] for h in t.user_attrs["history"]] == list(range(1, 41)) for t in retries)


def test_a_study_name_with_another_config_is_refused(study_file, tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = load_study(study_file(SEARCH))
    open_study(cfg, url, create=True)
    other = load_study(study_file(SEARCH.replace("[0.01, 0.003, 0.001]", "[0.1]")))
    with pytest.raises(StudyError) as refused:
        open_study(other, url, create=True)
    assert ('made with another config (search.train.lr: {"choices": [0.01, 0.003, 0.001]} in the study, '
            '{"choices": [0.1]} in the file)') in str(refused.value)


@pytest.mark.parametrize("args, message", [
    (["--n-trials", "0"], "--n-trials must be a positive integer, got 0"),
    (["--n-trials", "-3"], "--n-trials must be a positive integer, got -3"),
    (["--workers", "0"], "--workers must be a positive integer"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be 0 (every epoch) or more seconds, got -1.0"),
    (["--device", "tpu"], "unknown device"),
    (["--storage", "not a url"], "not a database URL"),
])
def test_bad_run_options(study_file, tmp_path, args, message):
    r = hpo_main("run", study_file(SEARCH), "--out", tmp_path / "r", *args, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert not (tmp_path / "hpo.db").exists() or not trials(f"sqlite:///{tmp_path / 'hpo.db'}")



@pytest.mark.parametrize("fields, message", [
    ({"checkpoint_every": float("nan")}, "--checkpoint-every must be 0 (every epoch) or more seconds, got nan"),
    ({"max_failures": 0}, "--max-failures must be a positive integer, got 0"),
    ({"population": -2}, "--population must be 0 (automatic) or a number of trials, got -2"),
])
def test_options_made_by_a_script_check_themselves_as_the_cli_does(fields, message):
    with pytest.raises(ValueError) as info:
        Options(storage="sqlite:///x.db", **fields)
    assert str(info.value) == message
    assert Options(storage="sqlite:///x.db", population=0, max_failures=1, checkpoint_every=0).population == 0
WORKER = """
import json, sys
from hpo import load_study, open_study
from hpo.study.queue import suggest
from hpo.workers.worker import work
handle = open_study(load_study(sys.argv[2]), sys.argv[1], create=False)
def trivial(trial):
    handle.study.tell(trial, suggest(trial, handle.cfg)["train.lr"])
print(json.dumps({"ran": work(handle, trivial)}))
"""


def test_eight_workers_a_hundred_trials_on_postgresql(study_file, postgres_url):
    """The load case: 8 processes race for 100 slots of a trivial objective."""
    from hpo.study.queue import set_target, top_up

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
    assert sorted(TrialRecord.of(t).draw for t in done) == list(range(100))


def _dump(url: str, name: str) -> list:
    """Everything Optuna holds of a study: to compare before and after a command that must not write."""
    study = optuna.load_study(study_name=name, storage=url)
    system_attrs = study._storage.get_study_system_attrs(study._study_id)  # no public reader
    return [study.directions, study.user_attrs, system_attrs,
            [(t.number, t.state, t.params, t.values, t.user_attrs, t.system_attrs) for t in study.trials]]


def test_read_only_commands_use_the_study_s_own_config(study_file, tmp_path):
    """The README's flow: run with --param, then best/report on the same file (or by name) read the study.
    (The read-only commands in this process: that they load no torch is test_layout's.)"""
    storage_url = f"sqlite:///{tmp_path / 'study.db'}"  # the config is the study's, on any storage
    path = study_file(SEARCH)
    common = ["--storage", storage_url]
    r = hpo_main("run", path, *common, "--param", "train.epochs=2", "--device", "cpu", "--skip-checks",
                 "--out", tmp_path / "r", "--artifacts", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    before = _dump(storage_url, "small")
    best = hpo_main("best", path, *common, "--json")  # the file says epochs = 1, the study 2
    assert best.returncode == 0, best.stderr
    by_name = hpo_main("best", "--study", "small", *common, "--json")
    assert by_name.returncode == 0 and by_name.stdout == best.stdout, by_name.stderr
    assert json.loads(best.stdout.splitlines()[-1])["epochs_run"] == 2
    report = hpo_main("report", "--study", "small", *common, "--out", tmp_path / "report.html")
    assert report.returncode == 0 and (tmp_path / "report.html").is_file(), report.stderr
    assert _dump(storage_url, "small") == before  # read-only: nothing written

    r = hpo_main("run", path, *common, "--device", "cpu", "--skip-checks", "--out", tmp_path / "r")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "train.epochs: 2 in the study, 1 in the file" in r.stderr
    missing = hpo_main("best", "--study", "other", *common)
    assert missing.returncode == 2 and "no study 'other'" in missing.stderr and "'small'" in missing.stderr
    assert "study.name" not in missing.stderr  # a read-only command never asks for a rename
    unnamed = hpo_main("best", *common)
    assert unnamed.returncode == 2 and "--study NAME" in unnamed.stderr


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_a_foreign_study_is_refused_and_left_as_it_was(study_file, tmp_path, direction):
    storage_url = f"sqlite:///{tmp_path / 'study.db'}"  # what is refused is the study, on any storage
    study = optuna.create_study(study_name="small", storage=storage_url, direction=direction)
    study.optimize(lambda t: t.suggest_float("x", -3, 3) ** 2, n_trials=2)
    before = _dump(storage_url, "small")
    path = study_file(SEARCH)
    commands = [["run", path, "--device", "cpu", "--skip-checks", "--out", tmp_path / "r"], ["best", path]]
    if direction == "minimize":  # every command, once
        commands += [["worker", path, "--device", "cpu", "--skip-checks", "--out", tmp_path / "r"],
                     ["report", path, "--out", tmp_path / "report.html"],
                     ["retrain", path, "--device", "cpu", "--out", tmp_path / "r"]]
    for command in commands:
        r = hpo_main(*command, "--storage", storage_url)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, (command, r.stderr)
        assert "not made by hpo" in r.stderr or "direction MINIMIZE" in r.stderr, (command, r.stderr)
        assert _dump(storage_url, "small") == before, command
    assert not (tmp_path / "r").exists() and not (tmp_path / "report.html").exists()


def test_the_study_names_its_metric_and_gives_a_dataframe(study_file, tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    r = hpo_main("run", study_file(SEARCH), "--storage", url, "--n-trials", 2, "--device", "cpu", "--skip-checks",
                 "--out", tmp_path / "r", "--artifacts", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    study = optuna.load_study(study_name="small", storage=url)
    assert study.metric_names == ["val_acc"]  # what optuna-dashboard labels its axes with
    frame = study.trials_dataframe()  # needs pandas: the 'dataframe' extra
    assert list(frame["state"]) == ["COMPLETE"] * 2 and "value_val_acc" in frame.columns
    assert "params_train.lr" in frame.columns and "user_attrs_best_epoch" in frame.columns


OPEN = """
import sys, time
from hpo.config.study_file import load_study
from hpo.study.identity import open_study
cfg = load_study(sys.argv[2])
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))
open_study(cfg, sys.argv[1], create=True)
"""


def test_runs_started_at_the_same_instant_all_join_one_study(study_file, postgres_url):
    path = study_file(SEARCH)
    at = time.time() + 4  # after every process has imported hpo
    procs = [subprocess.Popen([sys.executable, "-c", OPEN, postgres_url, str(path), str(at)], stderr=subprocess.PIPE,
                              text=True) for _ in range(6)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, errors
    assert optuna.get_all_study_names(postgres_url) == ["small"]
    assert optuna.load_study(study_name="small", storage=postgres_url).user_attrs["hpo:config"]


GRID = """augment = "none"
[study]
sampler = "grid"
n_trials = 3
[train]
epochs = 40
[search]
"train.lr" = [0.01, 0.001, 0.0001]
"""


def test_validation_comes_before_anything_is_written(study_file, tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    common = ["--storage", url, "--device", "cpu", "--skip-checks", "--out", tmp_path / "r"]
    for args, message in ((["--n-trials", 4], "--n-trials 4: the grid has only 3 points"),
                          (["--data", tmp_path / "nowhere"], "no such folder"),
                          (["--param", "data.train_size=1000"], "exceeds the 1000 training samples"),
                          (["--param", "model.hidden=1000000000000"], "model.hidden: must be <= 65536"),
                          (["--db-timeout", "-5"], "--db-timeout must be 0"),
                          (["--max-failures", "0"], "--max-failures must be a positive integer")):
        r = hpo_main("run", study_file(GRID), *common, *args)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and message in r.stderr, (args, r.stderr)
        assert not (tmp_path / "study.db").exists() or optuna.get_all_study_names(url) == [], args
    assert not (tmp_path / "r").exists()
