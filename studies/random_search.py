"""The recipe's random search launched from a script, through the same API as `hpo run`.

    python studies/random_search.py --data ../shared/data/cifar10-jpeg --n-trials 5
"""

import argparse
from pathlib import Path

import hpo

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--data", default="cifar10", help="cifar10 or a local CIFAR-10 folder")
ap.add_argument("--storage", default=hpo.DEFAULT_STORAGE, help="database URL")
ap.add_argument("--n-trials", type=int, default=5)
args = ap.parse_args()

cfg = hpo.load_study(Path(__file__).with_name("recipe-random-search.toml"), {"data.path": args.data})
result = hpo.run_study(cfg, hpo.Options(storage=args.storage), n_trials=args.n_trials)
best = hpo.best_trial(hpo.read_study(args.storage, cfg.study.name))
print(f"{result.finished} trials in {result.wall_seconds}s; best #{best.number}: "
      f"val_acc {best.value:.4f} with {best.params}")
