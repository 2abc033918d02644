"""The gate must pass a sound pipeline and catch each classic mistake on the check named for it."""

import dataclasses
import json
import subprocess
import sys

import albumentations as A
import numpy as np
import optuna
import pytest
import torch
from conftest import DEVICES, hpo_main
from torch import nn

from hpo.config.study_file import load_study
from hpo.engine.checks import run_checks
from hpo.engine.data import make_splits
from hpo.engine.models import build_model
from hpo.engine.records import GateFailed
from hpo.engine.sources import synthetic
from hpo.workers.gate import config_hash, gate

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    return synthetic()


@pytest.fixture
def cfg(study_file):
    return load_study(study_file("augment = 'recipe'\n[model]\nbatch_norm = true\n[train]\nbatch_size = 64"))


def failed(report) -> set[str]:
    return {c.name for c in report.checks if not c.passed}


@pytest.mark.parametrize("device", DEVICES)
def test_the_sound_pipeline_passes(cfg, data, device):
    report = run_checks(cfg, data, torch.device(device))
    assert report.passed, report.to_dict()
    by_name = {c.name: c for c in report.checks}
    assert list(by_name) == ["data", "output_shape", "loss_at_init", "fit_one_sample", "fit_one_batch",
                             "input_independent_baseline", "augmentation"]
    assert by_name["output_shape"].value == [64, 10]
    assert abs(by_name["loss_at_init"].value - np.log(10)) < 0.5
    assert by_name["input_independent_baseline"].value > 0.5  # synthetic classes are easy
    assert all(c.seconds >= 0 for c in report.checks)


def test_label_smoothing_and_adamw_pass(cfg, data):
    """The memorization checks train on plain cross-entropy: a smoothed loss never falls below 0.05."""
    smooth = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, label_smoothing=0.2, optimizer="adamw",
                                                                weight_decay=0.05))
    report = run_checks(smooth, data, CPU)
    assert report.passed, report.to_dict()


@pytest.mark.parametrize("model", ["", "family = 'cnn'\nwidth = 4\nstem = 4\ndepth = 2"])
def test_the_gate_passes_under_bf16_for_the_mlp_and_the_cnn(study_file, data, model):
    """Memorizing one sample and one batch still gets there with bf16 matmuls and convs."""
    cfg = load_study(study_file(f"augment = 'flip-shift'\n[model]\n{model}\n[train]\noptimizer = 'sgd'\n"
                                "nesterov = true\nlr = 0.05\nbatch_size = 64\nschedule = 'one-cycle'\n"
                                "precision = 'bf16'"))
    report = run_checks(cfg, data, CPU)
    assert report.passed, report.to_dict()


def test_wrong_output_size(cfg, data):
    report = run_checks(cfg, data, CPU, model_fn=lambda: build_model(cfg.model, (3, 32, 32), 9))
    assert "output_shape" in failed(report) and not report.passed


def test_softmax_before_cross_entropy(cfg, data):
    report = run_checks(cfg, data, CPU, model_fn=lambda: nn.Sequential(build_model(cfg.model), nn.Softmax(1)))
    assert "loss_at_init" in failed(report)
    assert "drop the softmax" in next(c.detail for c in report.checks if c.name == "loss_at_init")


def test_labels_shuffled_apart_from_images(cfg, data):
    shuffled = dataclasses.replace(data, train_y=np.random.default_rng(0).permutation(data.train_y))
    assert failed(run_checks(cfg, shuffled, CPU)) >= {"input_independent_baseline"}


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_parameters(cfg, data, device):
    report = run_checks(cfg, data, torch.device(device), model_fn=lambda: build_model(cfg.model).requires_grad_(False))
    assert {"fit_one_sample", "fit_one_batch"} <= failed(report)


@pytest.mark.parametrize("device", DEVICES)
def test_learning_rate_zero(cfg, data, device):
    zero_lr = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.0))
    assert {"fit_one_sample", "fit_one_batch"} <= failed(run_checks(zero_lr, data, torch.device(device)))


def test_zeroed_inputs(cfg, data):
    blank = dataclasses.replace(data, train_x=np.zeros_like(data.train_x))
    assert "input_independent_baseline" in failed(run_checks(cfg, blank, CPU))


def test_augmentation_that_destroys_the_image(cfg, data, tmp_path):
    path = tmp_path / "blank.json"
    A.save(A.Compose([A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(32, 32),
                                      hole_width_range=(32, 32), fill=0, p=1)]), str(path))
    report = run_checks(dataclasses.replace(cfg, augment=str(path)), data, CPU)
    assert failed(report) == {"augmentation"}


def test_val_split_that_overlaps_train(cfg, data):
    splits = make_splits(data.train_y, cfg.data)
    leaky = dataclasses.replace(splits, val=splits.subset[:200])
    report = run_checks(cfg, data, CPU, splits=leaky)
    assert "data" in failed(report)
    assert next(c.value for c in report.checks if c.name == "data")["train/val"] == 200


def test_unbalanced_classes_are_a_warning(cfg, data):
    keep = np.concatenate([np.flatnonzero(data.train_y != 0), np.flatnonzero(data.train_y == 0)[:30]])
    lopsided = dataclasses.replace(data, train_x=data.train_x[keep], train_y=data.train_y[keep])
    small = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_size=500, val_size=200, subset_size=300))
    report = run_checks(small, lopsided, CPU)
    assert any("unbalanced" in w and "oversampling" in w for w in report.warnings)


# --- the gate, against a real SQLite-backed study ---------------------------------------------


def test_gate_records_once_per_config(cfg, data, tmp_path, monkeypatch):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    calls = []
    import hpo.workers.gate

    real = hpo.workers.gate.run_checks
    monkeypatch.setattr(hpo.workers.gate, "run_checks", lambda *a, **k: calls.append(1) or real(*a, **k))
    record = gate(study, cfg, data, CPU)
    assert record.passed is True and len(calls) == 1
    gate(optuna.load_study(study_name="s", storage=storage), cfg, data, CPU)  # another worker
    assert len(calls) == 1  # passed before: not run again
    stored = optuna.load_study(study_name="s", storage=storage).user_attrs[f"gate:{config_hash(cfg)}"]
    assert stored["passed"] is True and [c["name"] for c in stored["checks"]][0] == "data"
    assert json.loads(json.dumps(stored)) == stored  # what the dashboard shows is plain JSON


def test_gate_refuses_a_broken_config_and_records_skips(cfg, data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    broken = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.0))
    with pytest.raises(GateFailed, match="fit_one_sample"):
        gate(study, broken, data, CPU)
    stored = lambda: optuna.load_study(study_name="s", storage=storage).user_attrs[f"gate:{config_hash(broken)}"]  # noqa: E731
    assert stored()["passed"] is False and len(study.trials) == 0
    assert gate(study, broken, data, CPU, skip=True).skipped is True
    assert stored()["skipped"] is True


def test_check_command_exit_codes(study_file):
    ok = subprocess.run([sys.executable, "-m", "hpo.cli", "check", study_file(), "--device", "cpu", "--json"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout.splitlines()[-1])
    assert report["passed"] is True
    assert {"name", "passed", "value", "threshold", "seconds"} <= set(report["checks"][0])
    bad = hpo_main("check", study_file(), "--param", "train.lr=0.0")
    assert bad.returncode == 3 and "FAIL" in bad.stdout and "failed: fit_one_sample" in bad.stdout
