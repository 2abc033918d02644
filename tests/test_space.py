"""The search space's types: each kind validates its entry, maps to Optuna, draws, suggests and
lists its grid; the factory picks the kind from the entry's TOML shape."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from hpo.config import space
from hpo.config.schema import ConfigError, MLPKeys, TrainConfig
from hpo.config.space import Categorical, Range, SpaceError
from hpo.config.study_file import load_study
from hpo.config.values import check_value


def check_for(section: type, name: str) -> tuple[Any, space.Check]:
    """The key's type and the study file's own check of its values, as config hands them over."""
    f = {f.name: f for f in dataclasses.fields(section)}[name]
    hint = {"lr": float, "batch_size": int, "hidden": int, "optimizer": str}[name]
    return hint, functools.partial(check_value, f, hint)


LR, BATCH, HIDDEN = check_for(TrainConfig, "lr"), check_for(TrainConfig, "batch_size"), check_for(MLPKeys, "hidden")


def create(spec: Any, key: tuple[Any, space.Check] = LR) -> space.Distribution:
    return space.create("search.k", spec, *key)


def problems(spec: Any, key: tuple[Any, space.Check] = LR) -> list[str]:
    with pytest.raises(SpaceError) as info:
        create(spec, key)
    return info.value.problems


def test_the_factory_picks_the_kind_from_the_entry_s_shape():
    assert create([0.1, 1]) == Categorical((0.1, 1.0))  # values take the key's type: 1 -> 1.0
    assert create({"low": 1, "high": 2}) == Range(1.0, 2.0)
    assert create({"low": 16, "high": 64, "step": 16}, BATCH) == Range(16, 64, False, 16)
    assert problems("0.1") == ["search.k: must be a list of choices or a {low, high} table, got '0.1'"]


@pytest.mark.parametrize("spec, key, expected", [
    ([], LR, ["search.k: the list of choices is empty"]),
    ([0.1, -1, 20], LR, ["search.k: must be >= 0.0, got -1.0", "search.k: must be <= 10.0, got 20.0"]),
    ({"low": 1}, LR, ["search.k: a range is {low, high, log?, step?}, got {'low': 1}"]),
    ({"low": 1, "high": 2, "by": 1}, LR, ["search.k: a range is {low, high, log?, step?}, got "
                                          "{'low': 1, 'high': 2, 'by': 1}"]),
    ({"low": "a", "high": "b"}, check_for(TrainConfig, "optimizer"),
     ["search.k: a range needs a numeric key, k is <class 'str'>"]),
    ({"low": 0.5, "high": 0.1}, LR, ["search.k: low must be below high, got 0.5 >= 0.1"]),
    ({"low": 0.0, "high": 0.1, "log": True}, LR, ["search.k: a log range needs low > 0, got 0.0"]),
    ({"low": 0.1, "high": 1, "log": "yes"}, LR, ["search.k.log: must be true or false, got 'yes'"]),
    ({"low": 0.1, "high": 1, "step": 0}, LR, ["search.k.step: must be a positive number, got 0"]),
    ({"low": 0.1, "high": 1, "step": 0.1, "log": True}, LR, ["search.k: step and log cannot be combined"]),
    ({"low": 16, "high": 64, "step": 0.5}, BATCH, ["search.k.step: must be a positive integer, got 0.5"]),
    ({"low": 1.5, "high": 64}, BATCH, ["search.k.low: must be an integer, got 1.5"]),
])
def test_each_kind_validates_its_entry(spec, key, expected):
    assert problems(spec, key) == expected


@pytest.mark.parametrize("dist, expected", [
    (Categorical((0.1, 0.01)), CategoricalDistribution((0.1, 0.01))),
    (Range(1e-4, 1e-1, log=True), FloatDistribution(1e-4, 1e-1, log=True)),
    (Range(0.004, 0.054, step=0.01), FloatDistribution(0.004, 0.054, step=0.01)),
    (Range(16, 256, step=16), IntDistribution(16, 256, step=16)),
    (Range(1, 8, log=True), IntDistribution(1, 8, log=True)),
])
def test_each_kind_maps_to_its_optuna_distribution(dist, expected):
    assert dist.to_optuna() == expected


@pytest.mark.parametrize("dist", [
    Categorical(("adam", "sgd", 3)), Range(1e-4, 1e-1, log=True), Range(0.004, 0.054, step=0.01),
    Range(16, 256, step=16), Range(1, 8), Range(0.5, 0.99),
])
def test_draws_are_seeded_and_inside_optuna_s_bounds(dist):
    draws = [dist.draw(np.random.default_rng(seed)) for seed in range(200)]
    assert draws == [dist.draw(np.random.default_rng(seed)) for seed in range(200)]  # the slot's seed decides
    optuna_dist = dist.to_optuna()
    assert all(optuna_dist._contains(optuna_dist.to_internal_repr(v)) for v in draws)  # add_trial accepts each
    assert len(set(draws)) > 1
    if isinstance(optuna_dist, IntDistribution):
        assert all(type(v) is int for v in draws)


def test_a_step_range_draws_its_top_value_on_optuna_s_grid():
    """0.004 + 5 * 0.01 is 0.054000000000000006 in floats, above high: the draw is kept at high."""
    draws = {Range(0.004, 0.054, step=0.01).draw(np.random.default_rng(seed)) for seed in range(200)}
    assert 0.054 in draws and max(draws) == 0.054


@pytest.mark.parametrize("dist, key", [
    (Categorical((0.1, 0.01)), "train.lr"), (Range(1e-4, 1e-1, log=True), "train.lr"),
    (Range(16, 256, step=16), "model.hidden"),
])
def test_suggest_reads_back_a_queued_draw_and_samples_within_bounds_otherwise(dist, key):
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    value = dist.draw(np.random.default_rng(7))
    study.enqueue_trial({key: value})
    assert dist.suggest(study.ask(), key) == value  # a queued slot gets what was drawn for it
    sampled = dist.suggest(study.ask(), key)  # nothing queued: the sampler's choice
    assert dist.to_optuna()._contains(dist.to_optuna().to_internal_repr(sampled))


def test_grid_points():
    assert Categorical((1, 2, 3)).grid_points() == (1, 2, 3)
    assert Range(16, 64, step=16).grid_points() == (16, 32, 48, 64)
    assert Range(1, 4, log=True).grid_points() == (1, 2, 3, 4)
    assert Range(0.1, 0.5, step=0.1).grid_points() is None  # float steps do not land on exact values
    assert Range(0.1, 0.5).grid_points() is None


def test_the_stored_form_is_stable_and_reads_back():
    """The study's config hash is taken over to_dict: a change would refuse every existing study."""
    assert Categorical((0.1, 0.01)).to_dict() == {"choices": (0.1, 0.01)}
    assert Range(16, 64, False, 16).to_dict() == {"low": 16, "high": 64, "log": False, "step": 16}
    for dist in (Categorical((0.1, 0.01)), Range(16, 64, False, 16), Range(1e-4, 0.1, True, None)):
        assert space.from_dict(dist.to_dict()) == dist


def test_the_grid_sampler_refuses_a_space_it_cannot_enumerate(study_file):
    body = '[study]\nsampler = "grid"\n[search]\n"train.lr" = {low = 0.001, high = 0.1}\n"model.hidden" = ' \
           '{low = 16, high = 48, step = 16}\n'
    with pytest.raises(ConfigError) as info:
        load_study(study_file(body))
    assert info.value.problems == ["search.train.lr: the grid sampler needs a list of choices or an integer range, "
                                   "got {'low': 0.001, 'high': 0.1, 'log': False, 'step': None}"]
    cfg = load_study(study_file(body.replace('{low = 0.001, high = 0.1}', '[0.001, 0.1]')))
    assert [d.grid_points() for d in cfg.search.values()] == [(0.001, 0.1), (16, 32, 48)]


def test_largest():
    assert Categorical((64, 256, 32)).largest() == 256
    assert Range(16, 96, step=16).largest() == 96 and Range(1e-4, 1e-1, log=True).largest() == 1e-1
