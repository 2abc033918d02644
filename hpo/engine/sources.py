"""Where the data comes from (``data.path`` / ``--data``), each source read into :class:`ImageData`:
- ``cifar10``: torchvision's CIFAR-10, downloaded into the cache folder when missing;
- a folder in torchvision's ``cifar-10-batches-py`` layout (or the folder holding it);
- a folder in the ImageFolder layout, ``train/<class>/*`` and ``test/<class>/*`` (decoded once, cached);
- an ``.npz`` file, or ``package.module:function`` returning the same arrays (:func:`from_arrays`);
- ``synthetic``: a small learnable dataset of the same shape, for tests.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from hpo.config.families import import_factory, is_reference
from hpo.config.schema import ConfigError
from hpo.engine.data import ImageData, from_arrays
from hpo.engine.records import DataError
from hpo.files import atomic_write

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def cache_dir() -> Path:
    """Where decoded arrays (and torchvision downloads) live: ``$HPO_CACHE`` or ~/.cache/hpo."""
    return Path(os.environ.get("HPO_CACHE", Path.home() / ".cache" / "hpo"))


def synthetic(per_class: int = 100, test_per_class: int = 20, num_classes: int = 10, seed: int = 0,
              channels: int = 3, size: int = 32) -> ImageData:
    """Learnable square images: each class is a colour and a stripe direction, plus noise."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, size=(num_classes, channels))
    yy, xx = np.mgrid[0:size, 0:size] * (32 / size)  # the stripes' period scales with the image

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(num_classes), n)
        angle = y[:, None, None] * np.pi / num_classes
        stripes = 40 * np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 0.8)
        x = colours[y][:, None, None, :] + stripes[..., None] + rng.normal(0, 25, (len(y), size, size, channels))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    (train_x, train_y), (test_x, test_y) = make(per_class), make(test_per_class)
    return ImageData(train_x, train_y, test_x, test_y, tuple(f"class{i}" for i in range(num_classes)))


def _read_batches(folder: Path) -> ImageData:
    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(folder / name, "rb") as f:
            d = pickle.load(f, encoding="latin1")  # the format's own; only trusted local files
        return d["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(d["labels"], np.int64)

    parts = [read(f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = read("test_batch")
    meta = folder / "batches.meta"
    classes = CIFAR10_CLASSES
    if meta.is_file():
        with open(meta, "rb") as f:
            classes = tuple(pickle.load(f, encoding="latin1")["label_names"])
    train_x = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))
    return ImageData(train_x, np.concatenate([p[1] for p in parts]), np.ascontiguousarray(test_x), test_y, classes)


def _image_files(root: Path) -> list[tuple[str, list[os.DirEntry]]]:
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    out = []
    for c in classes:
        with os.scandir(root / c) as it:
            files = sorted((e for e in it if Path(e.name).suffix.lower() in IMAGE_SUFFIXES), key=lambda e: e.name)
        out.append((c, files))
    return out


def _decode(paths: list[str], where: Path) -> np.ndarray:
    from PIL import Image  # torchvision's own dependency

    def one(p: str) -> np.ndarray:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL releases the GIL
        images = list(pool.map(one, paths, chunksize=256))
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise DataError(f"{where}: images differ in size ({sorted(shapes)[:3]}...); resize them to one size first")
    return np.stack(images)


def _read_image_folder(folder: Path, listing: dict[str, list]) -> ImageData:
    train_classes = [c for c, _ in listing["train"]]
    if [c for c, _ in listing["test"]] != train_classes:
        raise DataError(f"{folder}: train/ and test/ must hold the same class folders")
    arrays = {}
    for split, groups in listing.items():
        paths = [e.path for _, files in groups for e in files]
        labels = np.concatenate([np.full(len(files), i, np.int64) for i, (_, files) in enumerate(groups)])
        if not paths:
            raise DataError(f"{folder / split}: no images found (expected {split}/<class>/*.jpg)")
        arrays[split] = (_decode(paths, folder / split), labels)
    return ImageData(*arrays["train"], *arrays["test"], tuple(train_classes))


def _fingerprint(folder: Path, entries: list[os.DirEntry]) -> str:
    h = hashlib.sha256(str(folder.resolve()).encode())
    for e in entries:
        st = e.stat()
        h.update(f"{e.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _cached(key: str, build) -> ImageData:
    """Load ``key`` from the cache, or build it and write it there atomically."""
    path = cache_dir() / f"{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return ImageData(z["train_x"], z["train_y"], z["test_x"], z["test_y"], tuple(z["classes"].tolist()))
    data = build()
    atomic_write(path, lambda f: np.savez(f, train_x=data.train_x, train_y=data.train_y, test_x=data.test_x,
                                          test_y=data.test_y, classes=np.asarray(data.classes)))
    return data


def _download_cifar10(root: Path) -> Path:
    import torchvision

    try:
        torchvision.datasets.CIFAR10(root=str(root), train=True, download=True)
    except Exception as e:  # network errors come in many types
        raise DataError(
            f"CIFAR-10 is not in {root / 'cifar-10-batches-py'} and could not be downloaded ({type(e).__name__}); "
            "pass --data PATH with a cifar-10-batches-py or ImageFolder (train/, test/) folder"
        ) from None
    return root / "cifar-10-batches-py"


def _read_npz(path: Path) -> ImageData:
    try:
        with np.load(path, allow_pickle=False) as z:  # no pickles: an .npz may come from anywhere
            return from_arrays({k: z[k] for k in z.files}, str(path))
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None


def _call_source(ref: str) -> ImageData:
    """``package.module:function``: called with no arguments, it returns the arrays of an ``.npz``."""
    try:
        fn = import_factory(ref, key="data.path")  # found from the current directory too
    except ConfigError as e:
        raise DataError(e.problems[0]) from None
    try:
        arrays = fn()
    except Exception as e:  # the user's code may raise anything
        raise DataError(f"data.path {ref}: calling it raised {type(e).__name__}: {e}") from e
    if not isinstance(arrays, Mapping):
        raise DataError(f"data.path {ref}: must return a dict of arrays (x_train, y_train, ...), got "
                        f"{type(arrays).__name__}")
    return from_arrays(arrays, f"data.path {ref}")


def load_data(source: str) -> ImageData:
    """Load ``source`` (see module doc), decoding at most once per folder version."""
    if source == "synthetic":
        return synthetic()
    if source.endswith(".npz"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"--data {source}: no such .npz file")
        return _read_npz(path)
    if is_reference(source) and not Path(source).expanduser().exists():
        return _call_source(source)
    if source == "cifar10":
        folder = cache_dir() / "cifar-10-batches-py"
        if not (folder / "data_batch_1").is_file():
            folder = _download_cifar10(cache_dir())
    else:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise DataError(f"--data {source}: no such folder; give a cifar-10-batches-py or ImageFolder folder, an "
                            ".npz file or package.module:function")
        if (folder / "cifar-10-batches-py").is_dir():
            folder = folder / "cifar-10-batches-py"
    if (folder / "data_batch_1").is_file():
        names = [folder / n for n in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")]
        missing = [n.name for n in names if not n.is_file()]
        if missing:
            raise DataError(f"{folder}: incomplete cifar-10-batches-py folder, missing {', '.join(missing)}")
        return _read_batches(folder)  # pickles load fast; no cache needed
    if not ((folder / "train").is_dir() and (folder / "test").is_dir()):
        raise DataError(
            f"{folder}: not a dataset folder; expected cifar-10-batches-py files or train/<class>/ and test/<class>/"
        )
    listing = {split: _image_files(folder / split) for split in ("train", "test")}
    entries = [e for split in listing.values() for _, files in split for e in files]
    return _cached(f"imagefolder-{_fingerprint(folder, entries)}", lambda: _read_image_folder(folder, listing))


