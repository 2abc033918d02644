"""Population training against one trial after another: the recipe study's first K seeded draws
(lr x batch size, batch norm, recipe augmentation), trained by hpo's solo ``fit`` one after the
other in one process, as one population (every batch padded to the largest), and as one
population per batch size.

    python bench/population.py --data ../shared/data/cifar10-jpeg [--device cpu] [--trials 8] [--epochs 3]

Prints a markdown table and writes it, with a JSON twin, to bench/results/population-<device>.*,
naming the machine. Times are wall seconds of training (data loading excluded), the median of
interleaved repeats; trials/hour follow from them.

With ``--sizes 1,4,16,64,256`` it draws the curve instead: for each K, the study's first K draws as
one population (padded), its trials/hour and peak device memory (CUDA), written to
bench/results/population-curve-<device>.*.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine import add_common_args, machine, write_results  # noqa: E402

from hpo import build_model, fit, load_data, load_study, make_augment, resolve_device  # noqa: E402
from hpo.config.study_file import parse_override  # noqa: E402
from hpo.engine.data import training_splits  # noqa: E402
from hpo.engine.population import Member, fit_population  # noqa: E402
from hpo.study.queue import draw  # noqa: E402

STUDY = HERE.parent / "studies" / "recipe-random-search.toml"


def sequential(cfgs, splits) -> list[float]:
    out = []
    for cfg in cfgs:
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model).to(splits.train.x.device)
        out.append(fit(model, splits, cfg.train, make_augment(cfg.augment)).best_val_acc)
    return out


def population(cfgs, splits, group_by_batch_size: bool) -> list[float]:
    groups = defaultdict(list)
    for i, cfg in enumerate(cfgs):
        groups[cfg.train.batch_size if group_by_batch_size else 0].append(i)
    best = [0.0] * len(cfgs)
    for members in groups.values():
        results = fit_population(cfgs[0].model, cfgs[0].train.optimizer,
                                 [Member(cfgs[i].train, make_augment(cfgs[i].augment)) for i in members], splits)
        for i, r in zip(members, results, strict=True):
            best[i] = r.best_val_acc
    return best


def curve(cfgs, splits, sizes: list[int], device: torch.device) -> list[dict]:
    """Trials/hour and peak memory of one population of each size (the first K draws)."""
    rows = []
    for k in sizes:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        best = population(cfgs[:k], splits, False)
        seconds = time.perf_counter() - t0  # population() ends on a host read: the device is done
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        rows.append({"k": k, "seconds": round(seconds, 2), "trials_per_hour": round(k * 3600 / seconds),
                     "peak_gib": peak and round(peak, 2), "best_val_acc": round(max(best), 4)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--trials", type=int, default=8, help="the study's first K draws")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per trial")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each way, interleaved; medians reported")
    ap.add_argument("--sizes", help="the curve instead: population sizes, e.g. 1,4,16,64,256")
    args = ap.parse_args()

    device = resolve_device(args.device)
    cfg = load_study(STUDY, {"data.path": args.data, "train.epochs": args.epochs, "train.patience": 0,
                             **dict(parse_override(p) for p in args.param)})
    sizes = [int(k) for k in args.sizes.split(",")] if args.sizes else []
    cfgs = [cfg.with_params(draw(cfg, i)) for i in range(max([args.trials, *sizes]))]
    splits = training_splits(load_data(args.data), cfg.data, device)
    header = {"machine": machine(device), "device": str(device), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "epochs": args.epochs, "data": args.data, "params": args.param}
    if sizes:
        population(cfgs[:1], splits, False)  # warm-up: first launches, allocator
        rows = curve(cfgs, splits, sizes, device)
        body = ["One population of the recipe study's first K seeded draws, batches padded to the largest.", "",
                "| K | seconds | trials/hour | peak GiB | best val acc |", "|---|---|---|---|---|",
                *(f"| {r['k']} | {r['seconds']} | {r['trials_per_hour']} | {r['peak_gib']} | {r['best_val_acc']} |"
                  for r in rows)]
        return write_results(Path(args.out), f"population-curve-{device.type}", "Population size curve", header,
                             body, {"rows": rows})
    ways = {"one after another (solo fit)": lambda: sequential(cfgs, splits),
            "one population, batches padded to the largest": lambda: population(cfgs, splits, False),
            "one population per batch size": lambda: population(cfgs, splits, True)}
    seconds, best = defaultdict(list), {}
    for rep in range(args.repeats + 1):  # interleaved; the first round only warms up
        for name, run in ways.items():
            t0 = time.perf_counter()
            best[name] = run()
            if rep:
                seconds[name].append(time.perf_counter() - t0)
            print(name, round(time.perf_counter() - t0, 1), "s", flush=True)
    base = statistics.median(seconds["one after another (solo fit)"])
    rows = [{"way": name, "seconds": round(statistics.median(s), 2), "per_repeat": [round(x, 1) for x in s],
             "trials_per_hour": round(args.trials * 3600 / statistics.median(s)),
             "speedup": round(base / statistics.median(s), 2), "best_val_acc": round(max(best[name]), 4),
             "val_acc_per_trial": [round(v, 4) for v in best[name]]} for name, s in seconds.items()]
    header |= {"trials": args.trials, "repeats": args.repeats,
               "draws (lr, batch size)": [(c.train.lr, c.train.batch_size) for c in cfgs]}
    body = ["| way | seconds (median) | per repeat | trials/hour | speedup | best val acc |",
            "|---|---|---|---|---|---|",
            *(f"| {r['way']} | {r['seconds']} | {', '.join(map(str, r['per_repeat']))} | {r['trials_per_hour']} | "
              f"{r['speedup']}x | {r['best_val_acc']} |" for r in rows)]
    write_results(Path(args.out), f"population-{device.type}", "Population training against one trial after another",
                  header, body, {"rows": rows})


if __name__ == "__main__":
    main()
