"""The study's sampler and pruner: a seeded TPE study replays, and pruning pays on a small study."""

from __future__ import annotations

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from hpo import load_study
from hpo.recipe.report import epoch_budget
from hpo.study.reads import read_study
from hpo.study.samplers import SeededTPE, first_judged_epoch, make_pruner
from hpo.workers.slots import Options
from hpo.workers.worker import run_study

TPE = """augment = "none"
[study]
sampler = "tpe"
seed = {seed}
n_trials = {n}
pruner = "{pruner}"
[train]
epochs = {epochs}
[search]
"train.lr" = {{low = 1e-5, high = 0.3, log = true}}
"train.optimizer" = ["adam", "sgd"]
"""


def _run(study_file, tmp_path, name: str, **fields) -> list[optuna.trial.FrozenTrial]:
    fields = {"seed": 0, "n": 12, "pruner": "none", "epochs": 2, **fields}
    path, url = study_file(TPE.format(**fields), name=name), f"sqlite:///{tmp_path / f'{name}.db'}"
    opts = Options(storage=url, device="cpu", out=str(tmp_path / "runs"), artifacts=str(tmp_path / "art"),
                   skip_checks=True)
    run_study(load_study(path), opts, quiet=True)
    return read_study(url, name).trials()


def test_a_seeded_tpe_study_replays(study_file, tmp_path):
    """12 trials, past TPE's 10 random start-up ones: the same seed gives the same trials, another seed others."""
    a, b = (_run(study_file, tmp_path, name) for name in ("a", "b"))
    other = _run(study_file, tmp_path, "c", seed=1)
    assert [t.params for t in a] == [t.params for t in b] and len(a) == 12
    assert [t.value for t in a] == [t.value for t in b]
    assert a[0].params != other[0].params


def test_trials_sampled_at_once_draw_apart():
    """Two trials asked before either ends (two workers, or members of a population) get different
    points; the same trial number of another study with the same seed gets the same one."""
    dist = FloatDistribution(1e-5, 1.0, log=True)

    def two(seed: int) -> list[float]:
        study = optuna.create_study(sampler=SeededTPE(seed))
        trials = [study.ask(), study.ask()]
        return [t.suggest_float("lr", dist.low, dist.high, log=True) for t in trials]

    first, again = two(0), two(0)
    assert first[0] != first[1] and first == again and two(1) != first


def test_hyperband_prunes_a_study_of_two_dozen_trials_and_the_epochs_saved_add_up(study_file, tmp_path):
    trials = _run(study_file, tmp_path, "hb", n=24, pruner="hyperband", epochs=9)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert len(trials) == 24 and 0 < len(pruned) < 24
    assert all(t.user_attrs["epochs_run"] < 9 and t.user_attrs["stop_reason"] == "pruned" for t in pruned)
    saved = epoch_budget(read_study(f"sqlite:///{tmp_path / 'hb.db'}", "hb"))
    assert saved.budget == 24 * 9 and saved.run == sum(t.user_attrs["epochs_run"] for t in trials)
    assert saved.saved_by_pruning == sum(9 - t.user_attrs["epochs_run"] for t in pruned) > 0
    assert f"{saved.run} of 216 run" in saved.line()



def _one_cycle(study_file, pruner: str, schedule: str = "one-cycle"):
    body = TPE.format(seed=0, n=30, pruner=pruner, epochs=9)
    return load_study(study_file(body, name=f"{pruner}-{schedule}"), {"train.schedule": schedule, "train.warmup": 0.3})


def _first_pruned_epochs(cfg) -> list[int]:
    """The epoch at which each pruned trial of 30, reporting random val accs, was pruned."""
    study = optuna.create_study(direction="maximize", pruner=make_pruner(cfg))
    rng, pruned = np.random.default_rng(0), []
    for _ in range(30):
        trial = study.ask()
        for epoch in range(1, cfg.train.epochs + 1):
            trial.report(float(rng.random()), epoch)
            if trial.should_prune():
                pruned.append(epoch)
                study.tell(trial, state=TrialState.PRUNED)
                break
        else:
            study.tell(trial, 0.5)
    return pruned


def test_no_pruner_judges_a_trial_inside_a_one_cycle_warmup(study_file):
    """One-cycle over 9 epochs with 30% warmup rises until epoch 2.7: every pruner judges
    from epoch 4, the first after it; with the recipe's StepLR, hyperband judges from epoch 1."""
    assert first_judged_epoch(_one_cycle(study_file, "hyperband")) == 4
    for pruner in ("hyperband", "successive_halving", "median"):
        pruned = _first_pruned_epochs(_one_cycle(study_file, pruner))
        assert pruned and min(pruned) >= 4 and (pruner == "median" or min(pruned) == 4), (pruner, pruned)
    assert min(_first_pruned_epochs(_one_cycle(study_file, "hyperband", "step"))) == 1
