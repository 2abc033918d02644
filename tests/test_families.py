"""Model families: ``[model] family`` names the recipe's MLP or a user's factory, whose keyword
arguments are the ``[model]`` keys, checked at load and searchable as ``model.KEY``."""

from __future__ import annotations

import pytest
import torch
from conftest import hpo_main
from factories import tiny_cnn

from hpo import load_study
from hpo.config.schema import ConfigError, ModelConfig
from hpo.config.study_file import StudyConfig
from hpo.engine.models import build_model
from hpo.study.reads import read_study
from hpo.study.records import TrialRecord
from hpo.workers.slots import Options
from hpo.workers.worker import run_study

CNN = '[model]\nfamily = "factories:tiny_cnn"\n'


def problems(study_file, body: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_study(study_file(body))
    return e.value.problems


def test_a_factory_s_keys_are_filled_in_and_typed(study_file):
    cfg = load_study(study_file(CNN + "width = 4\n"))
    assert cfg.model == ModelConfig("factories:tiny_cnn", {"width": 4, "pool": True})
    assert cfg.to_dict()["model"] == {"family": "factories:tiny_cnn", "width": 4, "pool": True}
    assert StudyConfig.from_dict(cfg.to_dict()) == cfg
    assert load_study(study_file('[model]\nfamily = "factories:linear_stack"\n')).model.kwargs == {"hidden": 16}
    assert problems(study_file, CNN + 'width = "wide"\n') == ['model.width: must be an integer, got \'wide\'']
    assert problems(study_file, '[model]\nfamily = "factories:linear_stack"\nhidden = 1.5\n') == [
        "model.hidden: must be an integer, got 1.5"]  # the default's type, where there is no annotation


def test_an_unknown_model_key_is_one_line_naming_the_accepted_ones(study_file):
    path = study_file(CNN + "widht = 4\n")
    r = hpo_main("check", path)
    assert r.returncode == 2
    assert r.stderr == "hpo: model.widht: unknown key for family 'factories:tiny_cnn' (known: width, pool)\n"
    assert problems(study_file, "[model]\nhiden = 3\n") == [
        "model.hiden: unknown key for family 'mlp' (known: hidden, depth, batch_norm, dropout)"]


@pytest.mark.parametrize(("body", "expected"), [
    ('[model]\nfamily = "transformer"\n', "model.family: must be one of 'mlp', 'cnn' or 'package.module:factory'"),
    ('[model]\nfamily = "no_such_module:build"\n', "model.family: cannot import 'no_such_module' "
                                                   "(ModuleNotFoundError"),
    ('[model]\nfamily = "factories:no_such"\n', "model.family: 'factories' has no function 'no_such'"),
    ('[model]\nfamily = "factories:no_arguments"\n', "model.family: no_arguments must take (input_shape, "
                                                     "num_classes, **kwargs), got ()"),
    ('[model]\nfamily = "factories:needs_depth"\n', "model.depth: factories:needs_depth takes it without a default"),
    ('[model]\nfamily = 3\n', "model.family: must be a string, got 3"),
])
def test_a_bad_family_is_one_line(study_file, body, expected):
    found = problems(study_file, body)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_a_family_s_keys_are_searched(study_file):
    cfg = load_study(study_file(CNN + '[search]\n"model.width" = {low = 2, high = 6}\n"model.pool" = [true, false]\n'))
    assert cfg.with_params({"model.width": 3, "model.pool": False}).model.kwargs == {"width": 3, "pool": False}
    assert problems(study_file, CNN + '[search]\n"model.hidden" = [8, 16]\n') == [
        "search.model.hidden: unknown hyperparameter (use a dotted name such as train.lr)"]


def test_with_model_takes_a_top_level_function_and_refuses_a_lambda_or_a_local_one(study_file):
    cfg = load_study(study_file())
    mine = cfg.with_model(tiny_cnn, width=5)
    assert mine.model == ModelConfig("factories:tiny_cnn", {"width": 5, "pool": True}) and mine.train == cfg.train

    def local(input_shape, num_classes):
        return torch.nn.Linear(1, 1)

    for fn, name in ((lambda s, n: None, "<lambda>"), (local, "local")):
        with pytest.raises(ConfigError, match=f"with_model: .*{name}.* is a lambda or a function defined inside"):
            cfg.with_model(fn)
    with pytest.raises(ConfigError, match="model.size: unknown key for family 'factories:tiny_cnn'"):
        cfg.with_model(tiny_cnn, size=3)


def test_the_mlp_keeps_the_identity_it_had_before_families(study_file):
    """A study stored before families recorded [model] without a family: it is the recipe's MLP, and
    the fingerprint a worker checks the study against is unchanged."""
    cfg = load_study(study_file())
    assert cfg.to_dict()["model"] == {"hidden": 100, "depth": 2, "batch_norm": False, "dropout": 0.0}
    assert StudyConfig.from_dict(cfg.to_dict()).model == ModelConfig()


def test_a_user_factory_with_searched_keys_runs_exactly_n_trials_each_built_with_its_params(study_file, tmp_path):
    """Two spawned workers import the factory by name; every trial's checkpoint is the network its
    sampled width builds (strict load)."""
    body = CNN + '[study]\nn_trials = 4\n[train]\nepochs = 1\n[search]\n"model.width" = [2, 3, 4]\n'
    url = f"sqlite:///{tmp_path / 'cnn.db'}"
    opts = Options(storage=url, device="cpu", out=str(tmp_path / "runs"), artifacts=str(tmp_path / "art"))
    ran = run_study(load_study(study_file(body, name="cnn")), opts, workers=2, quiet=True)
    trials = read_study(url, "cnn").trials()
    assert ran.finished == 4 and len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    for t in trials:
        best = torch.load(f"{TrialRecord.of(t).run_dir}/best.pt", weights_only=True)
        built = build_model(ModelConfig("factories:tiny_cnn", {"width": t.params["model.width"], "pool": True}))
        built.load_state_dict(best["model"])  # strict: the shapes of this trial's width


def test_a_worker_whose_file_names_another_factory_is_refused(study_file, tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    args = ("--storage", url, "--skip-checks", "--out", tmp_path / "runs", "--artifacts", tmp_path / "art")
    assert hpo_main("run", study_file(CNN + "[train]\nepochs = 1\n[study]\nn_trials = 1\n", name="s"), *args
                    ).returncode == 0
    other = study_file('[model]\nfamily = "factories:linear_stack"\n[train]\nepochs = 1\n[study]\nn_trials = 1\n',
                       name="s")
    r = hpo_main("worker", other, "--storage", url, "--out", tmp_path / "runs", "--artifacts", tmp_path / "art")
    assert r.returncode == 2 and "model" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


@pytest.mark.parametrize("factory", ["raises", "returns_a_string"])
def test_a_broken_factory_is_one_line_and_exit_2_before_any_trial(study_file, tmp_path, factory):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    r = hpo_main("run", study_file(f'[model]\nfamily = "factories:{factory}"\n'), "--storage", url,
                 "--out", tmp_path / "runs")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and r.stderr.startswith(
        f"hpo: model factories:{factory}: "), r.stderr
    assert not (tmp_path / "runs").exists()  # no study, no trial, no run folder


def test_a_factory_whose_output_is_not_b_by_classes_fails_the_gate(study_file, tmp_path):
    r = hpo_main("check", study_file('[model]\nfamily = "factories:wrong_output"\n'))
    assert r.returncode == 3, r.stderr
    lines = r.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("output_shape"))
    assert "FAIL" in lines[at] and lines[at + 1].strip() == (
        "the model returns [32, 11]; it must return logits of [batch, classes] = [32, 10]"), r.stdout
