"""Shared fixtures: small real data made on the fly (a fresh checkout has no ../shared)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SMALL_DATA = """
[data]
path = "synthetic"
train_size = 600
val_size = 200
subset_size = 300
"""


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session decodes into its own cache, never the user's ~/.cache/hpo."""
    monkeypatch.setenv("HPO_CACHE", str(tmp_path_factory.getbasetemp() / "hpo-cache"))


@pytest.fixture
def study_file(tmp_path: Path):
    """Write a study file (TOML text) on top of the small synthetic data section."""

    def write(body: str = "", name: str = "small", data: str = SMALL_DATA) -> Path:
        # Plain keys (augment) must precede tables in TOML, so the body's leading lines go first.
        path = tmp_path / f"{name}.toml"
        path.write_text(body + "\n" + data)
        return path

    return write


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A tiny ImageFolder dataset of real PNG files: 3 classes, 8 train and 4 test images each."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for split, n in (("train", 8), ("test", 4)):
        for c in ("ant", "bee", "cow"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root
