"""Your own data through the whole recipe: scikit-learn's digits (1,797 8x8 grayscale images, shipped
inside the package), written as an .npz, searched with your own model by hpo's pipeline.

    python examples/own_data.py [--trials 6] [--epochs 15] [--out runs/digits]

An .npz holds ``x_train`` (uint8 images NHWC, NCHW or NHW, or float features ``[N, D]``), ``y_train``,
and optionally ``x_test``, ``y_test`` and ``classes``; without a test split hpo holds out a stratified
fifth. The pipeline is the one ``hpo pipeline`` runs: explore, the gate, the search, the retrain, the report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from torch import nn

import hpo


def digits_net(input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> nn.Module:
    """Two 3x3 conv layers at full resolution (the images are 8x8), a global average pool, a linear head."""
    channels = input_shape[0]
    return nn.Sequential(nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


def write_digits(path: Path) -> Path:
    """The digits as an .npz of uint8 NHW images: their 0..16 gray levels stretched to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x_train=images, y_train=digits.target, classes=[str(c) for c in digits.target_names])
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--out", type=Path, default=Path("runs/digits"))
    args = p.parse_args()

    data = write_digits(args.out / "digits.npz")
    base = Path(__file__).resolve().parent.parent / "studies" / "recipe-random-search.toml"
    cfg = hpo.load_study(base, {
        "study.name": "digits", "study.sampler": "tpe", "study.n_trials": args.trials, "data.path": str(data),
        # 1,437 training images: fractions of them, and the search on all of the train split
        "data.train_on": "full", "data.train_size": 0.8, "data.val_size": 0.2, "data.subset_size": 0.5,
        "train.epochs": args.epochs, "train.batch_size": 64, "augment": "none",  # a flipped 2 is no 2
    })
    cfg = cfg.with_model(digits_net, width=32).with_search({"model.width": [16, 32, 64],
                                                           "train.lr": {"low": 3e-4, "high": 1e-2, "log": True}})
    opts = hpo.Options(storage=f"sqlite:///{args.out / 'digits.db'}", device="auto", out=str(args.out / "runs"),
                       artifacts=str(args.out / "artifacts"))
    result = hpo.pipeline(cfg, opts, args.out)
    print("\n".join(result.lines()))
    print(f"test accuracy {result.final.test_acc:.4f} (trial {result.final.from_trial}, {result.final.params})")


if __name__ == "__main__":
    main()
