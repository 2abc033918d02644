"""``hpo`` as a user runs it: a real subprocess, real files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import hpo_cli, hpo_main

from hpo.engine.checkpoints import load_checkpoint


def test_train_prints_epochs_and_a_json_summary(study_file, tmp_path):
    out = tmp_path / "runs"
    r = hpo_cli("train", study_file(), "--epochs", "3", "--device", "cpu", "--out", out, "--json",
            "--param", "train.lr=0.003", "--param", "model.batch_norm=true", "--param", "augment=recipe")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert [line.split()[1] for line in lines if line.startswith("Epoch")] == ["1/3", "2/3", "3/3"]
    summary = json.loads(lines[-1])
    assert {"best_val_acc", "best_epoch", "epochs_run", "seconds", "train_samples_per_s", "checkpoint"} <= set(summary)
    assert summary["epochs_run"] == 3 and summary["best_val_acc"] > 0.5 and summary["train_size"] == 300

    run_dir = out / os.listdir(out)[0]
    assert sorted(os.listdir(run_dir)) == ["best.pt", "config.json", "last.pt", "results.json"]
    record = json.loads((run_dir / "config.json").read_text())
    assert record["seed"] == 0 and record["git_revision"] and record["device"] == "cpu"
    assert record["config"]["train"]["lr"] == 0.003 and record["config"]["model"]["batch_norm"] is True
    results = json.loads((run_dir / "results.json").read_text())
    assert len(results["history"]) == 3 and results["best_val_acc"] == summary["best_val_acc"]
    state = load_checkpoint(summary["checkpoint"])
    assert state["epoch"] == summary["best_epoch"] and isinstance(state["model"]["fc1.weight"], torch.Tensor)


def test_bad_study_file_is_exit_2_with_one_line_per_problem(study_file, tmp_path):
    r = hpo_main("train", study_file("[train]\nlr = 'fast'\nepochs = 0"), "--out", tmp_path / "runs")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["hpo: train.lr: must be a number, got 'fast'",
                                     "hpo: train.epochs: must be >= 1, got 0"]
    assert not (tmp_path / "runs").exists()  # nothing written


def test_bad_param_epochs_device_and_data(study_file, tmp_path):
    cases = [
        (["--param", "train.speed=3"], "--param train.speed: unknown key"),
        (["--param", "train.lr"], "expected KEY=VALUE"),
        (["--epochs", "0"], "train.epochs: must be >= 1, got 0"),
        (["--device", "tpu"], "--device 'tpu': unknown device"),
        (["--data", tmp_path / "nowhere"], "no such folder"),
        (["--data", tmp_path], "not a dataset folder"),
    ]
    for args, message in cases:
        r = hpo_main("train", study_file(), "--out", tmp_path / "runs", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and message in r.stderr, (args, r.stderr)
    r = hpo_main("train", tmp_path / "missing.toml")
    assert r.returncode == 2 and "no such study file" in r.stderr and "`hpo train FILE --data synthetic`" in r.stderr
    assert not (tmp_path / "runs").exists()  # nothing half-written



def test_an_unreadable_study_file_is_one_line(study_file, tmp_path):
    path = study_file()
    path.chmod(0)
    # root reads any file; without the capability to bypass permissions it is refused like anyone else
    as_user = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    r = subprocess.run([*as_user, sys.executable, "-m", "hpo.cli", "train", str(path), "--out", str(tmp_path / "runs")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr == f"hpo: {path}: cannot read the study file: Permission denied\n", r.stderr
    assert not (tmp_path / "runs").exists()


def test_a_model_too_large_to_allocate_is_one_line(study_file, tmp_path):
    r = hpo_main("train", study_file(), "--param", "model.hidden=1000000000000", "--out", tmp_path / "runs")
    assert r.returncode == 2 and r.stderr == "hpo: model.hidden: must be <= 65536, got 1000000000000\n", r.stderr
    assert not (tmp_path / "runs").exists()


def test_the_default_outputs_are_ignored_by_git(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text((Path(__file__).parents[1] / ".gitignore").read_text())
    outputs = ["runs/s/x/best.pt", "hpo.db", "hpo.db-wal", "hpo.db-shm", "hpo.lock", "hpo-artifacts/a/b",
               "report.html", "explore/explore.html"]
    r = subprocess.run(["git", "check-ignore", *outputs], cwd=repo, capture_output=True, text=True)
    assert r.stdout.split() == outputs


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("command", ["train", "check", "run", "worker", "pipeline", "explore"])
@pytest.mark.parametrize("body, file_name, how", [
    ('[study]\nname = "../../escaped"', "small", "got '../../escaped'"),
    ('[study]\nname = "/etc/x"', "small", "got '/etc/x'"),
    ('[study]\nname = ".hidden"', "small", "got '.hidden'"),
    ('[study]\nname = "a\\\\b"', "small", "got 'a\\\\b'"),
    (f'[study]\nname = "{"n" * 101}"', "small", "at most 100"),
    ("", "two words", "got 'two words' (the study file's name); set [study] name"),
])
def test_a_study_name_that_could_leave_the_output_folder_is_refused_at_load(study_file, tmp_path, capsys, command,
                                                                            body, file_name, how):
    """In-process: the check is at load, before any file or database is opened."""
    from hpo.cli import main

    path = study_file(body, name=file_name)
    deep = tmp_path / "a" / "b"
    out = {"pipeline": []}.get(command, ["--out", deep / "runs"]) if command != "check" else []
    storage = ["--storage", f"sqlite:///{deep / 'hpo.db'}"] if command in ("run", "worker", "pipeline") else []
    device = [] if command == "explore" else ["--device", "cpu"]
    code = main([command, str(path), *map(str, out), *storage, *device])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("hpo: study.name: must be") and how in err, err
    assert _files(tmp_path) == {path}  # nothing written, inside --out or out of it


def _escaped_study(tmp_path: Path) -> str:
    """A finished hpo study whose name (and stored config's) another Optuna client set to ``../../escaped``."""
    import optuna

    from hpo.cli import main

    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    body = '[study]\nn_trials = 1\n[train]\nepochs = 2\n'
    path = tmp_path / "small.toml"
    path.write_text(body + (Path(__file__).parent / "conftest.py").read_text().split('SMALL_DATA = """')[1]
                    .split('"""')[0])
    assert main(["run", str(path), "--storage", url, "--device", "cpu", "--skip-checks", "--quiet",
                 "--out", str(tmp_path / "first"), "--artifacts", str(tmp_path / "art")]) == 0
    engine = optuna.storages.RDBStorage(url).engine
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE studies SET study_name = '../../escaped'")
    study = optuna.load_study(study_name="../../escaped", storage=url)
    config = study.user_attrs["hpo:config"]
    study.set_user_attr("hpo:config", {**config, "study": {**config["study"], "name": "../../escaped"}})
    path.unlink()
    return url


@pytest.mark.parametrize("command", ["retrain", "report"])
def test_a_study_name_read_from_the_database_becomes_a_safe_folder_name(tmp_path, capsys, command):
    from hpo.cli import main

    url = _escaped_study(tmp_path)
    deep = tmp_path / "a" / "b"
    before = _files(tmp_path)
    out = deep / ("report.html" if command == "report" else "runs")
    extra = ["--epochs", "1", "--device", "cpu", "--artifacts", str(tmp_path / "art")] if command == "retrain" else []
    assert main([command, "--study", "../../escaped", "--storage", url, "--out", str(out), *extra]) == 0, \
        capsys.readouterr().err
    written = {p for p in _files(tmp_path) - before if not p.is_relative_to(tmp_path / "art")}
    assert written and all(p.is_relative_to(out) for p in written), written
    if command == "retrain":
        (folder,) = {p.relative_to(out).parts[0] for p in written}
        assert folder.startswith("escaped-") and "/" not in folder and not folder.startswith(".")


def test_each_command_s_help_says_what_it_does_and_shows_an_example_that_parses():
    from hpo.cli import EXAMPLES, parser

    commands = parser()._subparsers._group_actions[0].choices
    assert set(commands) == set(EXAMPLES)
    for name, example in EXAMPLES.items():
        text = hpo_main(name, "--help").stdout
        assert f"example: {example}" in " ".join(text.split()), name
        assert parser().parse_args(example.split()[1:]).command == name
    assert "start with: hpo pipeline" in " ".join(hpo_main("--help").stdout.split())
