"""(c) Several trials on one GPU: trials per hour with K = 1, 2, 4, 8 workers sharing it.

    python bench/workers.py --data ../shared/data/cifar10-jpeg [--device cuda] [--workers 1 2 4 8]

Every K runs the same N seeded trials of the recipe's random search, 20 epochs each with no early
stopping (so every K does the same work), in a fresh SQLite file. Reported: the wall time from
launch, worker start-up included, the rate from the first trial's start to the last one's end, and
the steady rate: the trials that end after every worker has finished its first one (start-up and
warm-up go there), which is what an hours-long study sees; it needs N >= 2K. ``fit share`` is the
part of trial time spent in ``fit``; the rest is the trial's own overhead (storage, checkpoints,
artifact, data to the device) and, in each worker's first trial, its warm-up.
Writes bench/results/workers-<device><tag>.md and .json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine import add_common_args, machine, write_results  # noqa: E402
from search import STUDY, hpo_study  # noqa: E402

from hpo import load_study, resolve_device  # noqa: E402
from hpo.config.study_file import parse_override  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--trials", type=int, default=16, help="the same N trials for every K (N >= 2K)")
    ap.add_argument("--tag", default="", help="suffix of the result files, e.g. -mps")
    args = ap.parse_args()
    device = resolve_device(args.device)
    params = dict(parse_override(p) for p in args.param)
    cfg = load_study(STUDY, {"data.path": args.data, **params, "train.patience": 0})
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.workers:
            r = hpo_study(cfg, device.type, args.trials, Path(tmp), f"k{k}", params, workers=k)
            r["trials_per_hour"] = round(r["trials"] / r["span_s"] * 3600)
            r["trials_per_hour_with_startup"] = round(r["trials"] / r["wall_s"] * 3600)
            rows[k] = r
            print(k, {key: v for key, v in r.items() if key != "params"}, flush=True)
    one = rows[args.workers[0]]
    header = {"machine": machine(device), "device": str(device), "torch": torch.__version__, "trials": args.trials,
              "epochs_per_trial": cfg.train.epochs, "data": args.data, "params": args.param, "tag": args.tag}
    body = ["| workers | wall s (start-up incl.) | steady trials/hour | vs first row | trials/hour, first start to "
            "last end | trials/hour with start-up | mean trial s | fit share of trial time | best val acc |",
            "|---|---|---|---|---|---|---|---|---|",
            *(f"| {k} | {r['wall_s']} | {r['steady_trials_per_hour']} | "
              f"{(r['steady_trials_per_hour'] or 0) / (one['steady_trials_per_hour'] or 1):.2f}x | "
              f"{r['trials_per_hour']} | {r['trials_per_hour_with_startup']} | {r['trial_s'] / r['trials']:.2f} | "
              f"{r['fit_s'] / r['trial_s']:.0%} | {r['best_val_acc']:.4f} |" for k, r in rows.items())]
    write_results(Path(args.out), f"workers-{device.type}{args.tag}", "Trials per hour, K workers on one device",
                  header, body, {"rows": {str(k): r for k, r in rows.items()}})


if __name__ == "__main__":
    main()
