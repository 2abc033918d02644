"""Regularization by augmentation: the recipe's albumentations pipeline, batched on the device.

The recipe augments one image at a time on the CPU, which starves a GPU. ``augment = "recipe"``
runs the same pipeline as a handful of tensor ops over the whole batch on the training device
(airbench style), drawing from the same distribution as :func:`recipe_pipeline` (tests compare
them). Any other albumentations pipeline, given as a file in albumentations' serialized form,
runs per image in worker processes that prepare batches while the device trains.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from hpo.config.schema import BUILT_IN_AUGMENTS
from hpo.config.study_file import load_pipeline
from hpo.engine.data import DeviceSplit, normalize, pixels

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # cv2.COLOR_RGB2GRAY, what ToGray uses
SHIFT_LIMIT = 20  # RGBShift's default, in uint8 units
P_FLIP, P_ONE_OF, W_GRAY, W_SHIFT = 0.5, 0.5, 0.2, 0.3  # HorizontalFlip, OneOf, and its two weights
SHIFT_PX = 4  # flip-shift's largest shift, in pixels: the usual CIFAR pad-and-crop

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def recipe_pipeline(height: int = 32, width: int = 32):
    """The recipe's albumentations ``Compose``, verbatim for 32x32 (crop 3/4, resize back)."""
    import albumentations as A

    return A.Compose([
        A.RandomCrop(height * 3 // 4, width * 3 // 4),
        A.Resize(height, width),
        A.HorizontalFlip(),
        A.OneOf([A.ToGray(p=W_GRAY), A.RGBShift(p=W_SHIFT)]),
    ])


@functools.lru_cache(maxsize=16)
def _resize_matrix(n_out: int, n_in: int, device: torch.device) -> torch.Tensor:
    """Bilinear resizing as a matrix, with cv2's half-pixel centres and edge clamping."""
    src = ((torch.arange(n_out, device=device) + 0.5) * n_in / n_out - 0.5).clamp(0, n_in - 1)
    lo = src.floor().long()
    frac = src - lo
    m = torch.zeros(n_out, n_in, device=device)
    m[torch.arange(n_out), lo] += 1 - frac
    m[torch.arange(n_out), (lo + 1).clamp(max=n_in - 1)] += frac
    return m


@functools.lru_cache(maxsize=16)
def _colour_matrices(c: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ToGray's and the identity's, made once: a host-to-device copy per batch would be a wait. Images
    that are not RGB turn gray as the mean of their channels (a grayscale image stays as it is)."""
    weights = torch.tensor(GRAY_WEIGHTS, device=device) if c == 3 else torch.full((c,), 1 / c, device=device)
    return weights.expand(c, c), torch.eye(c, device=device)


def recipe_apply(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
                 gray: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The recipe's pipeline with its random draws given, for a uint8 batch ``[B, C, H, W]``.

    ``top``/``left`` are crop offsets, ``flip``/``gray`` bool masks, ``shift`` ``[B, C]`` in uint8
    units (0 where RGBShift is not applied). Returns float ``[B, C, H, W]`` in [0, 255], rounded
    where albumentations rounds to uint8.
    """
    b, c, h, w = x.shape
    ch, cw = h * 3 // 4, w * 3 // 4
    dev = x.device
    # Crop with one gather; flip by reading the crop's columns backwards (bilinear resizing is
    # mirror-symmetric, so flipping before or after it is the same).
    cols = torch.arange(cw, device=dev)
    cols = torch.where(flip[:, None], cw - 1 - cols, cols) + left[:, None]
    rows = torch.arange(ch, device=dev) + top[:, None]
    index = (rows[:, :, None] * w + cols[:, None, :]).reshape(b, 1, ch * cw).expand(-1, c, -1)
    crop = x.reshape(b, c, h * w).gather(2, index).reshape(b, c, ch, cw).float()
    # Resize as two small matmuls: 2-3x faster than F.interpolate on the CPU, and exact.
    img = (_resize_matrix(h, ch, dev) @ crop @ _resize_matrix(w, cw, dev).T).round_().reshape(b, c, h * w)
    # ToGray as a per-image colour matrix (identity where not drawn): one batched matmul.
    colour = torch.where(gray[:, None, None], *_colour_matrices(c, dev))
    img = torch.bmm(colour, img).round_()
    img.add_(shift.trunc()[:, :, None]).clamp_(0, 255)  # albumentations truncates the shift
    return img.reshape(b, c, h, w)


def recipe_on_device(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Draw the recipe pipeline's randomness for a whole batch at once, then apply it."""
    b, c, h, w = x.shape
    u = torch.rand(b, 5 + c, device=x.device, generator=gen)
    top = (u[:, 0] * (h - h * 3 // 4 + 1)).long()  # as albumentations: int((h - crop + 1) * U)
    left = (u[:, 1] * (w - w * 3 // 4 + 1)).long()
    chosen = u[:, 3] < P_ONE_OF
    gray = chosen & (u[:, 4] < W_GRAY / (W_GRAY + W_SHIFT))
    shift = (u[:, 5:] * 2 - 1) * SHIFT_LIMIT * (chosen & ~gray)[:, None]
    return recipe_apply(x, top, left, u[:, 2] < P_FLIP, gray, shift)


def flip_shift_on_device(x: torch.Tensor, gen: torch.Generator, pad: int = SHIFT_PX) -> torch.Tensor:
    """The usual light CIFAR augmentation, batched: a horizontal flip half the time and a shift of up
    to ``pad`` pixels each way, black where the image left (albumentations' HorizontalFlip and
    Affine(translate_px) with a zero border), as one gather. An MLP learns from it in a short run,
    where the recipe's crop-and-resize holds it back."""
    b, c, h, w = x.shape
    u = torch.rand(b, 3, device=x.device, generator=gen)
    dy, dx = ((u[:, :2] * (2 * pad + 1)).long() - pad).unbind(1)
    rows = torch.arange(h, device=x.device) - dy[:, None]  # the source row of each output row
    cols = torch.arange(w, device=x.device) - dx[:, None]
    cols = torch.where(u[:, 2:] < P_FLIP, w - 1 - cols, cols)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    index = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]
    out = x.reshape(b, c, h * w).gather(2, index.reshape(b, 1, h * w).expand(-1, c, -1)).reshape(b, c, h, w)
    return out * inside[:, None].to(out.dtype)


def _drop_lone_sample(order: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A last batch of one image is left out of the epoch: BatchNorm cannot train on it."""
    return order[:-1] if len(order) % batch_size == 1 and len(order) > 1 else order


class DeviceAugment:
    """Shuffled batches indexed on the device, optionally augmented there; nothing leaves it."""

    def __init__(self, fn=None):
        self.fn = fn

    def batches(self, data: DeviceSplit, batch_size: int, gen: torch.Generator) -> Batches:
        # One gather per epoch; each batch is then a slice (a view), not an index op.
        order = _drop_lone_sample(torch.randperm(len(data), device=data.x.device, generator=gen), batch_size)
        xs, ys = data.x[order], data.y[order]
        for x, y in zip(xs.split(batch_size), ys.split(batch_size), strict=True):
            yield pixels(self.fn(x, gen)) if self.fn else normalize(x), y


class _Images(torch.utils.data.Dataset):
    def __init__(self, x: np.ndarray, pipeline):
        self.x, self.pipeline = x, pipeline

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.pipeline(image=self.x[i])["image"]).permute(2, 0, 1)


def _seed(pipeline, seed: int) -> None:
    # One shared stream for the whole pipeline. albumentations' own set_random_seed gives each
    # nested OneOf/Compose a generator with the same seed, which correlates their draws (with the
    # recipe's pipeline, every flipped image is also gray or shifted and no other is).
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    _seed(info.dataset.pipeline, info.seed)


class PipelineAugment:
    """Any albumentations pipeline, per image in worker processes that overlap training."""

    def __init__(self, pipeline, workers: int):
        self.pipeline, self.workers = pipeline, workers
        self._host: tuple[torch.Tensor, np.ndarray] | None = None

    def batches(self, data: DeviceSplit, batch_size: int, gen: torch.Generator) -> Batches:
        if self._host is None or self._host[0] is not data.x:  # one host copy per split
            self._host = (data.x, data.x.permute(0, 2, 3, 1).contiguous().cpu().numpy())  # HWC
        # One draw per epoch seeds the CPU side, so runs stay reproducible under train.seed.
        seed = int(torch.randint(2**62, (1,), device=gen.device, generator=gen))
        order = _drop_lone_sample(torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)), batch_size)
        chunks = list(order.split(batch_size))
        loader = torch.utils.data.DataLoader(
            _Images(self._host[1], self.pipeline), batch_sampler=chunks, num_workers=self.workers,
            worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(seed),
            pin_memory=data.x.is_cuda, prefetch_factor=4 if self.workers else None,
        )
        if not self.workers:
            _seed(self.pipeline, seed)
        for idx, x in zip(chunks, loader, strict=True):
            yield normalize(x.to(data.x.device, non_blocking=True)), data.y[idx.to(data.y.device)]


# run on the device, batched
BUILT_IN = dict(zip(BUILT_IN_AUGMENTS, (None, recipe_on_device, flip_shift_on_device), strict=True))


Augment = DeviceAugment | PipelineAugment  # what turns a train split into batches


def make_augment(spec: str, workers: int = 2) -> Augment:
    """One of BUILT_IN (batched on the device) or an albumentations file (CPU workers)."""
    if spec in BUILT_IN:
        return DeviceAugment(BUILT_IN[spec])
    return PipelineAugment(load_pipeline(Path(spec)), workers)
