"""The data sources: CIFAR-10's own layout, an ImageFolder, an .npz file, a function, synthetic."""

import json
import os
import pickle

import numpy as np
import pytest

from hpo.engine.records import DataError
from hpo.engine.sources import cache_dir, load_data, synthetic


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


def arrays(rng, n=60, layout="nhwc"):
    x = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    x = {"nhwc": x, "nchw": x.transpose(0, 3, 1, 2), "nhw": x[..., 0]}[layout]
    return {"x_train": x, "y_train": np.arange(n) % 3}


@pytest.mark.parametrize("layout", ["nhwc", "nchw", "nhw"])
def test_an_npz_file_of_images_in_any_layout(tmp_path, layout):
    rng = np.random.default_rng(0)
    given = arrays(rng, layout=layout)
    x_test = given["x_train"][:9]
    np.savez(tmp_path / "d.npz", **given, x_test=x_test, y_test=np.arange(9) % 3, classes=np.array(["a", "b", "c"]))
    data = load_data(str(tmp_path / "d.npz"))
    assert data.input_shape == (1, 8, 8) and data.train_x.dtype == np.uint8 and data.classes == ("a", "b", "c")
    assert (data.train_x[..., 0] == arrays(np.random.default_rng(0), layout="nhw")["x_train"]).all()
    assert len(data.test_y) == 9


def test_without_a_test_split_a_fifth_is_held_out_the_same_every_time(tmp_path):
    np.savez(tmp_path / "d.npz", **arrays(np.random.default_rng(0)))
    a, b = load_data(str(tmp_path / "d.npz")), load_data(str(tmp_path / "d.npz"))
    assert (len(a.train_y), len(a.test_y)) == (48, 12) and np.bincount(a.test_y).tolist() == [4, 4, 4]
    assert (a.test_x == b.test_x).all() and a.classes == ("0", "1", "2")


def test_a_function_source(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text("import numpy as np\n"
                                         "def load():\n"
                                         "    return {'x_train': np.ones((20, 4)), 'y_train': np.arange(20) % 2}\n"
                                         "def broken():\n"
                                         "    return [1, 2]\n")
    monkeypatch.chdir(tmp_path)  # found as `python script.py` would find it: from the current directory
    data = load_data("my_data:load")
    assert data.features and data.input_shape == (4,) and len(data.train_y) + len(data.test_y) == 20
    with pytest.raises(DataError, match="^data.path my_data:broken: must return a dict of arrays"):
        load_data("my_data:broken")
    with pytest.raises(DataError, match="^data.path: 'my_data' has no function 'nothing'"):
        load_data("my_data:nothing")


@pytest.mark.parametrize(("given", "message"), [
    ({"x_train": np.zeros((4, 2, 2, 3))}, "needs x_train and y_train"),
    ({"x_train": np.zeros((4, 2, 2, 3)), "y_train": np.zeros(4, int)}, "x_train must be uint8 images"),
    ({"x_train": np.zeros((4, 3), np.float32), "y_train": np.zeros(3, int)}, "y_train must be 4 integer labels"),
    ({"x_train": np.full((4, 3), np.nan), "y_train": np.zeros(4, int)}, "x_train holds NaN or inf"),
    ({"x_train": np.zeros((4, 3)), "y_train": np.array([0, 1, 2, 5]), "classes": np.array(["a", "b", "c"])},
     r"labels must lie in \[0, 3\) for 3 classes; got 0..5"),
    ({"x_train": np.zeros((4, 3)), "y_train": np.zeros(4, int), "x_test": np.zeros((2, 5)),
      "y_test": np.zeros(2, int)}, r"x_test's samples are \[5\], x_train's \[3\]"),
])
def test_bad_arrays_are_one_line(tmp_path, given, message):
    np.savez(tmp_path / "bad.npz", **given)
    with pytest.raises(DataError, match=message) as e:
        load_data(str(tmp_path / "bad.npz"))
    assert "\n" not in str(e.value)


def test_a_file_that_is_not_an_npz_is_one_line(tmp_path):
    (tmp_path / "x.npz").write_text("not a zip")
    with pytest.raises(DataError, match="x.npz: not a readable .npz file"):
        load_data(str(tmp_path / "x.npz"))
    with pytest.raises(DataError, match="no such .npz file"):
        load_data(str(tmp_path / "missing.npz"))


def test_float_features_from_an_npz_train_end_to_end(tmp_path):
    """``hpo train`` on float features [N, D] (augment none): the MLP takes them as they are and learns."""
    from conftest import hpo_main

    rng = np.random.default_rng(0)
    y = np.arange(300) % 3
    x = rng.normal(size=(300, 6)) + 2.0 * np.eye(3)[y].repeat(2, axis=1)  # separable in its first features
    np.savez(tmp_path / "f.npz", x_train=x, y_train=y)
    (tmp_path / "f.toml").write_text('[data]\npath = "f.npz"\ntrain_size = 0.7\nval_size = 0.3\nsubset_size = 0.9\n'
                                     "[train]\nepochs = 5\nlr = 0.01\n")
    r = hpo_main("train", tmp_path / "f.toml", "--data", tmp_path / "f.npz", "--device", "cpu", "--out",
                 tmp_path / "runs", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["best_val_acc"] > 0.8
    r = hpo_main("train", tmp_path / "f.toml", "--data", tmp_path / "f.npz", "--param", "augment=recipe")
    assert r.returncode == 2 and r.stderr.startswith("hpo: augment 'recipe': the data is float features"), r.stderr
