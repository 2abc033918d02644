"""The docs: the site builds in strict mode, its study-file reference holds every key of the config
dataclasses, the README stays short, and every command the README and the tutorial show runs."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import SMALL_DATA, hpo_main

from hpo.config import schema

ROOT = Path(__file__).resolve().parent.parent
# What a command shown with a real budget runs here instead: the suite's small synthetic splits, two epochs.
SMALL_SPLITS = {f"data.{k}": v for k, v in tomllib.loads(SMALL_DATA)["data"].items() if k != "path"}
SMALL = [arg for key, value in {**SMALL_SPLITS, "train.epochs": 2}.items() for arg in ("--param", f"{key}={value}")]


def build(docs: Path, site: Path) -> subprocess.CompletedProcess:
    config = docs.parent / "mkdocs.yml"
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})


def test_the_docs_build_in_strict_mode_with_every_study_file_key_in_the_reference(tmp_path):
    r = build(ROOT / "docs", tmp_path / "site")
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "site" / "reference" / "index.html").read_text()
    for cls in [*schema.SECTIONS.values(), *schema.BUILT_IN_FAMILIES.values()]:
        for f in dataclasses.fields(cls):
            if f.name not in ("kwargs", "train"):  # [model]'s family keys and [retrain]'s other [train] keys
                assert f"<code>{f.name}</code>" in page, (cls.__name__, f.name)
    assert "<code>augment</code>" in page  # study_file.StudyConfig's one top-level key
    assert "sampler seed, so a study can be replayed" in page  # [study] seed's comment, read from the source


def test_a_broken_link_fails_the_build(tmp_path):
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with (tmp_path / "docs" / "tutorial.md").open("a") as f:
        f.write("\nSee [the missing page](missing.md).\n")
    r = build(tmp_path / "docs", tmp_path / "site")
    assert r.returncode != 0 and "missing.md" in r.stderr


def test_the_readme_is_short_and_names_no_path_outside_the_repository():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 8_500
    assert "../shared" not in text
    for link in re.findall(r"\]\(([^)#]+)", text):
        assert link.startswith("http") or (ROOT / link).exists(), link


def test_the_readme_s_study_file_loads_and_runs(tmp_path):
    """Its keys are real ones (a renamed key fails here), on the small synthetic data."""
    (block,) = re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (tmp_path / "study.toml").write_text(block)
    r = hpo_main("run", "study.toml", "--data", "synthetic", *SMALL, "--param", "study.n_trials=2", "--device", "cpu",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


def shown_commands() -> list[str]:
    """Every `hpo ...` command of the sh blocks of the README and the tutorial (a line, or a part of one
    joined by &&, as the set-up's), in order, each once."""
    commands = []
    for page in (ROOT / "README.md", ROOT / "docs" / "tutorial.md"):
        for block in re.findall(r"```sh\n(.*?)```", page.read_text(), re.S):
            for line in block.splitlines():
                parts = (part.strip() for part in line.split("  #")[0].split("&&"))
                commands += [part for part in parts if part.startswith("hpo ")]
    return list(dict.fromkeys(commands))


def test_every_command_the_readme_and_the_tutorial_show_runs(tmp_path):
    """Each on the small synthetic data (PATH -> synthetic; a command shown without --data, which would
    download CIFAR-10, gets --data synthetic) with two epochs, in a folder holding the repository's
    studies/, one after another as a user types them: exit 0 each."""
    shutil.copytree(ROOT / "studies", tmp_path / "studies")
    commands = shown_commands()
    assert "hpo train studies/recipe-baseline.toml" in commands  # the set-up's, after its &&
    assert len(commands) >= 9 and any(c.startswith("hpo pipeline") for c in commands), commands
    for command in commands:
        args = command.replace("PATH", "synthetic").split()[1:]
        usage = hpo_main(args[0], "--help").stdout
        extra = SMALL + (["--param", "retrain.epochs=2"] if args[0] in ("pipeline", "retrain") else [])
        extra = (extra if "--param" in usage else []) + (["--data", "synthetic"] if "--data" in usage
                                                          and "--data" not in args else [])
        r = hpo_main(*args, *extra, cwd=tmp_path)
        assert r.returncode == 0, (command, r.stderr[-2000:])


def test_the_readme_s_own_model_runs_as_a_script(tmp_path):
    """The README's Python block, saved as a file and run as a user runs it, on the small synthetic data."""
    (block,) = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    small = repr({"data.path": "synthetic", **SMALL_SPLITS, "study.n_trials": 2, "train.epochs": 1})
    assert '{"data.path": "PATH"}' in block
    (tmp_path / "own_model.py").write_text(block.replace('{"data.path": "PATH"}', small))
    shutil.copytree(ROOT / "studies", tmp_path / "studies")
    r = subprocess.run([sys.executable, "own_model.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import optuna

    study = optuna.load_study(study_name="recipe-random-search", storage=f"sqlite:///{tmp_path / 'own-model.db'}")
    assert len(study.trials) == 2 and all("model.width" in t.params for t in study.trials)
