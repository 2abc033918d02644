"""Step 1 of the recipe: the images, as :mod:`hpo.engine.sources` loads them: checked once, split
stratified, put on the device as uint8 ``[N, C, H, W]`` (or float features ``[N, D]``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from hpo.engine.records import DataError

if TYPE_CHECKING:  # config reads augment files through augment, which takes splits from here
    from hpo.config.schema import DataConfig
    from hpo.config.study_file import StudyConfig


@dataclass(frozen=True)
class ImageData:
    """Decoded images as uint8 ``[N, H, W, C]`` (or float32 features ``[N, D]``) with int64 labels,
    as the recipe holds them."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]

    @property
    def features(self) -> bool:
        """Float feature vectors rather than images: image augmentations do not apply."""
        return self.train_x.ndim == 2

    @property
    def input_shape(self) -> tuple[int, ...]:
        """What a model takes per sample, as the device holds it: ``(C, H, W)``, or ``(D,)``."""
        if self.features:
            return (self.train_x.shape[1],)
        height, width, channels = self.train_x.shape[1:]
        return channels, height, width


def _samples(x: np.ndarray, name: str, where: str) -> np.ndarray:
    """``x`` as ImageData holds it: uint8 NHWC (from NHWC, NCHW with 1, 3 or 4 channels, or NHW), or
    float32 ``[N, D]``."""
    if x.ndim == 2 and np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise DataError(f"{where}: {name} holds NaN or inf")
        return np.ascontiguousarray(x, np.float32)
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise DataError(f"{where}: {name} must be uint8 images [N, H, W, C], [N, C, H, W] or [N, H, W], or float "
                        f"features [N, D]; got {x.dtype} {list(x.shape)}")
    if x.ndim == 3:
        return np.ascontiguousarray(x[..., None])
    if x.shape[1] in (1, 3, 4) and x.shape[3] not in (1, 3, 4):
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    return np.ascontiguousarray(x)


def from_arrays(arrays: Mapping[str, Any], where: str) -> ImageData:
    """ImageData from ``x_train``, ``y_train`` and optionally ``x_test``, ``y_test`` and ``classes`` (an
    ``.npz`` file's arrays, or what a data function returns), checked. Without a test split, a
    stratified fifth of the training samples is held out as one (seeded: the same every time)."""
    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if missing or ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{where}: needs x_train and y_train, and x_test with y_test or neither; got "
                        f"{', '.join(sorted(arrays)) or 'nothing'}")
    x = {k: _samples(np.asarray(arrays[f"x_{k}"]), f"x_{k}", where) for k in ("train", "test") if f"x_{k}" in arrays}
    y = {k: np.asarray(arrays[f"y_{k}"]) for k in x}
    for k in x:
        if not np.issubdtype(y[k].dtype, np.integer) or y[k].shape != (len(x[k]),):
            raise DataError(f"{where}: y_{k} must be {len(x[k])} integer labels, one per sample of x_{k}; got "
                            f"{y[k].dtype} {list(y[k].shape)}")
    if "test" in x and x["test"].shape[1:] != x["train"].shape[1:]:
        raise DataError(f"{where}: x_test's samples are {list(x['test'].shape[1:])}, x_train's "
                        f"{list(x['train'].shape[1:])}")
    labels = np.concatenate(list(y.values()))
    classes = tuple(str(c) for c in arrays["classes"]) if "classes" in arrays else \
        tuple(str(c) for c in range(int(labels.max()) + 1))
    if labels.min() < 0 or labels.max() >= len(classes):
        raise DataError(f"{where}: labels must lie in [0, {len(classes)}) for {len(classes)} classes; got "
                        f"{labels.min()}..{labels.max()}")
    if "test" not in x:
        rng = np.random.default_rng(0)
        test = _stratified_take(y["train"], np.arange(len(y["train"])), len(y["train"]) // 5, rng)
        train = np.setdiff1d(np.arange(len(y["train"])), test)
        x["train"], x["test"], y["train"], y["test"] = x["train"][train], x["train"][test], y["train"][train], \
            y["train"][test]
    return ImageData(x["train"], y["train"].astype(np.int64), x["test"], y["test"].astype(np.int64), classes)


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


def _count(size: int | float, of: int) -> int:
    """A split size as a count: a fraction (a float below 1) of ``of`` samples, at least one."""
    return size if isinstance(size, int) else max(1, round(size * of))


def split_sizes(n: int, cfg: DataConfig) -> tuple[int, int, int]:
    """The train, val and subset counts for ``n`` training samples: a fraction of train_size and
    val_size is one of the ``n``, of subset_size one of the train split. Raises DataError, in one line,
    where they do not fit."""
    train, val = _count(cfg.train_size, n), _count(cfg.val_size, n)
    if isinstance(cfg.train_size, float) and isinstance(cfg.val_size, float) and cfg.train_size + cfg.val_size <= 1:
        val = min(val, n - train)  # two fractions that fit stay fitting, whatever the rounding
    subset = _count(cfg.subset_size, train)
    fix = ("lower them, or give fractions of the data: --param data.train_size=0.8 --param data.val_size=0.2 "
           "--param data.subset_size=0.5")
    if train + val > n:
        raise DataError(f"data.train_size + data.val_size = {train} + {val} exceeds the {n} training samples; {fix}")
    if subset > train:
        raise DataError(f"data.subset_size = {subset} exceeds data.train_size = {train}; {fix}")
    return train, val, subset


def check_fits(cfg: StudyConfig, data: ImageData) -> None:
    """Raise DataError, in one line, where the study cannot run on ``data``: split sizes that do not
    fit it, or an image augmentation (searched or not) on float features."""
    split_sizes(len(data.train_y), cfg.data)
    searched = cfg.search.get("augment")
    augments = {cfg.augment, *(getattr(searched, "choices", ()))}
    if data.features and augments != {"none"}:
        named = ", ".join(sorted(repr(a) for a in augments - {"none"}))
        raise DataError(f"augment {named}: the data is float features {list(data.train_x.shape)}, not images; "
                        'set augment = "none"')


def make_splits(labels: np.ndarray, cfg: DataConfig) -> Splits:
    """Stratified, seeded train / val / subset split of the training images (the recipe's 40k/10k/5k)."""
    n_train, n_val, n_subset = split_sizes(len(labels), cfg)
    rng = np.random.default_rng(cfg.seed)
    everything = np.arange(len(labels))
    val = _stratified_take(labels, everything, n_val, rng)
    rest = np.setdiff1d(everything, val)
    train = _stratified_take(labels, rest, n_train, rng)
    return Splits(train, val, _stratified_take(labels, train, n_subset, rng))


@dataclass(frozen=True)
class DeviceSplit:
    """One split on the training device: uint8 images ``[N, C, H, W]`` (or float features ``[N, D]``)
    and int64 labels."""

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
    memory and transfer than float). Channels first keeps the batched augmentation's ops contiguous.
    Features ``[N, D]`` go as they are."""
    images = torch.from_numpy(np.ascontiguousarray(x if x.ndim == 2 else x.transpose(0, 3, 1, 2)))
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


def pixels(x: torch.Tensor) -> torch.Tensor:
    """Pixel values ``[B, C, H, W]`` in [0, 255] (uint8, or float from an augmentation) -> float in
    [0, 1], as the recipe's ``X / 255``; the shape stays (an MLP flattens itself)."""
    return x.float() / 255.0


def normalize(x: torch.Tensor) -> torch.Tensor:
    """A batch as a split holds it -> the model's input: uint8 images as :func:`pixels`, float
    features as they are."""
    return x if x.is_floating_point() else pixels(x)
