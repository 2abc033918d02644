"""The recipe's random search, whole: (b) wall time of hpo against the recipe's loop run one trial
after another, on the same (lr, batch size) draws; (d) what the study's pruning saves, on the same
seeded trials with and without it.

    python bench/search.py --data ../shared/data/cifar10-jpeg [--device cpu] [--trials 5]

On CUDA, where several trials may share the GPU, hpo also runs one worker per trial.

Writes bench/results/search-<device>.md and .json, naming the machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from optuna.trial import TrialState

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import recipe_loop  # noqa: E402
from engine import add_common_args, machine, write_results  # noqa: E402

from hpo import Options, load_data, load_study, open_study, recipe_pipeline, resolve_device, run_study  # noqa: E402
from hpo.config.study_file import parse_override  # noqa: E402
from hpo.engine.data import make_splits  # noqa: E402
from hpo.study.queue import draw  # noqa: E402

STUDY = HERE.parent / "studies" / "recipe-random-search.toml"


def hpo_study(cfg, device: str, trials: int, tmp: Path, tag: str, params: dict, workers: int = 1) -> dict:
    """Run the study in a fresh SQLite file; wall time, epochs spent and the best value."""
    overrides = {"study.name": f"bench-{tag}", "train.patience": cfg.train.patience, "study.pruner": cfg.study.pruner,
                 **params}
    cfg = cfg.with_params(overrides)
    opts = Options(storage=f"sqlite:///{tmp / tag}.db", device=device, out=str(tmp / "runs"),
                   artifacts=str(tmp / "art"), skip_checks=True)
    t0 = time.perf_counter()
    run_study(cfg, opts, n_trials=trials, workers=workers, quiet=True)  # the workers read the config from the study
    wall = time.perf_counter() - t0
    done = open_study(cfg, opts.storage, create=False).trials((TrialState.COMPLETE, TrialState.PRUNED))
    span = max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
    # Steady state: once every worker has finished its first trial (start-up, CUDA and cuBLAS
    # warm-up go there), the rate of the trials that end after that.
    firsts: dict[str, object] = {}
    for t in done:
        firsts[t.user_attrs["worker"]] = min(firsts.get(t.user_attrs["worker"], t.datetime_complete),
                                             t.datetime_complete)
    warm = max(firsts.values())
    later = [t for t in done if t.datetime_complete > warm]
    steady = (len(later) / (max(t.datetime_complete for t in later) - warm).total_seconds() * 3600) if later else None
    trial_s = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
    return {"wall_s": round(wall, 1), "epochs": sum(t.user_attrs["epochs_run"] for t in done),
            "best_val_acc": max(t.value for t in done if t.state == TrialState.COMPLETE),
            "trials": len(done), "span_s": round(span.total_seconds(), 2),  # first trial's start to last one's end
            "trial_s": round(trial_s, 2), "fit_s": round(sum(t.user_attrs["seconds"] for t in done), 2),
            "steady_trials_per_hour": round(steady) if steady else None,
            "params": [t.params for t in sorted(done, key=lambda t: t.number)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    device = resolve_device(args.device)
    params = dict(parse_override(p) for p in args.param)
    base = load_study(STUDY, {"data.path": args.data, **params})
    no_stop = base.with_params({"train.patience": 0})
    data = load_data(args.data)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # (b) the same draws, 20 epochs each, no early stopping on either side
        rows["hpo, no early stopping"] = hpo_study(no_stop, str(device), args.trials, tmp, "b", params)
        rows["hpo, no early stopping, 2 workers"] = hpo_study(no_stop, str(device), args.trials, tmp, "b2", params,
                                                              workers=2)
        if device.type == "cuda":
            rows[f"hpo, no early stopping, {args.trials} workers on the GPU"] = hpo_study(
                no_stop, str(device), args.trials, tmp, "bk", params, workers=args.trials)
        splits = make_splits(data.train_y, base.data)
        xs, ys = data.train_x[splits.subset], data.train_y[splits.subset]
        xv, yv = data.train_x[splits.val], data.train_y[splits.val]
        t0, best = time.perf_counter(), 0.0
        for k in range(args.trials):
            p = draw(base, k)
            hist = recipe_loop.run(xs, ys, xv, yv, device, p["train.batch_size"], p["train.lr"], base.train.epochs,
                                   batch_norm=True, trans=recipe_pipeline())
            best = max(best, max(hist["val_acc"]))
        rows["recipe loop, sequential"] = {"wall_s": round(time.perf_counter() - t0, 1),
                                           "epochs": args.trials * base.train.epochs, "best_val_acc": round(best, 4)}
        # (d) the study's own pruning: early stopping (patience 5), then with the median pruner on top
        rows["hpo, early stopping (patience 5)"] = hpo_study(base, str(device), args.trials, tmp, "d1", params)
        median = base.with_params({"study.pruner": "median"})
        rows["hpo, early stopping + median pruner"] = hpo_study(median, str(device), args.trials, tmp, "d2", params)
    full = rows["hpo, no early stopping"]
    header = {"machine": machine(device), "device": str(device), "torch": torch.__version__, "trials": args.trials,
              "epochs_per_trial": base.train.epochs, "data": args.data, "params": args.param}
    recipe_wall = rows["recipe loop, sequential"]["wall_s"]
    body = ["Same seeded (lr, batch size) draws in every row; gate skipped (it adds about 5 s once).", "",
            "| run | wall s | epochs | share of epochs | best val acc | speed vs recipe |",
            "|---|---|---|---|---|---|",
            *(f"| {k} | {r['wall_s']} | {r['epochs']} | {r['epochs'] / full['epochs']:.0%} | "
              f"{r['best_val_acc']:.4f} | {recipe_wall / r['wall_s']:.2f}x |" for k, r in rows.items())]
    write_results(Path(args.out), f"search-{device.type}", "The recipe's random search", header, body, {"rows": rows})


if __name__ == "__main__":
    main()
