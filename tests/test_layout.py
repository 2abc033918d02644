"""The package's layout: the layering contract (import-linter, pyproject.toml), no import cycle,
no module over 300 lines, and commands that read a study without loading torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import optuna
import pytest

from hpo.config.study_file import load_study
from hpo.study.identity import open_study

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=300)


def test_the_layers_hold():
    r = _lint(ROOT)
    assert r.returncode == 0 and "Contracts: 2 kept, 0 broken." in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("module, line, contract", [
    ("engine/models.py", "import hpo.study.queue", "Each layer imports only those below it"),  # siblings
    ("study/queue.py", "import hpo.engine.records", "Each layer imports only those below it"),
    ("config/schema.py", "from hpo.storages import retries", "Each layer imports only those below it"),  # up
    ("storages/rdb.py", "import hpo.workers.exits", "Each layer imports only those below it"),
    ("engine/loop.py", "import optuna", "trains any nn.Module without Optuna"),
])
def test_an_import_against_the_layers_breaks_the_contract(tmp_path, module, line, contract):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "hpo", copy / "hpo", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy)
    target = copy / "hpo" / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    r = _lint(copy)
    assert r.returncode == 1 and "Contracts: 1 kept, 1 broken." in r.stdout, r.stdout + r.stderr
    broken = r.stdout.split("Broken contracts")[1]
    assert contract in broken and f"hpo.{module[:-3].replace('/', '.')} ->" in broken


def cycles(package: str) -> list[tuple[str, str]]:
    """Pairs of modules that import each other, directly or through others (imports inside
    functions count: they are cycles that a later change can make load-time ones)."""
    graph = grimp.build_graph(package, cache_dir=None)
    return sorted({tuple(sorted((a, b))) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
                   if graph.chain_exists(importer=b, imported=a)})


def test_no_module_of_hpo_is_in_an_import_cycle():
    assert cycles("hpo") == []


def test_a_cycle_is_found(tmp_path, monkeypatch):
    pkg = tmp_path / "cyclic"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyclic import b\n")
    (pkg / "b.py").write_text("import cyclic.c\n")
    (pkg / "c.py").write_text("def f():\n    from cyclic import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cycles("cyclic") == [("cyclic.a", "cyclic.b"), ("cyclic.a", "cyclic.c"), ("cyclic.b", "cyclic.c")]


def test_every_module_is_at_most_300_lines():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / "hpo").rglob("*.py")}
    assert len(lengths) > 40 and {p: n for p, n in lengths.items() if n > 300} == {}


WHAT_LOADED = """import sys
from hpo.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("torch loaded" if "torch" in sys.modules else "no torch", "exit", code)
"""


@pytest.fixture
def a_finished_study(study_file, tmp_path) -> str:
    """A study hpo made, with one completed trial, in a real SQLite file."""
    url = f"sqlite:///{tmp_path / 'read.db'}"
    handle = open_study(load_study(study_file()), url, create=True)
    handle.study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"best_epoch": 1, "epochs_run": 1}))
    return url


@pytest.mark.parametrize("command", [["--help"], ["run", "--help"], ["best"], ["report"]])
def test_the_commands_that_read_a_study_do_not_load_torch(a_finished_study, tmp_path, command):
    if command in (["best"], ["report"]):
        command = [*command, "--study", "small", "--storage", a_finished_study]
        command += ["--out", str(tmp_path / "report.html")] if command[0] == "report" else []
    r = subprocess.run([sys.executable, "-c", WHAT_LOADED, *command], capture_output=True, text=True, timeout=120)
    assert r.stdout.splitlines()[-1] == "no torch exit 0", r.stdout + r.stderr
    assert command[0] != "best" or "best trial 0: val_acc 0.5000" in r.stdout
    assert command[0] != "report" or (tmp_path / "report.html").stat().st_size > 1000
