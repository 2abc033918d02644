"""Where a training step's time goes on the device, and the floor under it.

    python bench/steps.py --data ../shared/data/cifar10-jpeg [--device cuda] [--batch-size 32]

For eager steps and (on CUDA) replayed CUDA graphs, over one epoch of the subset without
augmentation, as ``fit`` runs it:
- wall time per step, and from torch.profiler the kernels per step and the GPU-busy time per
  step: wall minus busy is what the host costs (launches, Python, the allocator);
- the floor: the captured step replayed back to back with no host work between, which is what
  the GPU itself needs per step, and the same with the per-step input copies.
Writes bench/results/steps-<device>.md and .json, and Chrome traces of 20 steps of each.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine import add_common_args, data_config, machine, write_results  # noqa: E402

from hpo import build_model, load_data, make_augment, resolve_device  # noqa: E402
from hpo.config.schema import ModelConfig, TrainConfig  # noqa: E402
from hpo.engine.data import make_splits, to_device  # noqa: E402
from hpo.engine.loop import Forward, TrainStep  # noqa: E402
from hpo.engine.optim import make_optimizer  # noqa: E402

TRACE_STEPS = 20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(train, batch_size: int, graphs: bool, trace: Path) -> dict:
    device = train.x.device
    torch.manual_seed(0)
    model = build_model(ModelConfig()).to(device)
    optimizer = make_optimizer(model, TrainConfig(batch_size=batch_size), graphs)
    sums = torch.zeros(4, device=device)
    step = TrainStep(Forward(model, TrainConfig(), images=True, device=device), optimizer, sums, batch_size, graphs)
    augment, gen = make_augment("none"), torch.Generator(device).manual_seed(0)
    steps = math.ceil(len(train) / batch_size)

    def epoch() -> float:
        sync(device)
        t0 = time.perf_counter()
        for x, y in augment.batches(train, batch_size, gen):
            step(x, y)
        sync(device)
        return time.perf_counter() - t0

    epoch()  # warm-up, and the capture
    wall = min(epoch() for _ in range(3)) / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        epoch()
    # GPU-side ranges of user annotations (Optimizer.step#Adam.step) overlap their kernels: not counted
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / steps
    top: dict[str, float] = {}
    for e in kernels:
        name = e.name.split("<")[0].removeprefix("void ")[:60]  # templates make names kilobytes long
        top[name] = top.get(name, 0.0) + e.time_range.elapsed_us() / steps
    batches = list(augment.batches(train, batch_size, gen))[:TRACE_STEPS]
    with profile(activities=activities) as prof:
        for x, y in batches:
            step(x, y)
        sync(device)
    prof.export_chrome_trace(str(trace))
    row = {"wall_us_per_step": round(wall * 1e6, 1), "samples_per_s": round(batch_size / wall),
           "kernels_per_step": round(len(kernels) / steps, 1), "gpu_busy_us_per_step": round(busy, 1),
           "top_kernels_us_per_step": {k: round(v, 2) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:8]}}
    if step.graph is not None:  # the floor: no host work between steps
        x, y = batches[0]
        for name, fn in (("replay_only", step.graph.replay), ("replay_with_copies", lambda: step(x, y))):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            fn()
            start.record()
            for _ in range(1000):
                fn()
            end.record()
            sync(device)
            row[f"floor_{name}_us_per_step"] = round(start.elapsed_time(end), 1)  # ms per 1000 = us per step
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    device = resolve_device(args.device)
    data = load_data(args.data)
    splits = make_splits(data.train_y, data_config(args.param))
    train = to_device(data.train_x[splits.subset], data.train_y[splits.subset], device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    modes = {"eager steps": False, "CUDA graphs": True} if device.type == "cuda" else {"eager steps": False}
    rows = {}
    for name, graphs in modes.items():
        trace = out / f"trace-{device.type}-{'graphs' if graphs else 'eager'}.json"
        rows[name] = measure(train, args.batch_size, graphs, trace)
        print(name, rows[name], flush=True)
    header = {"machine": machine(device), "device": str(device), "torch": torch.__version__,
              "batch_size": args.batch_size, "steps_per_epoch": math.ceil(len(train) / args.batch_size),
              "data": args.data, "params": args.param}
    body = ["| steps | wall us/step | samples/s | kernels/step | GPU-busy us/step | floor: replays alone us/step | "
            "floor: replays + input copies us/step |", "|---|---|---|---|---|---|---|",
            *(f"| {k} | {r['wall_us_per_step']} | {r['samples_per_s']} | {r['kernels_per_step']} | "
              f"{r['gpu_busy_us_per_step']} | {r.get('floor_replay_only_us_per_step', '-')} | "
              f"{r.get('floor_replay_with_copies_us_per_step', '-')} |" for k, r in rows.items()),
            "", "Top kernels, us per step:", "",
            *(f"- {k}: {json.dumps(r['top_kernels_us_per_step'])}" for k, r in rows.items())]
    write_results(out, f"steps-{device.type}", "Where a training step's time goes", header, body, {"rows": rows})


if __name__ == "__main__":
    main()
