"""The real images the GPU benchmarks need, small enough to travel to the lent GPU machine.

    python bench/gpu_data.py --data ../shared/data/cifar10-jpeg --out .gpu-data

The device tool carries at most 64 MiB, wheels included, and CIFAR-10's 60,000 images are 176 MiB
decoded. This writes the 5,000-image subset and the 10,000 val images of the recipe's split, and
100 test images (the loader wants some), as a cifar-10-batches-py folder of 44 MiB that ``hpo``
reads as it is. On it, ``--param data.train_size=5000`` gives a 10,000 val split and a 5,000
subset, the sizes of the recipe's (drawn again from these 15,000 images).
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np

from hpo import load_data, make_splits
from hpo.config.schema import DataConfig

BATCHES = 5  # data_batch_1..5, as the format has


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the full data set (folder), as hpo reads it")
    ap.add_argument("--out", default=".gpu-data")
    args = ap.parse_args()
    data = load_data(args.data)
    splits = make_splits(data.train_y, DataConfig())
    keep = np.concatenate([splits.subset, splits.val])
    folder = Path(args.out) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def write(name: str, x: np.ndarray, y: np.ndarray) -> None:
        flat = np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(len(x), -1)  # the format's planes
        with open(folder / name, "wb") as f:
            pickle.dump({"data": flat, "labels": y.tolist()}, f, protocol=4)

    for i, part in enumerate(np.array_split(keep, BATCHES), start=1):
        write(f"data_batch_{i}", data.train_x[part], data.train_y[part])
    write("test_batch", data.test_x[:100], data.test_y[:100])
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(data.classes)}, f, protocol=4)
    print(f"{folder}: {len(keep)} train and 100 test images")


if __name__ == "__main__":
    main()
