"""hpo pipeline: the whole recipe in one command, each stage once per study."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from conftest import hpo_main

from hpo import load_study
from hpo.recipe.pipeline import STAGES, pipeline
from hpo.study.reads import read_study
from hpo.study.records import PIPELINE_ATTR
from hpo.workers.slots import Options

STUDY = """augment = "flip-shift"
[study]
sampler = "tpe"
n_trials = 6
pruner = "hyperband"
[train]
epochs = 3
[retrain]
epochs = 2
top = 2
[search]
"train.lr" = {low = 1e-3, high = 3e-2, log = true}
"train.optimizer" = ["adam", "adamw", "sgd"]
"train.label_smoothing" = [0.0, 0.1]
"""


def test_the_pipeline_runs_every_stage_once_and_sums_up(study_file, tmp_path):
    path, url = study_file(STUDY), f"sqlite:///{tmp_path / 'p.db'}"
    args = ("pipeline", path, "--storage", url, "--device", "cpu", "--out", tmp_path / "runs", "--artifacts",
            tmp_path / "art", "--quiet", "--json")
    first = hpo_main(*args)
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout.splitlines()[-1])
    assert [s["name"] for s in result["stages"]] == list(STAGES) and not any(s["done_before"] for s in result["stages"])
    final = result["final"]
    assert len(final["transfer"]) == 2 and final["test_acc"] > 0.5 and final["epochs_run"] == 2  # [retrain]'s budget
    assert Path(result["report"]).is_file() and Path(result["explore"]).is_file()
    lines = first.stdout.splitlines()
    assert lines[0].startswith(f"pipeline small: test_acc {final['test_acc']:.4f}")
    assert "Spearman rho" in lines[1] and lines[2].startswith("search epochs: ") and "wall time: explore" in lines[4]
    report = (tmp_path / "runs" / "small" / "report.html").read_text()
    assert "Subset to full split" in report and "Spearman's rho" in report and "saved" in report

    handle = read_study(url, "small")
    trials = [(t.number, t.state) for t in handle.trials()]
    recorded = {k for k in handle.study.user_attrs if k.startswith(PIPELINE_ATTR)}
    assert recorded == {f"{PIPELINE_ATTR}:{s}" for s in STAGES}
    again = hpo_main(*args)
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout.splitlines()[-1])
    assert all(s["done_before"] for s in second["stages"]) and second["final"] == final
    assert [(t.number, t.state) for t in read_study(url, "small").trials()] == trials  # nothing ran again

    more = hpo_main(*args, "--n-trials", "8")  # a larger N: the search and what depends on it run again
    assert more.returncode == 0, more.stderr
    third = json.loads(more.stdout.splitlines()[-1])
    assert [s["done_before"] for s in third["stages"]] == [True, True, False, False, False]
    assert len(read_study(url, "small").trials()) == 8


def test_a_pipeline_goes_on_from_a_search_another_command_finished(finished_study, tmp_path):
    """The search stage of a study that already holds its N trials trains nothing; the later stages run
    (the gate too: `hpo run` passed it, so it returns at once)."""
    folder, path, url = finished_study
    edited = tmp_path / "small.toml"  # a shorter [retrain] than its defaults: not part of the study's identity
    edited.write_text(path.read_text() + "\n[retrain]\nepochs = 2\ntop = 2\n")
    cfg = load_study(edited)
    opts = Options(storage=url, device="cpu", out=str(tmp_path / "runs"), artifacts=str(folder / "art"))
    before = [t.number for t in read_study(url, "small").trials()]
    assert len(before) == cfg.study.n_trials
    result = pipeline(cfg, opts, tmp_path / "out", quiet=True)
    assert [t.number for t in read_study(url, "small").trials()] == before
    assert result.final.from_trial in before and result.report.is_file() and (tmp_path / "out" / "explore").is_dir()
    assert result.epochs.run == sum(t.user_attrs["epochs_run"] for t in read_study(url, "small").trials())


@pytest.mark.parametrize("args, message", [
    (["--top", "0"], "--top must be a positive integer, got 0"),
    (["--workers", "0"], "--workers must be a positive integer, got 0"),
    (["--param", "retrain.top=0"], "retrain.top: must be >= 1, got 0"),
])
def test_bad_pipeline_options_are_one_line_and_write_nothing(study_file, tmp_path, args, message):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    r = hpo_main("pipeline", study_file(STUDY), "--storage", url, "--device", "cpu", *args)
    assert r.returncode == 2 and r.stderr.strip().endswith(message), r.stderr
    assert not (tmp_path / "p.db").exists() or not optuna.get_all_study_names(url)
