from pathlib import Path

import pytest

from hpo.config.schema import ConfigError, ModelConfig
from hpo.config.space import Categorical, Range
from hpo.config.study_file import load_study, parse_override

STUDIES = sorted((Path(__file__).parent.parent / "studies").glob("*.toml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_shipped_study_files_validate(path):
    cfg = load_study(path)
    assert cfg.study.name == path.stem
    assert cfg.train.lr > 0 and cfg.train.batch_size > 0


def test_recipe_files_hold_the_recipe_settings():
    final = load_study("studies/recipe-final.toml")
    assert (final.data.train_on, final.model.kwargs["batch_norm"], final.augment) == ("full", True, "recipe")
    assert (final.train.lr, final.train.batch_size, final.train.epochs) == (0.001, 64, 100)
    assert (final.train.step_size, final.train.gamma, final.train.patience) == (20, 0.1, 10)
    search = load_study("studies/recipe-random-search.toml")
    assert search.study.sampler == "random"
    assert search.search["train.lr"] == Categorical((0.01, 0.005, 0.001, 0.0003, 0.0001))
    assert search.search["train.batch_size"] == Categorical((16, 32, 64, 128, 256))


def test_defaults_are_the_recipe_baseline(study_file):
    cfg = load_study(study_file())
    assert cfg.model == ModelConfig("mlp", {"hidden": 100, "depth": 2, "batch_norm": False, "dropout": 0.0})
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.batch_size) == ("adam", 0.001, 32)
    assert cfg.augment == "none"


@pytest.mark.parametrize("body, expected", [
    ("[model]\nhiden = 3", "model.hiden: unknown key"),
    ("[train]\nlr = 'fast'", "train.lr: must be a number, got 'fast'"),
    ("[train]\nlr = -1.0", "train.lr: must be >= 0.0"),
    ("[train]\nbatch_size = 0", "train.batch_size: must be >= 1"),
    ("[train]\nbatch_size = 3.5", "train.batch_size: must be an integer"),
    ("[model]\nbatch_norm = 1", "model.batch_norm: must be true or false"),
    ("[train]\noptimizer = 'rmsprop'", "train.optimizer: must be one of 'adam', 'adamw', 'sgd'"),
    ("[train]\ngamma = 0.0", "train.gamma: must be > 0.0"),
    ("[model]\ndropout = 1.5", "model.dropout: must be <= 0.95"),
    ("[study]\nsampler = 'bayes'", "study.sampler: must be one of"),
    ("[trian]\nlr = 1.0", "trian: unknown section"),
    ("[retrain]\nmomentum = 2.0", "retrain.momentum: must be <= 1.0, got 2.0"),
    ("[retrain]\nlayers = 3", "retrain.layers: unknown key (known: epochs, patience, step_size, gamma, top, "
                               "augment, or any [train] key)"),
    ("[retrain]\naugment = 'mixup'", "retrain.augment: must be one of 'none', 'recipe', 'flip-shift' or an "
                                      "albumentations"),
    ("augment = 'mixup'", "augment: must be one of 'none', 'recipe', 'flip-shift' or an albumentations"),
    ("augment = 'missing.json'", "augment: no albumentations pipeline file"),
    ("[search]\n'train.lr' = []", "search.train.lr: the list of choices is empty"),
    ("[search]\n'train.lr' = {low = 0.1, high = 0.01}", "search.train.lr: low must be below high"),
    ("[search]\n'train.lr' = {low = 0.0, high = 0.1, log = true}", "a log range needs low > 0"),
    ("[search]\n'model.width' = [1, 2]", "search.model.width: unknown hyperparameter"),
    ("[search]\n'train.batch_size' = [16, 'big']", "search.train.batch_size: must be an integer"),
])
def test_each_problem_is_one_line_naming_the_key(study_file, body, expected):
    with pytest.raises(ConfigError) as e:
        load_study(study_file(body))
    assert len(e.value.problems) == 1
    assert expected in e.value.problems[0]


def test_all_problems_are_reported_together(study_file):
    with pytest.raises(ConfigError) as e:
        load_study(study_file("[train]\nlr = -1.0\nepochs = 0\n[model]\nhidden = 'x'"))
    assert len(e.value.problems) == 3


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such study file"):
        load_study(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_study(bad)


def test_overrides_are_typed_and_validated(study_file):
    overrides = dict(map(parse_override, ["train.lr=0.01", "model.batch_norm=false", "augment=recipe",
                                          "train.batch_size=64"]))
    cfg = load_study(study_file(), overrides)
    assert (cfg.train.lr, cfg.model.kwargs["batch_norm"], cfg.augment, cfg.train.batch_size) == (0.01, False, "recipe",
                                                                                                 64)
    with pytest.raises(ConfigError, match="--param train.rate: unknown key"):
        load_study(study_file(), {"train.rate": 1})
    with pytest.raises(ConfigError, match="train.epochs: must be >= 1, got 0"):
        load_study(study_file(), {"train.epochs": 0})
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("train.lr")


def test_with_params_sets_keys_validates_and_keeps_the_search_space():
    cfg = load_study("studies/recipe-random-search.toml")
    trial = cfg.with_params({"train.lr": 0.01, "train.batch_size": 128, "study.name": "other"})
    assert (trial.train.lr, trial.train.batch_size, trial.study.name) == (0.01, 128, "other")
    assert trial.search == cfg.search and trial.model == cfg.model and trial.augment == cfg.augment
    with pytest.raises(ConfigError, match="data.subset_size: must be <= data.train_size"):
        cfg.with_params({"data.subset_size": 50_000})


def test_search_ranges(study_file):
    cfg = load_study(study_file("[search]\n'train.lr' = {low = 1e-4, high = 1e-1, log = true}\n"
                                "'model.hidden' = {low = 32, high = 256, step = 32}"))
    assert cfg.search["train.lr"] == Range(1e-4, 1e-1, True, None)
    assert cfg.search["model.hidden"] == Range(32, 256, False, 32)


def test_albumentations_file_is_checked_at_load(study_file, tmp_path):
    import albumentations as A

    good = tmp_path / "flip.json"
    A.save(A.Compose([A.HorizontalFlip(p=1)]), str(good))
    assert load_study(study_file(f"augment = '{good}'")).augment == str(good)
    broken = tmp_path / "broken.json"
    broken.write_text('{"transform": {"__class_fullname__": "NoSuchTransform"}}')
    with pytest.raises(ConfigError, match="is not an albumentations pipeline"):
        load_study(study_file(f"augment = '{broken}'"))
