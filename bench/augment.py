"""Does augmentation starve training? Images per second of the recipe's augmentation done three
ways, beside the rate at which the training step consumes images.

    python bench/augment.py --data ../shared/data/cifar10-jpeg [--device cpu]

Writes bench/results/augment-<device>.md and .json, naming the machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import machine, write_results  # noqa: E402

from hpo import build_model, fit, load_data, make_augment, recipe_pipeline, resolve_device  # noqa: E402
from hpo.config.schema import DataConfig, ModelConfig, TrainConfig
from hpo.engine.augment import recipe_on_device
from hpo.engine.data import TrainVal, make_splits, to_device


def rate(fn, n_images: int, repeats: int = 3) -> float:
    """Best of ``repeats`` timings of ``fn`` (which handles ``n_images``), in images per second."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_images / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    device = resolve_device(args.device)
    data = load_data(args.data)
    subset = make_splits(data.train_y, DataConfig()).subset
    images, labels = data.train_x[subset], data.train_y[subset]
    split = to_device(images, labels, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    pipeline = recipe_pipeline()
    per_image = rate(lambda: [pipeline(image=im) for im in images[:2000]], 2000)
    gen = torch.Generator(device).manual_seed(0)

    def batched():
        for x in split.x.split(64):
            recipe_on_device(x, gen)
        sync()

    on_device = rate(batched, len(split))
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        import albumentations as A

        A.save(pipeline, f.name)
        workers = make_augment(f.name, workers=2)
        in_workers = rate(lambda: [None for _ in workers.batches(split, 64, gen)], len(split), repeats=2)
    torch.manual_seed(0)
    model = build_model(ModelConfig.mlp(batch_norm=True)).to(device)  # the step alone: bs 64, BN, no augmentation
    step = fit(model, TrainVal(split, split), TrainConfig(batch_size=64, epochs=2),
               make_augment("none")).train_samples_per_s

    rows = {"albumentations per image, one process (the recipe)": per_image,
            "albumentations per image, 2 worker processes (augment = file)": in_workers,
            "batched on the device (augment = \"recipe\")": on_device,
            "training step consumes (bs 64, batch norm)": step}
    header = {"machine": machine(device), "device": str(device), "torch": torch.__version__, "numpy": np.__version__}
    body = ["| path | images/s |", "|---|---|", *(f"| {k} | {v:,.0f} |" for k, v in rows.items())]
    write_results(Path(args.out), f"augment-{device.type}", "Augmentation throughput", header, body,
                  {"images_per_s": rows})


if __name__ == "__main__":
    main()
