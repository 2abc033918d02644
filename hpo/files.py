"""Files written whole or not at all: a reader, or a crash, never sees half a file, and a full disk
or a read-only folder is one error that names the file (``WriteError``) rather than a traceback."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import string
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import optuna


class WriteError(RuntimeError):
    """A file or folder could not be written; the message names it and says why."""


NAME_CHARS = frozenset(string.ascii_letters + string.digits + "._-")
NAME_MAX = 100  # characters; a run folder adds a date, a trial number and a tag to it


def folder_name(name: str) -> str:
    """``name`` as one safe path component: unchanged when it is one (a letter or digit first, then
    letters, digits, ``.``, ``_``, ``-``), else its other characters as ``_`` and a hash of it
    appended, so that two names never share a folder."""
    if name and len(name) <= NAME_MAX and name[0].isalnum() and set(name) <= NAME_CHARS:
        return name
    kept = "".join(c if c in NAME_CHARS else "_" for c in name[:NAME_MAX]).lstrip("._-") or "study"
    return f"{kept}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def inside(root: Path, name: str) -> Path:
    """``root / name``, refused unless it stays under ``root`` (a last guard: names go through
    :func:`folder_name` first)."""
    path = root / name
    if os.path.commonpath([os.path.abspath(root), os.path.abspath(path)]) != os.path.abspath(root) \
            or Path(name).name != name:
        raise WriteError(f"{name!r} would write outside {root}")
    return path


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Turn an OSError raised while the body writes ``path`` into a WriteError naming it."""
    try:
        yield
    except OSError as e:
        why = (e.strerror or type(e).__name__).lower()  # "no space left on device", "read-only file system"
        raise WriteError(f"{why} writing {path}") from None


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename it over ``path``; on any
    failure the temporary file is removed and ``path`` keeps what it had."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON, written whole or not at all."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def store_artifact(store: Path | str, path: Path | str, owner: optuna.Study | optuna.trial.BaseTrial) -> str:
    """Upload ``path`` into the Optuna artifact folder ``store`` for a study or trial; returns the
    artifact id. Served as a download (the dashboard would guess a type from the file name)."""
    import optuna

    with writing(store):
        Path(store).mkdir(parents=True, exist_ok=True)
        return optuna.artifacts.upload_artifact(artifact_store=optuna.artifacts.FileSystemArtifactStore(str(store)),
                                                file_path=str(path), study_or_trial=owner,
                                                mimetype="application/octet-stream")
