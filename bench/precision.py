"""What train.precision does to a training step: fp32 against bf16, for the MLP and the cnn family.

    python bench/precision.py --data ../shared/data/cifar10-jpeg [--device cuda] [--steps 20]

Each model steps through real batches of the subset as ``fit`` runs them (hpo.engine.loop's
Forward and TrainStep: bf16 autocast, channels_last for conv nets), at batch size 256, after warm-up
steps; fp32 and bf16 steps interleaved over --repeats rounds, the median ms per step reported.
Writes bench/results/precision-<device>.md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine import add_common_args, data_config, machine, write_results  # noqa: E402

from hpo import build_model, load_data, make_augment, resolve_device  # noqa: E402
from hpo.config.schema import ModelConfig, TrainConfig  # noqa: E402
from hpo.engine.data import make_splits, to_device  # noqa: E402
from hpo.engine.loop import Forward, TrainStep  # noqa: E402
from hpo.engine.optim import make_optimizer  # noqa: E402

BATCH = 256
MODELS = {  # the shapes the issue measured, and the cnn family's default
    "mlp 831x3, BN (mlp-search's winner)": ModelConfig.mlp(hidden=831, depth=3, batch_norm=True),
    "cnn 32-64-64": ModelConfig("cnn", {"width": 32, "widen": 2, "depth": 3, "stem": 32}),
    "cnn 64-128-128 (default)": ModelConfig("cnn", {"width": 64, "widen": 2, "depth": 3, "stem": 32}),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stepper(model_cfg: ModelConfig, precision: str, train, device: torch.device):
    """A function timing ``steps`` training steps of a fresh model at ``precision``, in ms per step."""
    torch.manual_seed(0)
    model = build_model(model_cfg).to(device)
    cfg = TrainConfig(optimizer="sgd", nesterov=True, lr=0.01, batch_size=BATCH, precision=precision)
    optimizer = make_optimizer(model, cfg)
    forward = Forward(model, cfg, images=True, device=device)
    step = TrainStep(forward, optimizer, torch.zeros(4, device=device), BATCH, False)
    augment, gen = make_augment("flip-shift"), torch.Generator(device).manual_seed(0)
    model.train()

    def run(steps: int) -> float:
        batches = augment.batches(train, BATCH, gen)
        sync(device)
        t0 = time.perf_counter()
        for _, (x, y) in zip(range(steps), batches, strict=False):
            step(x, y)
        sync(device)
        return 1000 * (time.perf_counter() - t0) / steps

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--repeats", type=int, default=3, help="rounds, fp32 and bf16 interleaved")
    args = ap.parse_args()
    device = resolve_device(args.device)
    data_cfg = data_config(args.param)
    data = load_data(args.data)
    splits = make_splits(data.train_y, data_cfg)
    train = to_device(data.train_x[splits.subset], data.train_y[splits.subset], device)

    rows, record = [], {}
    for name, model_cfg in MODELS.items():
        runs = {p: stepper(model_cfg, p, train, device) for p in ("fp32", "bf16")}
        for run in runs.values():
            run(3)  # warm-up: allocations, oneDNN's kernel choice
        times = {p: [] for p in runs}
        for _ in range(args.repeats):
            for p, run in runs.items():
                times[p].append(run(args.steps))
        fp32, bf16 = (statistics.median(times[p]) for p in ("fp32", "bf16"))
        record[name] = {"model": dataclasses.asdict(model_cfg), "ms_per_step": times}
        rows.append(f"| {name} | {fp32:.1f} | {bf16:.1f} | {fp32 / bf16:.2f}x | {BATCH * 1000 / bf16:,.0f} |")
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else torch.ops.mkldnn._is_mkldnn_bf16_supported()
    header = {"machine": machine(device), "native bf16 (AVX-512 BF16 / AMX, or a GPU's)": native,
              "torch": torch.__version__, "batch_size": BATCH,
              "steps": f"{args.steps} x {args.repeats} rounds, median", "data": args.data}
    body = ["| model | fp32 ms/step | bf16 ms/step | speed-up | bf16 images/s |", "|---|---|---|---|---|", *rows]
    write_results(Path(args.out), f"precision-{device.type}", "train.precision: one training step", header, body,
                  record)


if __name__ == "__main__":
    main()
