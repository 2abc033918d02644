"""What train.precision does to a study's result: the same study in fp32 and in bf16, over seeds.

    python bench/precision_accuracy.py --data ../shared/data/cifar10-jpeg [--seeds 0 1 2] [--studies mlp-search.toml]

Each study file of STUDIES runs shortened (its n_trials and epochs below; the rest as committed) once
per seed and precision, into its own SQLite file, with study.seed and train.seed both the seed; the
gate is skipped (its bf16 memorization is a test). Reported: the best trial's val acc and the study's
wall time, per run, and their medians. Without native bf16 (an AVX2 CPU) autocast emulates it, in the
same numbers 10x slower: the accuracies hold, the times do not.
Writes bench/results/precision-accuracy-<device>.md and .json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine import add_common_args, machine, write_results  # noqa: E402

import hpo  # noqa: E402
from hpo.engine.loop import native_bf16  # noqa: E402

STUDIES = {  # study file -> its shortened budget: long enough to rank, short enough for 3 seeds x 2 here
    "cnn-search.toml": {"study.n_trials": 3, "train.epochs": 5},
    "mlp-search.toml": {"study.n_trials": 5, "train.epochs": 5},
}


def best_val_acc(study: str, overrides: dict, storage: str, device: str) -> tuple[float, float]:
    """(the best trial's val acc, the study's wall seconds) of one shortened study."""
    cfg = hpo.load_study(HERE.parent / "studies" / study, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        opts = hpo.Options(storage=storage, device=device, out=f"{tmp}/runs", artifacts=f"{tmp}/artifacts",
                           skip_checks=True)
        ran = hpo.run_study(cfg, opts, quiet=True)
    return hpo.best_trial(hpo.read_study(storage, cfg.study.name)).value, ran.wall_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--studies", nargs="+", choices=list(STUDIES), default=list(STUDIES))
    args = ap.parse_args()
    device = hpo.resolve_device(args.device)

    rows, record = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for study in args.studies:
            budget = STUDIES[study]
            runs = {}
            for seed in args.seeds:
                for precision in ("fp32", "bf16"):
                    name = f"{Path(study).stem}-{precision}-{seed}"
                    overrides = {**budget, "study.name": name, "study.seed": seed, "train.seed": seed,
                                 "train.precision": precision, "data.path": args.data}
                    acc, seconds = best_val_acc(study, overrides, f"sqlite:///{tmp}/{name}.db", args.device)
                    runs[(seed, precision)] = {"best_val_acc": acc, "wall_seconds": seconds}
                    print(f"{name}: best val acc {acc:.4f}, {seconds:.0f} s", flush=True)
            record[study] = {"budget": budget, "runs": {f"{p} seed {s}": r for (s, p), r in runs.items()}}
            for p in ("fp32", "bf16"):
                accs = [runs[(s, p)]["best_val_acc"] for s in args.seeds]
                secs = [runs[(s, p)]["wall_seconds"] for s in args.seeds]
                rows.append(f"| {study} | {p} | {' '.join(f'{a:.4f}' for a in accs)} | {statistics.median(accs):.4f} "
                            f"| {statistics.median(secs):.0f} |")
    header = {"machine": machine(device), "native bf16": native_bf16(device), "seeds": args.seeds,
              "data": args.data, "budgets": {s: STUDIES[s] for s in args.studies}}
    body = ["| study | precision | best val acc per seed | median | median wall s |", "|---|---|---|---|---|", *rows]
    write_results(Path(args.out), f"precision-accuracy-{device.type}", "train.precision: a study's best val acc",
                  header, body, record)


if __name__ == "__main__":
    main()
