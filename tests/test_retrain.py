"""The recipe's last step: the top K retrained one by one or as one population, and Spearman's rho
between subset and full val acc (the retrain CLI runs end to end in test_report.py)."""

import json

import pytest
import torch

from hpo import load_study
from hpo.engine.sources import synthetic
from hpo.recipe.retrain import retrain, spearman
from hpo.study.identity import open_study
from hpo.workers.members import shareable
from hpo.workers.slots import Options
from hpo.workers.worker import run_study

CPU = torch.device("cpu")


def test_spearman_is_the_rank_correlation():
    assert spearman([0.3, 0.5, 0.4], [0.31, 0.52, 0.45]) == pytest.approx(1.0)  # same order, other values
    assert spearman([0.3, 0.5, 0.4], [0.6, 0.4, 0.5]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)  # a tie: average ranks


def test_spearman_is_none_where_undefined():
    assert spearman([0.5], [0.6]) is None
    assert spearman([0.5, 0.5], [0.6, 0.7]) is None
    assert spearman([], []) is None


def _finished(study_file, tmp_path, search: str):
    body = f'augment = "none"\n[study]\nn_trials = 3\nsampler = "grid"\n[train]\nepochs = 2\n[retrain]\nepochs = 3\n' \
           f'top = 2\n[search]\n{search}\n'
    cfg = load_study(study_file(body))
    opts = Options(storage=f"sqlite:///{tmp_path / 'r.db'}", device="cpu", out=str(tmp_path / "runs"),
                   artifacts=str(tmp_path / "art"), skip_checks=True)
    ran = run_study(cfg, opts, quiet=True)
    assert (ran.study, ran.finished, ran.failed, ran.storage) == ("small", 3, 0, opts.storage)
    return open_study(cfg, opts.storage, create=False)


def test_the_top_k_retrained_together_are_the_runs_retrained_one_by_one(study_file, tmp_path):
    """--top K as one population (what CUDA does by default): each retrained trial's epochs are its
    own run's, the same one is final, and each has the files its own run would."""
    handle = _finished(study_file, tmp_path, '"train.lr" = [0.01, 0.003, 0.001]\n"train.batch_size" = [32]')
    data = synthetic()
    alone = retrain(handle, CPU, tmp_path / "alone", tmp_path / "art", data, log=None, together=False)
    together = retrain(handle, CPU, tmp_path / "together", tmp_path / "art", data, log=None, together=True)
    assert together.from_trial == alone.from_trial and together.epochs_run == alone.epochs_run == 3
    for a, b in zip(alone.transfer, together.transfer, strict=True):
        assert a.trial == b.trial and abs(a.full_val_acc - b.full_val_acc) <= 0.01
    assert together.test_acc == pytest.approx(alone.test_acc, abs=0.02)
    runs = sorted((tmp_path / "together").iterdir())
    assert len(runs) == 2 and all({"config.json", "best.pt", "last.pt", "results.json"} <= {p.name for p in r.iterdir()}
                                  for r in runs)
    assert {json.loads((r / "results.json").read_text())["epochs_run"] for r in runs} == {3}


def test_settings_of_another_shape_are_retrained_one_by_one(study_file, tmp_path):
    handle = _finished(study_file, tmp_path, '"model.hidden" = [16, 32, 64]')
    cfgs = [handle.cfg.with_params(t.params) for t in handle.trials()]
    assert not shareable(cfgs, synthetic()) and shareable([cfgs[0], cfgs[0]], synthetic())
    one_cycle = cfgs[0].with_params({"train.schedule": "one-cycle"})
    assert not shareable([one_cycle, one_cycle], synthetic())  # a schedule the population does not compute
    result = retrain(handle, CPU, tmp_path / "out", tmp_path / "art", synthetic(), log=None, together=True)
    assert len(result.transfer) == 2 and len(list((tmp_path / "out").iterdir())) == 2
