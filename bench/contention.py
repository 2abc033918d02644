"""CPU contention: independent hpo processes on one machine, under each thread and OpenMP wait setting.

    python bench/contention.py --data ../shared/data/cifar10-jpeg [--epochs 2] [--repeats 3]

For each setting (environment variables of the hpo processes) ``hpo train studies/recipe-baseline.toml``
runs alone, as a pair started together (``hpo worker`` started twice), and beside a busy process
(a single-threaded spin loop: a dashboard, a browser, the recipe's own loop). The time is ``fit``'s
(data loading excluded), the median over interleaved repeats. "pair rate" is the work of the pair
against one process alone: 2 x alone / pair; 1.0 means two processes on the machine get as much
done as one, below 1.0 they fight over the cores. Writes bench/results/contention-cpu.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from engine import machine, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# An empty OMP_WAIT_POLICY is libgomp's default (spin a while, then sleep): what torch does unless told.
SETTINGS = {
    "torch's defaults (all cores, OpenMP spins before it sleeps)": {"OMP_WAIT_POLICY": ""},
    "all cores, OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "all cores, GOMP_SPINCOUNT=10000 (spin briefly, then sleep)": {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "10000"},
    "all cores, GOMP_SPINCOUNT=1000": {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "1000"},
    "1 thread": {"OMP_WAIT_POLICY": "", "OMP_NUM_THREADS": "1"},
    "1 thread, OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"},
    "hpo's defaults (nothing set)": {},
}
SPIN = "import time\nend = time.time() + 600\nwhile time.time() < end: pass\n"


def train(args: argparse.Namespace, env: dict[str, str], tmp: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "hpo.cli", "train", str(ROOT / "studies" / "recipe-baseline.toml"), "--data",
           args.data, "--epochs", str(args.epochs), "--device", "cpu", "--out", str(tmp), "--json"]
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return subprocess.Popen(cmd, env={**base, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fit_seconds(proc: subprocess.Popen) -> float:
    out, err = proc.communicate(timeout=900)
    if proc.returncode:
        raise SystemExit(f"hpo train failed: {err.strip().splitlines()[-1:]}")
    return json.loads(out.splitlines()[-1])["seconds"]


def scenario(name: str, args: argparse.Namespace, env: dict[str, str], tmp: Path) -> list[float]:
    """Seconds in fit of each hpo process in one run of the scenario."""
    if name == "alone":
        return [fit_seconds(train(args, env, tmp))]
    if name == "pair":
        procs = [train(args, env, tmp) for _ in range(2)]
        return [fit_seconds(p) for p in procs]
    spin = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        return [fit_seconds(train(args, env, tmp))]
    finally:
        spin.kill()
        spin.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--settings", nargs="+", type=int, metavar="I", help="only these rows of SETTINGS (0-based)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    settings = {k: v for i, (k, v) in enumerate(SETTINGS.items()) if args.settings is None or i in args.settings}
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "hpo-contention-runs"
    scenarios = ("alone", "pair", "beside a busy process")
    times: dict[str, dict[str, list[float]]] = {s: {c: [] for c in scenarios} for s in settings}
    for repeat in range(args.repeats):  # interleaved: the machine's neighbours drift over minutes
        for setting, env in settings.items():
            for name in scenarios:
                times[setting][name] += scenario(name, args, env, tmp)
                print(f"repeat {repeat + 1} {setting} / {name}: {times[setting][name][-1]:.2f}s", flush=True)
    median = {s: {c: statistics.median(v) for c, v in by.items()} for s, by in times.items()}
    body = ["| setting | alone (s) | each of a pair (s) | pair rate | beside a busy process (s) |",
            "|---|---|---|---|---|"]
    for setting, m in median.items():
        body.append(f"| {setting} | {m['alone']:.2f} | {m['pair']:.2f} | {2 * m['alone'] / m['pair']:.2f} | "
                    f"{m['beside a busy process']:.2f} |")
    header = {"machine": machine(torch.device("cpu")), "torch": torch.__version__,
              "command": f"hpo train studies/recipe-baseline.toml --epochs {args.epochs} --device cpu",
              "repeats": args.repeats, "time": "seconds in fit (data loading excluded), median"}
    write_results(Path(args.out), "contention-cpu", "CPU contention: hpo processes side by side", header, body,
                  {"seconds": times, "median": median})


if __name__ == "__main__":
    main()
