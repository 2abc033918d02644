"""Engine throughput: hpo's ``fit`` against the recipe's own loop, same data, one process.

    python bench/engine.py --data ../shared/data/cifar10-jpeg [--device cpu] [--epochs 3]

Prints a markdown table and writes it, with a JSON twin, to bench/results/engine-<device>.*,
naming the machine. Both loops train on the same 5,000-image subset and validate on the same
10,000 images; throughput is training samples per second over the training phases only, the
median of interleaved repeats (this machine's neighbours make single runs noisy). On CUDA hpo
runs twice, with CUDA graphs (its default) and with eager steps, to show what the graphs add.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipe_loop  # noqa: E402

from hpo import build_model, fit, load_data, load_study, make_augment, recipe_pipeline, resolve_device  # noqa: E402
from hpo.config.schema import DataConfig, ModelConfig, TrainConfig
from hpo.config.study_file import parse_override
from hpo.engine.data import TrainVal, make_splits, to_device
from hpo.engine.runs import git_revision

STUDY = Path(__file__).resolve().parent.parent / "studies" / "recipe-random-search.toml"
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


def data_config(params: list[str]) -> DataConfig:
    """The recipe's split, with --param data.KEY=VALUE overrides checked as the CLI checks them
    (bench/gpu.sh carries 15,000 images, so it asks for data.train_size=5000)."""
    return load_study(STUDY, dict(parse_override(p) for p in params)).data


def write_results(out: Path, stem: str, title: str, header: dict, body: list[str], record: dict) -> None:
    """``out/<stem>.md`` (the title with the machine, the header as a list, then ``body``) and
    ``out/<stem>.json`` (the header and ``record``); the markdown is printed too. The header gains
    the git revision, so every result says what code made it."""
    header = {**header, "git_revision": git_revision()}
    lines = [f"# {title} ({header['machine']})", "", *(f"- {k}: {v}" for k, v in header.items()), "", *body]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps({**header, **record}, indent=2) + "\n")
    print("\n".join(lines))


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--param", action="append", default=[], metavar="data.KEY=VALUE", help="split override")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each loop, interleaved; medians reported")
    args = ap.parse_args()

    device = resolve_device(args.device)
    data = load_data(args.data)
    splits = make_splits(data.train_y, data_config(args.param))
    xs, ys = data.train_x[splits.subset], data.train_y[splits.subset]
    xv, yv = data.train_x[splits.val], data.train_y[splits.val]
    train, val = to_device(xs, ys, device), to_device(xv, yv, device)

    loops = {"hpo": True, "hpo, eager steps (no CUDA graphs)": False} if device.type == "cuda" else {"hpo": True}
    rows = []
    for name, (bs, bn, aug) in SETTINGS.items():
        trans = recipe_pipeline() if aug == "recipe" else None
        cfg = TrainConfig(batch_size=bs, epochs=args.epochs)
        rates = {k: [] for k in ("recipe", *loops)}
        accs = {k: [] for k in rates}
        for rep in range(args.repeats + 1):  # interleaved; the first round only warms up
            ref = recipe_loop.run(xs, ys, xv, yv, device, bs, 1e-3, args.epochs, batch_norm=bn, trans=trans)
            got = {"recipe": (ref["train_samples_per_s"], max(ref["val_acc"]))}
            for loop, graphs in loops.items():
                torch.manual_seed(0)
                model = build_model(ModelConfig.mlp(batch_norm=bn)).to(device)
                ours = fit(model, TrainVal(train, val), cfg, make_augment(aug), cuda_graphs=graphs)
                got[loop] = (ours.train_samples_per_s, ours.best_val_acc)
            for k, (rate, acc) in got.items():
                if rep:
                    rates[k].append(rate)
                    accs[k].append(acc)
        ref_rate = statistics.median(rates["recipe"])
        for k in rates:
            rows.append({
                "setting": name, "loop": k, "samples_per_s": round(statistics.median(rates[k]), 1),
                "speedup": round(statistics.median(rates[k]) / ref_rate, 2),
                "speedups_per_repeat": [round(b / a, 2) for a, b in zip(rates["recipe"], rates[k], strict=True)],
                "best_val_acc": round(statistics.mean(accs[k]), 4),
            })
            print(rows[-1], flush=True)

    header = {"machine": machine(device), "device": str(device), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "epochs": args.epochs, "repeats": args.repeats,
              "data": args.data, "params": args.param,
              "python": platform.python_version()}
    body = ["| setting | loop | train samples/s | speedup vs recipe (median) | per repeat | best val acc |",
            "|---|---|---|---|---|---|",
            *(f"| {r['setting']} | {r['loop']} | {r['samples_per_s']} | {r['speedup']}x | "
              f"{', '.join(map(str, r['speedups_per_repeat']))} | {r['best_val_acc']} |" for r in rows)]
    write_results(Path(args.out), f"engine-{device.type}", "Engine throughput: hpo vs the recipe's loop", header,
                  body, {"rows": rows})


if __name__ == "__main__":
    main()
