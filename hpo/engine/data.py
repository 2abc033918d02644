"""Step 1 of the recipe: the images. Load once, cache decoded uint8, split stratified, put on device.

Sources (``data.path`` / ``--data``):
- ``cifar10``: torchvision's CIFAR-10, downloaded into the cache folder when missing;
- a folder in torchvision's ``cifar-10-batches-py`` layout (or the folder holding it);
- a folder in the ImageFolder layout, ``train/<class>/*`` and ``test/<class>/*``;
- ``synthetic``: a small learnable dataset of the same shape, for tests.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from hpo.engine.records import DataError
from hpo.files import atomic_write

if TYPE_CHECKING:  # config reads augment files through augment, which takes splits from here
    from hpo.config.schema import DataConfig

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class ImageData:
    """Decoded images as uint8 ``[N, H, W, C]`` with int64 labels, as the recipe holds them."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]


def cache_dir() -> Path:
    """Where decoded arrays (and torchvision downloads) live: ``$HPO_CACHE`` or ~/.cache/hpo."""
    return Path(os.environ.get("HPO_CACHE", Path.home() / ".cache" / "hpo"))


# --- sources ------------------------------------------------------------------------------


def synthetic(per_class: int = 100, test_per_class: int = 20, num_classes: int = 10, seed: int = 0) -> ImageData:
    """Learnable 32x32 RGB images: each class is a colour and a stripe direction, plus noise."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, size=(num_classes, 3))
    yy, xx = np.mgrid[0:32, 0:32]

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(num_classes), n)
        angle = y[:, None, None] * np.pi / num_classes
        stripes = 40 * np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 0.8)
        x = colours[y][:, None, None, :] + stripes[..., None] + rng.normal(0, 25, (len(y), 32, 32, 3))
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


def load_data(source: str) -> ImageData:
    """Load ``source`` (see module doc), decoding at most once per folder version."""
    if source == "synthetic":
        return synthetic()
    if source == "cifar10":
        folder = cache_dir() / "cifar-10-batches-py"
        if not (folder / "data_batch_1").is_file():
            folder = _download_cifar10(cache_dir())
    else:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise DataError(f"--data {source}: no such folder; give a cifar-10-batches-py or ImageFolder folder")
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


# --- splits -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Splits:
    """Indices into ``ImageData.train_x``; ``subset`` is drawn from ``train``."""

    train: np.ndarray
    val: np.ndarray
    subset: np.ndarray


def _stratified_take(labels: np.ndarray, pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices of ``pool`` with class proportions kept (largest remainders), shuffled."""
    classes, counts = np.unique(labels[pool], return_counts=True)
    exact = counts * n / len(pool)
    quota = np.floor(exact).astype(int)
    quota[np.argsort(quota - exact)[: n - quota.sum()]] += 1
    picked = [rng.permutation(pool[labels[pool] == c])[:q] for c, q in zip(classes, quota, strict=True)]
    return rng.permutation(np.concatenate(picked))


def make_splits(labels: np.ndarray, cfg: DataConfig) -> Splits:
    """Stratified, seeded train / val / subset split of the training images (the recipe's 40k/10k/5k)."""
    if cfg.train_size + cfg.val_size > len(labels):
        raise DataError(
            f"data.train_size + data.val_size = {cfg.train_size + cfg.val_size} exceeds the {len(labels)} "
            "training images; lower them with --param data.train_size=N --param data.val_size=N"
        )
    rng = np.random.default_rng(cfg.seed)
    everything = np.arange(len(labels))
    val = _stratified_take(labels, everything, cfg.val_size, rng)
    rest = np.setdiff1d(everything, val)
    train = _stratified_take(labels, rest, cfg.train_size, rng)
    return Splits(train, val, _stratified_take(labels, train, cfg.subset_size, rng))


@dataclass(frozen=True)
class DeviceSplit:
    """One split on the training device: uint8 images ``[N, C, H, W]`` and int64 labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else must exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: unknown device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: unsupported device type; use auto, cpu, cuda or cuda:N")
    return device


def to_device(x: np.ndarray, y: np.ndarray, device: torch.device) -> DeviceSplit:
    """Copy ``[N, H, W, C]`` images once to the device as ``[N, C, H, W]``, staying uint8 (4x less
    memory and transfer than float). Channels first keeps the batched augmentation's ops contiguous."""
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    return DeviceSplit(images.to(device), torch.from_numpy(y).to(device))


class TrainVal(NamedTuple):
    """What a run learns from and is judged on, as the recipe's ``dataloader`` dict."""

    train: DeviceSplit
    val: DeviceSplit


def training_splits(data: ImageData, cfg: DataConfig, device: torch.device) -> TrainVal:
    """The pair a run trains on: the subset or the full train split, per ``cfg.train_on``."""
    splits = make_splits(data.train_y, cfg)
    train = splits.subset if cfg.train_on == "subset" else splits.train
    return TrainVal(to_device(data.train_x[train], data.train_y[train], device),
                    to_device(data.train_x[splits.val], data.train_y[splits.val], device))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8-range ``[B, C, H, W]`` -> flat float in [0, 1], as the recipe's ``X / 255``."""
    return x.reshape(len(x), -1).float() / 255.0
