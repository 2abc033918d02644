"""Trials trained as members of a population by `hpo run --population K`: each is still its own trial."""

import dataclasses
from pathlib import Path

import optuna
import pytest
from conftest import hpo_main
from factories import tiny_cnn
from optuna.trial import TrialState

# lr 10 with weight decay 1 diverges (NaN); lr 10 alone and weight decay 1 alone learn nothing and
# stop early; lr 0.01 learns. (At lr 0.05 the run turns chaotic after epoch 3: rounding, in either
# run, then sets two runs apart.)
GRID = """augment = "none"
[study]
n_trials = 4
sampler = "grid"
[train]
epochs = 6
patience = 2
optimizer = "sgd"
[search]
"train.lr" = [10.0, 0.01]
"train.weight_decay" = [1.0, 0.0]
"""


def run(study_file, tmp_path, db: str, *extra) -> dict[tuple[float, float], optuna.trial.FrozenTrial]:
    """The grid's trials by (lr, weight decay)."""
    url = f"sqlite:///{tmp_path / db}"
    r = hpo_main("run", study_file(GRID), "--storage", url, "--device", "cpu", "--skip-checks", "--out", tmp_path / "r",
                 "--artifacts", tmp_path / "a", *extra)
    assert r.returncode == 0, r.stderr
    return {(t.params["train.lr"], t.params["train.weight_decay"]): t
            for t in optuna.load_study(study_name="small", storage=url).trials}


def test_members_fail_and_stop_early_on_their_own_as_their_solo_runs(study_file, tmp_path):
    together = run(study_file, tmp_path, "population.db", "--population", "4")
    alone = run(study_file, tmp_path, "solo.db")
    diverged = together[10.0, 1.0]
    assert diverged.state == TrialState.FAIL and diverged.user_attrs["fail_reason"].startswith("TrainingDiverged")
    assert len({t.user_attrs["population"] for t in together.values()}) == 1
    for key, t in together.items():
        solo = alone[key]
        assert (t.state, t.user_attrs.get("stop_reason"), t.user_attrs.get("epochs_run")) == \
            (solo.state, solo.user_attrs.get("stop_reason"), solo.user_attrs.get("epochs_run"))
        assert t.intermediate_values.keys() == solo.intermediate_values.keys()
        assert all(abs(t.intermediate_values[e] - v) <= 0.002 for e, v in solo.intermediate_values.items()), key
    assert sorted(t.user_attrs["stop_reason"] for t in together.values() if t.state == TrialState.COMPLETE) == \
        ["completed", "early_stopping", "early_stopping"]


@pytest.mark.parametrize("where", ["--population", "[study] population"])
def test_a_space_that_varies_what_members_share_is_refused_in_one_line(study_file, tmp_path, where):
    body = '[search]\n"model.hidden" = [16, 32]\n"train.lr" = [0.01, 0.001]\n'
    path = study_file(body if where == "--population" else "[study]\npopulation = 2\n" + body)
    flag = ["--population", "2"] if where == "--population" else []
    r = hpo_main("run", path, "--storage", f"sqlite:///{tmp_path / 'study.db'}", *flag, "--device", "cpu")
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "hpo: population 2 (--population or [study] population): the search space varies model.hidden, which the "
        "members of a population share; use --population 1"]
    assert not (tmp_path / "study.db").exists()


def test_a_population_is_refused_for_a_model_it_cannot_stack(study_file, tmp_path):
    """A conv net's layers are not what the population engine computes: refused, not passed over."""
    path = study_file('[model]\nfamily = "factories:tiny_cnn"\n')
    r = hpo_main("run", path, "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--population", "2", "--device", "cpu")
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "hpo: population 2 (--population or [study] population) on model factories:tiny_cnn: a population stacks "
        "only an nn.Sequential of Flatten, Linear, BatchNorm1d, ReLU, Dropout layers; this model has Conv2d, "
        "MaxPool2d: use --population 1"]
    assert not (tmp_path / "study.db").exists()


@pytest.mark.parametrize("model, train, why", [
    ("family = 'cnn'\nwidth = 4\nstem = 4", "", "a population stacks only an nn.Sequential of Flatten, Linear, "
     "BatchNorm1d, ReLU, Dropout layers; this model has Conv2d, BatchNorm2d, GELU, MaxPool2d, AdaptiveMaxPool2d"),
    ("", "schedule = 'one-cycle'\nprecision = 'bf16'", "a population trains only with train.schedule = 'step', "
     "train.precision = 'fp32', train.nesterov = False; this study has train.schedule = 'one-cycle', "
     "train.precision = 'bf16'"),
])
def test_a_population_is_refused_for_the_cnn_and_for_training_it_does_not_compute(study_file, tmp_path, model,
                                                                                   train, why):
    path = study_file(f"[model]\n{model}\n[train]\n{train}\n")
    r = hpo_main("run", path, "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--population", "2", "--device", "cpu")
    family = "cnn" if model else "mlp"
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"hpo: population 2 (--population or [study] population) on model {family}: {why}: use --population 1"]
    assert not (tmp_path / "study.db").exists()


def test_members_of_one_population_have_their_own_dropout(study_file, tmp_path):
    """model.dropout is a member's own (hpo.engine.population): a space that varies it runs as one population,
    and each trial's best.pt is its solo model's, Dropout layers and all."""
    import torch

    from hpo.config.schema import ModelConfig
    from hpo.engine.models import build_model

    body = GRID.replace('"train.weight_decay" = [1.0, 0.0]', '"model.dropout" = [0.0, 0.5]').replace("10.0", "0.001")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    r = hpo_main("run", study_file(body), "--storage", url, "--device", "cpu", "--skip-checks", "--out", tmp_path / "r",
                 "--artifacts", tmp_path / "a", "--population", "4", "--param", "train.epochs=2")
    assert r.returncode == 0, r.stderr
    trials = optuna.load_study(study_name="small", storage=url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert len({t.user_attrs["population"] for t in trials}) == 1
    for t in trials:
        best = torch.load(f"{t.user_attrs['run_dir']}/best.pt", weights_only=True)["model"]
        build_model(ModelConfig.mlp(dropout=t.params["model.dropout"])).load_state_dict(best)  # strict


def test_the_automatic_size_is_one_until_measured_on_a_gpu_then_what_free_memory_holds(monkeypatch):
    """CI has no GPU: the free memory CUDA would report is given; the arithmetic is hpo's. A population
    is unmeasured on GPUs, so 0 picks 1 on CUDA too until AUTO_ON_CUDA is turned on."""
    import torch

    from hpo.config.study_file import load_study
    from hpo.workers import members
    from hpo.workers.members import AUTO_CAP, auto_population, member_bytes

    cfg = load_study("studies/recipe-random-search.toml")
    per = member_bytes(cfg, (3, 32, 32), 10)
    assert 1e6 < per < 1e8  # the recipe's MLP: 0.32 M weights and batches of at most 256 rows
    assert member_bytes(cfg.with_params({"model.hidden": 400}), (3, 32, 32), 10) > per
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (40 * per, 80 * per))
    assert auto_population(cfg, gpu, (3, 32, 32), 10, 100) == 1  # unmeasured: one trial at a time
    monkeypatch.setattr(members, "AUTO_ON_CUDA", True)
    assert auto_population(cfg, torch.device("cpu"), (3, 32, 32), 10, 100) == 1
    cnn = cfg.with_model(tiny_cnn)
    assert auto_population(dataclasses.replace(cnn, search={}), gpu, (3, 32, 32), 10, 100) == 1  # cannot stack
    assert auto_population(cfg, gpu, (3, 32, 32), 10, 100) == 20  # half the free memory
    assert auto_population(cfg, gpu, (3, 32, 32), 10, 5) == 5  # no more members than the study's trials
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10**6 * per, 10**6 * per))
    assert auto_population(cfg, gpu, (3, 32, 32), 10, 10**4) == AUTO_CAP
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (per // 2, per))
    assert auto_population(cfg, gpu, (3, 32, 32), 10, 100) == 1
    from hpo.config import space

    varied = dataclasses.replace(cfg, search={**cfg.search, "model.hidden": space.Categorical((50, 100))})
    assert auto_population(varied, gpu, (3, 32, 32), 10, 100) == 1  # members could not share a population


def test_a_negative_population_is_refused_in_one_line(study_file, tmp_path):
    r = hpo_main("run", study_file(), "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--population", "-1")
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "hpo: --population must be 0 (automatic) or a number of trials, got -1"]
    assert not (tmp_path / "study.db").exists()


def test_the_study_s_pruner_prunes_members_as_trials(study_file, tmp_path):
    """[study] pruner = "median" over a population: a member whose val acc falls below the median of
    the finished trials at the same epoch is PRUNED there, alone; its neighbours go on."""
    # Seeds first: the grid's order alternates lr 0 and 0.01, so each population holds both, and the
    # second one's lr-0 members meet the median of the first one's four finished trials.
    body = GRID.replace('n_trials = 4', 'n_trials = 8\npruner = "median"').replace("patience = 2\n", "") \
        .replace('"train.lr" = [10.0, 0.01]', '"train.seed" = [0, 1, 2, 3]') \
        .replace('"train.weight_decay" = [1.0, 0.0]', '"train.lr" = [0.0, 0.01]')
    url = f"sqlite:///{tmp_path / 'study.db'}"
    r = hpo_main("run", study_file(body), "--storage", url, "--device", "cpu", "--skip-checks", "--out", tmp_path / "r",
                 "--artifacts", tmp_path / "a", "--population", "4", "--param", "train.epochs=5")
    assert r.returncode == 0, r.stderr
    trials = optuna.load_study(study_name="small", storage=url).trials
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert len(pruned) >= 2 and {t.params["train.lr"] for t in pruned} == {0.0}  # lr 0 learns nothing
    for t in pruned:
        assert t.user_attrs["stop_reason"] == "pruned" and t.user_attrs["epochs_run"] == max(t.intermediate_values) < 5
        assert (Path(t.user_attrs["run_dir"]) / "best.pt").is_file()  # its checkpoint is final
    assert all(t.state == TrialState.COMPLETE and len(t.intermediate_values) == 5
               for t in trials if t.params["train.lr"] == 0.01)
