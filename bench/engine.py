"""Engine throughput: hpo's ``fit`` against the recipe's own loop, same data, one process.

    python bench/engine.py --data ../shared/data/cifar10-jpeg [--device cpu] [--epochs 3]

Prints a markdown table and writes it, with a JSON twin, to bench/results/engine-<device>.*,
naming the machine. Both loops train on the same 5,000-image subset and validate on the same
10,000 images; throughput is training samples per second over the training phases only, the
median of interleaved repeats (this machine's neighbours make single runs noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipe_loop  # noqa: E402

from hpo import build_model, fit, load_data, make_augment, recipe_pipeline, resolve_device  # noqa: E402
from hpo.config import DataConfig, ModelConfig, TrainConfig  # noqa: E402
from hpo.data import make_splits, to_device  # noqa: E402
from hpo.runs import git_revision  # noqa: E402

SETTINGS = {  # name: (batch size, batch norm, augmentation)
    "baseline (bs 32, no augmentation)": (32, False, "none"),
    "regularized (bs 64, batch norm, recipe augmentation)": (64, True, "recipe"),
}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    return f"{cpu}, {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each loop, interleaved; medians reported")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()

    device = resolve_device(args.device)
    data = load_data(args.data)
    splits = make_splits(data.train_y, DataConfig())
    xs, ys = data.train_x[splits.subset], data.train_y[splits.subset]
    xv, yv = data.train_x[splits.val], data.train_y[splits.val]
    train, val = to_device(xs, ys, device), to_device(xv, yv, device)

    rows = []
    for name, (bs, bn, aug) in SETTINGS.items():
        trans = recipe_pipeline() if aug == "recipe" else None
        cfg = TrainConfig(batch_size=bs, epochs=args.epochs)
        ref_rates, our_rates, ref_acc, our_acc = [], [], [], []
        for rep in range(args.repeats + 1):  # interleaved; the first round only warms up
            ref = recipe_loop.run(xs, ys, xv, yv, device, bs, 1e-3, args.epochs, batch_norm=bn, trans=trans)
            torch.manual_seed(0)
            model = build_model(ModelConfig(batch_norm=bn)).to(device)
            with tempfile.TemporaryDirectory() as tmp:
                ours = fit(model, train, val, cfg, make_augment(aug), Path(tmp) / "best.pt")
            if rep:
                ref_rates.append(ref["train_samples_per_s"])
                our_rates.append(ours.train_samples_per_s)
                ref_acc.append(max(ref["val_acc"]))
                our_acc.append(ours.best_val_acc)
        r, o = statistics.median(ref_rates), statistics.median(our_rates)
        rows.append({
            "setting": name, "recipe_samples_per_s": round(r, 1), "hpo_samples_per_s": round(o, 1),
            "speedup": round(o / r, 2),
            "speedups_per_repeat": [round(b / a, 2) for a, b in zip(ref_rates, our_rates, strict=True)],
            "recipe_best_val_acc": round(statistics.mean(ref_acc), 4),
            "hpo_best_val_acc": round(statistics.mean(our_acc), 4),
        })
        print(rows[-1], flush=True)

    header = {"machine": machine(device), "device": str(device), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "epochs": args.epochs, "repeats": args.repeats,
              "data": args.data, "git_revision": git_revision(), "python": platform.python_version()}
    lines = [f"# Engine throughput: hpo vs the recipe's loop ({header['machine']})", "",
             *(f"- {k}: {v}" for k, v in header.items()), "",
             "| setting | recipe samples/s | hpo samples/s | speedup (median) | per repeat | "
             "recipe best val acc | hpo best val acc |",
             "|---|---|---|---|---|---|---|",
             *(f"| {r['setting']} | {r['recipe_samples_per_s']} | {r['hpo_samples_per_s']} | {r['speedup']}x | "
               f"{', '.join(map(str, r['speedups_per_repeat']))} | {r['recipe_best_val_acc']} | "
               f"{r['hpo_best_val_acc']} |" for r in rows)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"engine-{device.type}"
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({**header, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
