"""The recipe's first step, explore the data: shape, dtype, channels, stats, class balance and
sample images, as a JSON summary and an HTML page."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from hpo.config.schema import DataConfig
from hpo.engine.checks import IMBALANCE_WARNING
from hpo.engine.data import ImageData, make_splits
from hpo.files import write_json
from hpo.recipe.report import table, write_html


def _channel_stats(images: np.ndarray) -> dict[str, list[float]]:
    """Exact per-channel stats in [0, 1] from 256-bin histograms: no float copy of the images."""
    channels = images.reshape(-1, images.shape[-1])
    values = np.arange(256, dtype=np.float64)
    mean, std, lo, hi = [], [], [], []
    for c in range(channels.shape[1]):
        counts = np.bincount(channels[:, c], minlength=256).astype(np.float64)
        n = counts.sum()
        m = (values * counts).sum() / n
        mean.append(float(m / 255))
        std.append(float(np.sqrt((values ** 2 * counts).sum() / n - m ** 2) / 255))
        present = np.flatnonzero(counts)
        lo.append(int(present[0]))
        hi.append(int(present[-1]))
    return {"mean": [round(v, 4) for v in mean], "std": [round(v, 4) for v in std], "min": lo, "max": hi}


def _feature_stats(x: np.ndarray) -> dict[str, list[float]]:
    """Float features' stats, over all features at once: a per-feature list would swamp the page."""
    return {k: [round(float(f(x)), 4)] for k, f in
            {"mean": np.mean, "std": np.std, "min": np.min, "max": np.max}.items()}


def _sample_grid(data: ImageData, pick: np.ndarray) -> Any:
    """The recipe's grid of sample images with their labels."""
    import plotly.express as px

    images = data.train_x[pick]
    grid = px.imshow(images[..., 0] if images.shape[-1] == 1 else images, facet_col=0, facet_col_wrap=5,
                     binary_string=True)
    for annotation in grid.layout.annotations:  # "facet_col=k", in plotly's own (row-reversed) order
        annotation.text = data.classes[data.train_y[pick[int(annotation.text.rpartition("=")[2])]]]
    return grid.update_xaxes(showticklabels=False).update_yaxes(showticklabels=False).update_layout(height=600)


def explore(data: ImageData, cfg: DataConfig, out: Path, seed: int = 0) -> dict[str, Any]:
    """Everything the recipe looks at before training; writes explore.html and explore.json."""
    splits = make_splits(data.train_y, cfg)
    labels = {"all training images": data.train_y, "train split": data.train_y[splits.train],
              "val split": data.train_y[splits.val], "test": data.test_y}
    counts = {k: np.bincount(v, minlength=len(data.classes)).tolist() for k, v in labels.items()}
    balanced = {k: min(c) > 0 and max(c) / min(c) <= IMBALANCE_WARNING for k, c in counts.items()}
    n = len(data.train_x)
    stats = {
        "problem": "multiclass classification", "num_classes": len(data.classes), "classes": list(data.classes),
        "images": {"train_folder": n, "test_folder": len(data.test_x)},
        "split_sizes": {k: len(v) for k, v in labels.items()}, "class_counts": counts, "balanced": balanced,
        "input_shape": list(data.input_shape), "dtype": str(data.train_x.dtype),
        "pixel_stats_train_split": _feature_stats(data.train_x[splits.train]) if data.features
        else _channel_stats(data.train_x[splits.train]),
    }
    import plotly.graph_objects as go

    bars = go.Figure([go.Bar(name=k, x=list(data.classes), y=v) for k, v in counts.items()])
    bars.update_layout(barmode="group", xaxis_title="class", yaxis_title="images")
    summary = [{"what": k, "value": json.dumps(v)} for k, v in stats.items() if k != "class_counts"]
    sections = [("Summary", table(summary))]
    if not data.features:
        sections.append(("Sample images", _sample_grid(data, np.random.default_rng(seed).choice(n, 15, replace=False))))
    out.mkdir(parents=True, exist_ok=True)
    write_html(out / "explore.html", "Data exploration", [*sections, ("Class histogram", bars)])
    write_json(out / "explore.json", stats)
    return stats


def explore_lines(stats: dict[str, Any]) -> list[str]:
    """What ``hpo explore`` prints of :func:`explore`'s numbers."""
    s = stats["pixel_stats_train_split"]
    shape = stats["input_shape"]
    what = f"features {shape[0]} {stats['dtype']}" if len(shape) == 1 else \
        f"images {shape[0]} channels {shape[1]}x{shape[2]} {stats['dtype']}"
    return [f"{stats['problem']}, {stats['num_classes']} classes; {what}",
            *(f"{split:<19} {sum(counts):>6} images, per class {counts} "
              f"({'balanced' if stats['balanced'][split] else 'UNBALANCED'})"
              for split, counts in stats["class_counts"].items()),
            f"train split: min {s['min']} max {s['max']} mean {s['mean']} std {s['std']}"]
