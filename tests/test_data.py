
import numpy as np
import pytest
import torch

from hpo.config.schema import ConfigError, DataConfig
from hpo.config.study_file import load_study
from hpo.engine.data import check_fits, from_arrays, make_splits, normalize, split_sizes, to_device, training_splits
from hpo.engine.records import DataError
from hpo.engine.sources import synthetic


def test_splits_are_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(10), 500)  # grouped by class, like the JPEG copy
    cfg = DataConfig(train_size=4000, val_size=1000, subset_size=500)
    s = make_splits(labels, cfg)
    assert (len(s.train), len(s.val), len(s.subset)) == (4000, 1000, 500)
    assert not set(s.train) & set(s.val)
    assert set(s.subset) <= set(s.train)
    for idx, per_class in ((s.train, 400), (s.val, 100), (s.subset, 50)):
        assert np.bincount(labels[idx]).tolist() == [per_class] * 10
    assert len(set(labels[s.train[:50]])) > 5  # shuffled, not grouped by class
    again = make_splits(labels, cfg)
    assert all((a == b).all() for a, b in ((s.train, again.train), (s.val, again.val), (s.subset, again.subset)))
    other = make_splits(labels, DataConfig(train_size=4000, val_size=1000, subset_size=500, seed=1))
    assert not (other.val == s.val).all()


def test_split_sizes_beyond_the_data_are_refused_in_one_line_and_fractions_fit_small_data():
    labels = np.repeat(np.arange(3), 33)  # 99 samples
    with pytest.raises(DataError, match=r"^data.train_size \+ data.val_size = 80 \+ 30 exceeds the 99 training "
                                        "samples; lower them, or give fractions"):
        make_splits(labels, DataConfig(train_size=80, val_size=30, subset_size=10))
    with pytest.raises(DataError, match="^data.subset_size = 50 exceeds data.train_size = 40"):
        make_splits(labels, DataConfig(train_size=40, val_size=30, subset_size=50))
    assert split_sizes(99, DataConfig(train_size=0.7, val_size=0.3, subset_size=0.5)) == (69, 30, 34)
    assert split_sizes(5, DataConfig(train_size=0.7, val_size=0.3, subset_size=0.5)) == (4, 1, 2)  # rounding fits
    s = make_splits(labels, DataConfig(train_size=0.8, val_size=0.2, subset_size=0.5))
    assert (len(s.train), len(s.val), len(s.subset)) == (79, 20, 40) and not set(s.train) & set(s.val)


@pytest.mark.parametrize(("body", "expected"), [
    ("train_size = 0", "data.train_size: must be a count >= 1 or a fraction in (0, 1), got 0"),
    ("val_size = 1.5", "data.val_size: must be a count >= 1 or a fraction in (0, 1), got 1.5"),
    ("subset_size = true", "data.subset_size: must be a count >= 1 or a fraction in (0, 1), got True"),
])
def test_a_split_size_is_a_count_or_a_fraction(tmp_path, body, expected):
    path = tmp_path / "s.toml"
    path.write_text(f"[data]\n{body}\n")
    with pytest.raises(ConfigError) as e:
        load_study(path)
    assert e.value.problems == [expected]


def test_float_features_stay_as_they_are_and_refuse_image_augmentations(study_file):
    rng = np.random.default_rng(0)
    data = from_arrays({"x_train": rng.normal(size=(60, 5)), "y_train": np.arange(60) % 3}, "features")
    assert data.features and data.input_shape == (5,) and data.train_x.dtype == np.float32
    split = to_device(data.train_x, data.train_y, torch.device("cpu"))
    assert torch.equal(normalize(split.x), torch.from_numpy(data.train_x))  # no / 255
    sizes = "[data]\npath = 'synthetic'\ntrain_size = 0.6\nval_size = 0.4\nsubset_size = 0.5\n"
    check_fits(load_study(study_file("", data=sizes)), data)
    with pytest.raises(DataError, match=r"""^augment 'recipe': the data is float features \[48, 5\], not images; """
                                        'set augment = "none"$'):
        check_fits(load_study(study_file('augment = "recipe"\n', data=sizes)), data)
    with pytest.raises(DataError, match="^augment 'flip-shift': the data is float features"):
        check_fits(load_study(study_file('[search]\naugment = ["none", "flip-shift"]\n', data=sizes)), data)


def test_device_splits_stay_uint8_channels_first():
    d = synthetic()
    train, val = training_splits(d, DataConfig(train_size=600, val_size=200, subset_size=300), torch.device("cpu"))
    assert (len(train), len(val)) == (300, 200)
    assert train.x.dtype == torch.uint8 and train.x.shape == (300, 3, 32, 32)
    split = to_device(d.train_x[:2], d.train_y[:2], torch.device("cpu"))
    assert (split.x[1, 2].numpy() == d.train_x[1, :, :, 2]).all()
    x = normalize(split.x)  # the shape stays: a model flattens it if it needs to
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[0, 0], torch.from_numpy(d.train_x[0, :, :, 0]) / 255.0)
