"""Checkpoints damaged every way we could think of: each is said in one line, set aside, never copied
into a later attempt, and the run starts from scratch and ends as an unbroken one would."""

import dataclasses
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from hpo.config.schema import DataConfig, ModelConfig, TrainConfig
from hpo.engine.augment import make_augment
from hpo.engine.checkpoints import (
    Checkpoints,
    carry_over,
    load_checkpoint,
    read_resumable,
    resume_history,
    save_checkpoint,
)
from hpo.engine.data import training_splits
from hpo.engine.loop import fit
from hpo.engine.models import build_model
from hpo.engine.records import CheckpointError
from hpo.engine.sources import synthetic

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def splits():
    return training_splits(synthetic(), DataConfig(train_size=600, val_size=200, subset_size=300), CPU)


def run(splits, folder: Path, epochs: int = 4, hidden: int = 100):
    torch.manual_seed(0)
    net = build_model(ModelConfig.mlp(hidden=hidden))
    return fit(net, splits, TrainConfig(epochs=epochs), make_augment("none"), None, Checkpoints(folder))


class Evil:  # pickled by a plain torch.save: weights_only must refuse to build it
    def __reduce__(self):
        return (print, ("ran code from a checkpoint",))


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _without(key: str):
    def damage(path: Path) -> None:
        state = torch.load(path, weights_only=True)
        del state[key]
        torch.save(state, path)
    return damage


# (what is damaged, how, the words of the one line)
DAMAGE = {
    "last truncated to 100 bytes": ("last.pt", lambda p: _truncate(p, 100), "not a readable checkpoint"),
    "last emptied": ("last.pt", lambda p: _truncate(p, 0), "not a readable checkpoint"),
    "last cut in half": ("last.pt", lambda p: _truncate(p, p.stat().st_size // 2), "not a readable checkpoint"),
    "last bytes flipped": ("last.pt", _flip_bytes, "not a readable checkpoint"),
    "last is text": ("last.pt", lambda p: p.write_text("hello\n"), "not a readable checkpoint"),
    "last is a plain pickle": ("last.pt", lambda p: p.write_bytes(pickle.dumps({"model": {}})),
                               "not a readable checkpoint"),
    "last runs code": ("last.pt", lambda p: torch.save({"model": Evil()}, p), "not a readable checkpoint"),
    "last is a list": ("last.pt", lambda p: torch.save([1, 2], p), "not an hpo checkpoint"),
    "last has no weights": ("last.pt", _without("model"), "not an hpo checkpoint"),
    "last has no optimizer": ("last.pt", _without("optimizer"), "no optimizer"),
    "best truncated": ("best.pt", lambda p: _truncate(p, 100), "not a readable checkpoint"),
    "best missing": ("best.pt", lambda p: p.unlink(), "best.pt: missing"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_checkpoint_is_one_line_never_copied_and_the_run_starts_from_scratch(splits, tmp_path, capfd,
                                                                                      case):
    file, damage, words = DAMAGE[case]
    whole = run(splits, tmp_path / "whole")
    run(splits, tmp_path / "cut", epochs=2)
    damage(tmp_path / "cut" / file)
    capfd.readouterr()

    assert read_resumable(tmp_path / "cut") is None and resume_history(tmp_path / "cut") == []
    (tmp_path / "retry").mkdir()
    carry_over(tmp_path / "cut", tmp_path / "retry")
    assert list((tmp_path / "retry").iterdir()) == []  # nothing damaged is carried into the next attempt
    again = run(splits, tmp_path / "cut")  # the folder itself, damaged: from scratch, to the same end
    assert again.resumed_from_epoch == 0
    assert [dataclasses.replace(s, seconds=0) for s in again.history] == \
        [dataclasses.replace(s, seconds=0) for s in whole.history]
    lines = capfd.readouterr().err.splitlines()
    assert lines and all(line.startswith("hpo: ") and words in line and "starting from scratch" in line
                         for line in lines), lines
    assert str(tmp_path / "cut" / file) in lines[0]


def test_a_checkpoint_of_another_model_is_one_line_and_the_run_starts_from_scratch(splits, tmp_path, capfd):
    run(splits, tmp_path, epochs=2, hidden=50)
    capfd.readouterr()
    result = run(splits, tmp_path, epochs=3)
    assert result.resumed_from_epoch == 0 and result.epochs_run == 3
    (line,) = capfd.readouterr().err.splitlines()
    assert line.startswith(f"hpo: {tmp_path / 'last.pt'}: does not fit this run (") and "from scratch" in line


def test_a_readable_pair_is_copied_whole_and_the_retry_resumes(splits, tmp_path):
    run(splits, tmp_path / "cut", epochs=2)
    (tmp_path / "retry").mkdir()
    carry_over(tmp_path / "cut", tmp_path / "retry")
    assert sorted(p.name for p in (tmp_path / "retry").iterdir()) == ["best.pt", "last.pt"]  # no temporary left
    for file in ("best.pt", "last.pt"):
        assert (tmp_path / "retry" / file).read_bytes() == (tmp_path / "cut" / file).read_bytes()
    assert run(splits, tmp_path / "retry").resumed_from_epoch == 2


def test_a_copy_that_fails_leaves_no_half_file(splits, tmp_path, monkeypatch):
    run(splits, tmp_path / "cut", epochs=2)
    (tmp_path / "retry").mkdir()

    def dies_midway(src, dst):  # a worker killed mid-copy, as far as the files can tell
        Path(dst).write_bytes(Path(src).read_bytes()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        carry_over(tmp_path / "cut", tmp_path / "retry")
    assert list((tmp_path / "retry").iterdir()) == []


def test_load_checkpoint_names_the_file_and_refuses_code(tmp_path):
    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt: not a readable checkpoint \(.+\)"):
        load_checkpoint(tmp_path / "evil.pt")
    save_checkpoint(tmp_path / "ok.pt", {"model": {"w": torch.ones(2)}, "epoch": 3})
    assert load_checkpoint(tmp_path / "ok.pt")["epoch"] == 3
