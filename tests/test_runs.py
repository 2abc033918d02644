import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import torch

import hpo
from hpo.config.schema import ModelConfig
from hpo.config.study_file import load_study
from hpo.engine.records import Stop, TrainingDiverged
from hpo.engine.runs import git_revision, train_run


def test_a_run_records_config_seed_and_revision(study_file, tmp_path):
    cfg = load_study(study_file(), {"train.epochs": 2, "train.seed": 7})
    summary = train_run(cfg, torch.device("cpu"), tmp_path / "runs", log=None)
    (run_dir,) = (tmp_path / "runs").iterdir()
    record = json.loads((run_dir / "config.json").read_text())
    assert record["seed"] == 7 and record["config"] == json.loads(json.dumps(cfg.to_dict()))
    assert record["git_revision"] == git_revision() and record["hostname"]
    assert summary.run_dir == run_dir and summary.epochs_run == 2 and summary.stop == Stop.COMPLETED
    results = json.loads((run_dir / "results.json").read_text())
    assert results == {**summary.to_dict(), "history": results["history"]} and len(results["history"]) == 2


def test_two_runs_never_share_files(study_file, tmp_path):
    cfg = load_study(study_file(), {"train.epochs": 1})
    a = train_run(cfg, torch.device("cpu"), tmp_path / "runs", log=None)
    b = train_run(cfg, torch.device("cpu"), tmp_path / "runs", log=None)
    assert a.checkpoint != b.checkpoint and a.best_val_acc == b.best_val_acc


def test_a_failed_run_keeps_its_error(study_file, tmp_path):
    cfg = load_study(study_file(), {"train.optimizer": "sgd"})
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1e12))  # past validation's bound
    with pytest.raises(TrainingDiverged):
        train_run(cfg, torch.device("cpu"), tmp_path / "runs", log=None)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "TrainingDiverged" in json.loads((run_dir / "results.json").read_text())["error"]


def test_an_allocation_failure_is_out_of_memory(study_file, tmp_path):
    """What a trial counts as its own failure (torch raises a bare RuntimeError for the CPU allocator)."""
    cfg = load_study(study_file())
    cfg = dataclasses.replace(cfg, model=ModelConfig.mlp(hidden=10**12))  # past validation's bound
    with pytest.raises(torch.OutOfMemoryError, match="can't allocate memory.*; lower model.hidden"):
        train_run(cfg, torch.device("cpu"), tmp_path / "runs", log=None)


def test_the_revision_is_the_checkout_s_commit(monkeypatch):
    """Asked of git another way: ``git log`` for the commit, ``git diff`` for local changes."""
    monkeypatch.delenv("HPO_GIT_REVISION", raising=False)
    here = Path(hpo.__file__).parent
    log = subprocess.run(["git", "log", "-1", "--format=%H"], cwd=here, capture_output=True, text=True)
    if log.returncode:  # a tree that is not a git checkout
        assert git_revision() == "unknown"
        return
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=here).returncode != 0
    assert git_revision() == log.stdout.strip() + ("+dirty" if dirty else "")
    assert len(log.stdout.strip()) == 40


def test_a_copied_tree_takes_its_revision_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HPO_GIT_REVISION", "abc123")
    assert git_revision() == "abc123"
    monkeypatch.delenv("HPO_GIT_REVISION")
    monkeypatch.setenv("PATH", str(tmp_path))  # no git to run
    assert git_revision() == "unknown"


@pytest.mark.parametrize(("channels", "size", "classes"), [(1, 32, 4), (3, 64, 3)])
@pytest.mark.parametrize("family", ["mlp", "factories:tiny_cnn"])
def test_any_channels_resolution_and_classes(study_file, tmp_path, channels, size, classes, family):
    """Grayscale and 64x64 images stay [N, C, H, W] on the device, through the gate, augmentation and a
    run, for the MLP (which flattens itself) and a user's conv net."""
    from hpo.engine.augment import flip_shift_on_device, recipe_on_device
    from hpo.engine.checks import run_checks
    from hpo.engine.sources import synthetic

    data = synthetic(per_class=60, test_per_class=10, num_classes=classes, channels=channels, size=size)
    assert data.input_shape == (channels, size, size)
    x = torch.from_numpy(data.train_x[:8]).permute(0, 3, 1, 2)
    for fn in (recipe_on_device, flip_shift_on_device):
        assert fn(x, torch.Generator().manual_seed(0)).shape == x.shape
    # The grayscale classes differ mostly in brightness, which shifting in black borders blurs for an MLP.
    augment = "none" if channels == 1 else "flip-shift"
    body = f'augment = "{augment}"\n[model]\nfamily = "{family}"\n[train]\nepochs = 4\nlr = 0.003\n'
    data_section = f"[data]\npath = 'synthetic'\ntrain_size = {40 * classes}\nval_size = {20 * classes}\n" \
                   f"subset_size = {40 * classes}\n"
    cfg = load_study(study_file(body, data=data_section))
    assert run_checks(cfg, data, torch.device("cpu")).passed
    summary = train_run(cfg, torch.device("cpu"), tmp_path / "runs", data, log=None)
    assert summary.best_val_acc > 1.5 / classes  # it learns
