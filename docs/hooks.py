"""MkDocs hook: the study-file reference, generated from ``hpo.config``'s frozen dataclasses and the
comments on their fields, so a key added to the code appears in the docs without a second edit."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import re
import textwrap
import tokenize
from typing import Any

from hpo.config import schema, study_file

MARKER = "<!-- study-file-reference -->"
SKIP = {"ModelConfig": {"kwargs"}, "RetrainSection": {"train"},
        "StudyConfig": {"study", "data", "model", "train", "retrain", "search", "source"}}
TABLES = [  # (heading, dataclass, what the section is), in the order a study file reads
    ("Top level", study_file.StudyConfig, "Keys outside any section."),
    ("[study]", schema.StudySection, None),
    ("[data]", schema.DataConfig, None),
    ("[model]", schema.ModelConfig, None),
    ('[model] of family = "mlp"', schema.MLPKeys, None),
    ('[model] of family = "cnn"', schema.CNNKeys, None),
    ("[train]", schema.TrainConfig, None),
    ("[retrain]", schema.RetrainSection, None),
]


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment: the full-line comments just above it, then the one at its end."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {t.start[0]: (t.string.lstrip("#").strip(), t.line.lstrip().startswith("#"))
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, line = [], node.lineno - 1
            while comments.get(line, ("", False))[1]:
                above.insert(0, comments[line][0])
                line -= 1
            text, full_line = comments.get(node.end_lineno, ("", True))
            out[node.target.id] = " ".join(above + ([] if full_line else [text]))
    return out


def _default(f: dataclasses.Field) -> str:
    """The default as a study file writes it."""
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return json.dumps(value) if isinstance(value, (str, bool)) else str(value)


def _type(f: dataclasses.Field) -> str:
    """``Literal['a', 'b']`` as the values a study file may write: ``"a" | "b"``."""
    literal = re.fullmatch(r"Literal\[(.*)\]", str(f.type))
    if not literal:
        return str(f.type)
    return " | ".join(json.dumps(ast.literal_eval(v.strip())) for v in literal[1].split(","))


def _bounds(f: dataclasses.Field) -> str:
    if f.metadata.get("size"):
        return "a count >= 1, or a fraction in (0, 1)"
    lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
    if lo is None and hi is None:
        return ""
    left = f"> {lo}" if f.metadata.get("lo_open") else f">= {lo}"
    return left if hi is None else f"{left}, <= {hi}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def table(cls: type) -> list[str]:
    """One row per key of ``cls``: name, type, default, bounds and its comment."""
    comments = field_comments(cls)
    rows = ["| key | type | default | bounds | what it is |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name in SKIP.get(cls.__name__, ()):
            continue
        rows.append(f"| `{f.name}` | `{_cell(_type(f))}` | `{_cell(_default(f))}` | {_bounds(f)} | "
                    f"{_cell(comments.get(f.name, ''))} |")
    return rows


def reference() -> str:
    """Every section's table, with the dataclass's docstring above it."""
    out = []
    for heading, cls, doc in TABLES:
        doc = doc or inspect.cleandoc(cls.__doc__ or "").replace("``", "`")
        out += [f"## {heading}", "", doc, "", *table(cls), ""]
    return "\n".join(out)


def on_page_markdown(markdown: str, **_: Any) -> str:
    return markdown.replace(MARKER, reference()) if MARKER in markdown else markdown
