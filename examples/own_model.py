"""Your own network, searched by hpo from a script: a small CNN factory, its width and the lr sampled.

    python examples/own_model.py --data ../shared/data/cifar10-jpeg [--trials 4] [--epochs 3] [--workers 1]

The factory is called as ``small_cnn(input_shape, num_classes, **[model] keys)`` and returns any
``nn.Module``; workers import it by name (``own_model:small_cnn``), so it lives at the top level of
this file and the study runs under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

import hpo


def small_cnn(input_shape: tuple[int, ...], num_classes: int, width: int = 32, dropout: float = 0.0) -> nn.Module:
    """Two (conv, batch norm, ReLU, pool) blocks and a linear head."""
    channels, height, w = input_shape

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(channels, width), *block(width, 2 * width), nn.Flatten(), nn.Dropout(dropout),
                         nn.Linear(2 * width * (height // 4) * (w // 4), num_classes))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="cifar10", help="cifar10, a CIFAR-10 folder, an .npz file...")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--storage", default="sqlite:///own-model.db")
    args = p.parse_args()

    base = Path(__file__).resolve().parent.parent / "studies" / "recipe-random-search.toml"
    cfg = hpo.load_study(base, {"study.name": "own-model", "study.n_trials": args.trials, "data.path": args.data,
                                "train.epochs": args.epochs, "augment": "flip-shift"})
    cfg = cfg.with_model(small_cnn, width=32).with_search({"model.width": [16, 32, 48],
                                                          "train.lr": {"low": 3e-4, "high": 3e-3, "log": True}})
    opts = hpo.Options(storage=args.storage, device="auto", out="runs", artifacts="artifacts")
    ran = hpo.run_study(cfg, opts, workers=args.workers)
    best = hpo.best_trial(hpo.read_study(args.storage, cfg.study.name))
    print(f"{ran.finished} trials in {ran.wall_seconds:.0f} s; best trial {best.number}: val_acc {best.value:.4f} "
          f"with {best.params}")


if __name__ == "__main__":
    main()
