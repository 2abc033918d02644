"""Start-up of the commands that only read: `hpo --help`, `hpo best`, `hpo report` (wall seconds of
the whole process, median of interleaved repeats), and whether each loaded torch.

    python bench/startup.py [--against /path/to/another/checkout] [--repeats 7]

``--against`` times another checkout of hpo (an older revision, say) in the same interleaved runs,
each through PYTHONPATH, on a study this checkout makes on synthetic data.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from engine import add_common_args, machine, write_results

ROOT = Path(__file__).resolve().parents[1]
STUDY = """augment = "none"
[study]
name = "startup"
n_trials = 1
[data]
path = "synthetic"
train_size = 600
val_size = 200
subset_size = 300
[train]
epochs = 1
"""
PROBE = "import runpy, sys; sys.argv[0] = 'hpo'; runpy.run_module('hpo.cli', run_name='__main__')"
LOADED = ("import atexit, sys; atexit.register(lambda: print('torch' in sys.modules, file=sys.stderr)); " + PROBE)


def _run(checkout: Path, argv: list[str], code: str = PROBE) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, cwd=checkout,
                          timeout=120)


def _revision(checkout: Path) -> str:
    return subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "not a git checkout"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--against", type=Path, help="another checkout of hpo to time alongside this one")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hpo-startup-"))
    (work / "startup.toml").write_text(STUDY)
    url = f"sqlite:///{work / 'startup.db'}"
    made = _run(ROOT, ["run", str(work / "startup.toml"), "--storage", url, "--out", str(work / "runs"),
                       "--artifacts", str(work / "art"), "--device", "cpu", "--skip-checks", "--quiet"])
    assert made.returncode == 0, made.stderr
    commands = {"hpo --help": ["--help"], "hpo best": ["best", "--study", "startup", "--storage", url],
                "hpo report": ["report", "--study", "startup", "--storage", url, "--out", str(work / "r.html")]}
    checkouts = {f"this checkout ({_revision(ROOT)})": ROOT,
                 **({f"{args.against} ({_revision(args.against)})": args.against} if args.against else {})}
    seconds: dict[str, dict[str, list[float]]] = {c: {k: [] for k in commands} for c in checkouts}
    for _ in range(args.repeats):  # interleaved: a busy moment slows every side alike
        for side, checkout in checkouts.items():
            for name, argv in commands.items():
                t0 = time.perf_counter()
                r = _run(checkout, argv)
                seconds[side][name].append(time.perf_counter() - t0)
                assert r.returncode == 0, (side, name, r.stderr)
    torch_loaded = {side: {name: _run(checkout, argv, LOADED).stderr.strip().splitlines()[-1] == "True"
                           for name, argv in commands.items()} for side, checkout in checkouts.items()}
    medians = {side: {k: statistics.median(v) for k, v in d.items()} for side, d in seconds.items()}
    body = ["| checkout | command | median s | torch loaded |", "|---|---|---|---|"]
    body += [f"| {side} | `{name}` | {medians[side][name]:.2f} | {torch_loaded[side][name]} |"
             for side in checkouts for name in commands]
    header = {"machine": machine(torch.device("cpu")), "repeats": args.repeats, "python": sys.version.split()[0]}
    write_results(Path(args.out), "startup-cpu", "Start-up of the reading commands", header, body,
                  {"seconds": seconds, "median_s": medians, "torch_loaded": torch_loaded})


if __name__ == "__main__":
    main()
