import os
import pickle

import numpy as np
import pytest
import torch

from hpo.config.schema import DataConfig
from hpo.engine.data import cache_dir, load_data, make_splits, normalize, synthetic, to_device, training_splits
from hpo.engine.records import DataError


def test_synthetic_has_cifar_shape():
    d = synthetic()
    assert d.train_x.shape == (1000, 32, 32, 3) and d.train_x.dtype == np.uint8
    assert d.test_x.shape == (200, 32, 32, 3)
    assert np.bincount(d.train_y).tolist() == [100] * 10 and len(d.classes) == 10


def test_image_folder_loads_and_caches(image_folder):
    d = load_data(str(image_folder))
    assert d.classes == ("ant", "bee", "cow")
    assert d.train_x.shape == (24, 32, 32, 3) and d.test_x.shape == (12, 32, 32, 3)
    assert np.bincount(d.train_y).tolist() == [8, 8, 8]
    from PIL import Image

    assert (d.train_x[9] == np.asarray(Image.open(image_folder / "train" / "bee" / "1.png"))).all()
    cached = list(cache_dir().glob("imagefolder-*.npz"))
    assert len(cached) == 1
    again = load_data(str(image_folder))
    assert (again.train_x == d.train_x).all() and again.classes == d.classes
    assert list(cache_dir().glob("imagefolder-*.npz")) == cached  # read back, not rebuilt

    # A changed file is a new version of the folder: decoded again, never served stale.
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image_folder / "train" / "bee" / "1.png")
    os.utime(image_folder / "train" / "bee" / "1.png", ns=(1, 1))
    changed = load_data(str(image_folder))
    assert (changed.train_x[9] == 0).all()
    assert len(list(cache_dir().glob("imagefolder-*.npz"))) == 2


def test_cifar_batches_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, 20))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    d = load_data(str(tmp_path))  # the folder holding cifar-10-batches-py works too
    assert d.train_x.shape == (100, 32, 32, 3) and d.test_x.shape == (20, 32, 32, 3)
    with open(folder / "data_batch_1", "rb") as f:
        first = pickle.load(f)
    # channel-major rows (R plane, G plane, B plane) become HWC pixels
    assert (d.train_x[0, :, :, 1].ravel() == first["data"][0, 1024:2048]).all()
    os.unlink(folder / "data_batch_3")
    with pytest.raises(DataError, match="missing data_batch_3"):
        load_data(str(folder))


@pytest.mark.parametrize("source, message", [
    ("/no/such/folder", "no such folder"),
])
def test_bad_sources_say_what_to_do(source, message):
    with pytest.raises(DataError, match=message):
        load_data(source)


def test_folder_without_layout(tmp_path):
    with pytest.raises(DataError, match="expected cifar-10-batches-py files or train/<class>/"):
        load_data(str(tmp_path))


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


def test_split_sizes_beyond_the_data_are_refused():
    with pytest.raises(DataError, match="exceeds the 100 training images"):
        make_splits(np.zeros(100, np.int64), DataConfig(train_size=80, val_size=30, subset_size=10))


def test_device_splits_stay_uint8_channels_first():
    d = synthetic()
    train, val = training_splits(d, DataConfig(train_size=600, val_size=200, subset_size=300), torch.device("cpu"))
    assert (len(train), len(val)) == (300, 200)
    assert train.x.dtype == torch.uint8 and train.x.shape == (300, 3, 32, 32)
    split = to_device(d.train_x[:2], d.train_y[:2], torch.device("cpu"))
    assert (split.x[1, 2].numpy() == d.train_x[1, :, :, 2]).all()
    flat = normalize(split.x)
    assert flat.shape == (2, 3072) and flat.dtype == torch.float32
    assert torch.allclose(flat[0, :1024], torch.from_numpy(d.train_x[0, :, :, 0]).flatten() / 255.0)
