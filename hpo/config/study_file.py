"""The study file: one frozen dataclass per section, validated once at load.

A study file is TOML. Top-level ``augment`` comes first (TOML wants plain keys before tables),
then the sections ``[study]``, ``[data]``, ``[model]``, ``[train]``, ``[retrain]`` and ``[search]``::

    augment = "recipe"          # "none", "recipe", "flip-shift", or an albumentations file (.json/.yaml)

    [train]
    lr = 0.001

    [search]
    "train.lr" = [0.01, 0.001]                      # categorical
    "train.weight_decay" = {low = 1e-6, high = 1e-2, log = true}

Everything after :func:`load_study` trusts these objects: the checks live here only.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpo.config import families, space
from hpo.config.schema import (
    BUILT_IN_AUGMENTS,
    HYPERPARAMETER_SECTIONS,
    SECTIONS,
    ConfigError,
    DataConfig,
    ModelConfig,
    RetrainSection,
    StudySection,
    TrainConfig,
)
from hpo.config.space import Distribution
from hpo.config.values import Key, check_value, section_keys
from hpo.files import NAME_MAX, folder_name


@dataclass(frozen=True)
class StudyConfig:
    """A whole study file, validated."""

    study: StudySection
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    retrain: RetrainSection = field(default_factory=RetrainSection)
    augment: str = "none"  # "none", "recipe", "flip-shift", or the path of an albumentations pipeline file
    search: dict[str, Distribution] = field(default_factory=dict)  # dotted key -> how it varies
    source: str = ""  # the file it came from

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON records (run directories, study attributes)."""
        out = dataclasses.asdict(self)
        out["model"] = self.model.keys()
        out["search"] = {k: v.to_dict() for k, v in self.search.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyConfig:
        """The inverse of :meth:`to_dict`, for the config a study stores (validated when stored).
        Raises ConfigError when it was written by an hpo whose config had other keys."""
        try:
            search = {k: space.from_dict(v) for k, v in d["search"].items()}
            # A section added since (retrain) takes its defaults in a study stored before it.
            sections = {name: SECTIONS[name](**d.get(name, {})) for name in SECTIONS if name != "model"}
            return cls(**sections, model=ModelConfig.from_keys(d["model"]), augment=d["augment"], search=search,
                       source=d["source"])
        except (KeyError, TypeError) as e:
            why = f"{type(e).__name__}: {e}"
            raise ConfigError([f"the study's stored config was written by another version of hpo ({why})"]) from None

    def fingerprint(self, *parts: str) -> str:
        """A short hash of the named parts (``data``, ``model``, ``study.sampler``...). The data
        path is left out: workers on other machines keep the same images elsewhere."""
        d = self.to_dict()
        d["data"] = {k: v for k, v in d["data"].items() if k != "path"}
        picked = {p: d[p.partition(".")[0]][p.partition(".")[2]] if "." in p else d[p] for p in parts}
        return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def with_params(self, params: dict[str, Any]) -> StudyConfig:
        """This config with dotted keys set (a trial's sampled values), validated like the file."""
        raw = self._raw()
        del raw["search"]
        return dataclasses.replace(validate(apply_overrides(raw, params), Path(self.source)), search=self.search)

    def with_model(self, factory: Callable[..., Any], **kwargs: Any) -> StudyConfig:
        """This config with the user's model: ``factory(input_shape, num_classes, **kwargs)`` returns an
        ``nn.Module``. It must be a module's top-level function, which spawned workers import by name;
        ``kwargs`` are its ``[model]`` keys, the rest at the factory's defaults. ``model.*`` entries of
        the search space must be keys of the new family."""
        raw = self._raw()
        raw["model"] = {"family": families.factory_reference(factory), **kwargs}
        return validate(raw, Path(self.source))

    def with_search(self, search: dict[str, Any]) -> StudyConfig:
        """This config with more ``[search]`` entries (as the file writes them), validated like the file."""
        raw = self._raw()
        raw["search"] = {**raw["search"], **search}
        return validate(raw, Path(self.source))

    def _raw(self) -> dict[str, Any]:
        """This config as the parsed study file it came from (validated already)."""
        raw = {k: v for k, v in self.to_dict().items() if k not in ("source", "retrain")}
        raw["retrain"] = self.retrain.keys()  # as the file writes it: [train] keys at its top level
        raw["search"] = {k: v.spec() for k, v in self.search.items()}
        return raw


# --- validation ---------------------------------------------------------------------------


def _build_section(name: str, raw: Any, problems: list[str]) -> Any:
    cls = SECTIONS[name]
    if not isinstance(raw, dict):
        problems.append(f"{name}: must be a table ([{name}]), got {raw!r}")
        return cls()
    fields, train_keys = section_keys(cls), {}
    if cls is RetrainSection:  # [retrain] also sets any other [train] key, for the full split
        del fields["train"]
        train_keys = {k: v for k, v in section_keys(TrainConfig).items() if k not in fields}
    values, train = {}, {}
    for key, value in raw.items():
        into = values if key in fields else train if key in train_keys else None
        if into is None:
            more = ", or any [train] key" if train_keys else ""
            problems.append(f"{name}.{key}: unknown key (known: {', '.join(fields)}{more})")
            continue
        f, hint = fields.get(key) or train_keys[key]
        into[key], problem = check_value(f, hint, f"{name}.{key}", value)
        if problem:
            problems.append(problem)
    return cls(**values, train=train) if cls is RetrainSection else cls(**values)


def _build_search(raw: Any, model_keys: dict[str, Key] | None, problems: list[str]) -> dict[str, Distribution]:
    if not isinstance(raw, dict):
        problems.append(f"search: must be a table of dotted keys, got {raw!r}")
        return {}
    out: dict[str, Distribution] = {}
    for key, spec in raw.items():
        section, _, name = key.partition(".")
        target = section_keys(SECTIONS[section]).get(name) if section in HYPERPARAMETER_SECTIONS else None
        if section == "model":  # the family's keys; any for a factory that takes **kwargs
            target = (dataclasses.field(), _kind(spec)) if model_keys is None else model_keys.get(name)
        if key == "augment":  # augment names: each is checked when a trial uses it
            target = (dataclasses.field(), str)
        if target is None:
            problems.append(f"search.{key}: unknown hyperparameter (use a dotted name such as train.lr)")
            continue
        try:
            out[key] = space.create(f"search.{key}", spec, target[1], functools.partial(check_value, *target))
        except space.SpaceError as e:
            problems.extend(e.problems)
    return out


def _kind(spec: Any) -> Any:
    """The type of an unchecked key (a ``**kwargs`` factory's) that a range draws."""
    ints = isinstance(spec, dict) and all(isinstance(spec.get(b), int) for b in ("low", "high"))
    return int if ints else float if isinstance(spec, dict) else Any


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a TOML value; a bare word stays a string (``augment=recipe``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--param {text!r}: expected KEY=VALUE, for example train.lr=0.001"])
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw study file with dotted keys set (validated later with the rest)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    problems = []
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if key == "augment":
            out["augment"] = value
        elif section == "model" and name or section in SECTIONS and (
                name in section_keys(SECTIONS[section]) or section == "retrain" and name in section_keys(TrainConfig)):
            if isinstance(out.setdefault(section, {}), dict):  # else validate() reports the section
                out[section][name] = value
        else:
            problems.append(f"--param {key}: unknown key (use a dotted name such as train.lr)")
    if problems:
        raise ConfigError(problems)
    return out


def load_pipeline(path: Path):
    """An albumentations pipeline file (.json or .yaml), as albumentations reads it."""
    import albumentations as A  # only when a file is given: the import is slow

    return A.load(str(path), data_format="yaml" if path.suffix in (".yaml", ".yml") else "json")


def check_augment(value: Any, base: Path) -> tuple[str, str | None]:
    """A study file's ``augment`` (a pipeline file's path taken from ``base``), as the config keeps
    it, and the problem with it or None."""
    if not isinstance(value, str):
        return "none", f"augment: must be a string, got {value!r}"
    if value in BUILT_IN_AUGMENTS:
        return value, None
    path = Path(value) if Path(value).is_absolute() else base / value
    if path.suffix not in (".json", ".yaml", ".yml"):
        return "none", (f"augment: must be one of {', '.join(map(repr, BUILT_IN_AUGMENTS))} or an albumentations "
                        f".json/.yaml file, got {value!r}")
    if not path.is_file():
        return "none", f"augment: no albumentations pipeline file at {path}"
    try:
        load_pipeline(path)
    except Exception as e:  # albumentations raises many types for a bad file
        return "none", f"augment: {path} is not an albumentations pipeline: {type(e).__name__}: {e}"
    return str(path.resolve()), None  # absolute: stays valid when re-validated from elsewhere


def validate(raw: dict[str, Any], source: Path) -> StudyConfig:
    """Build a :class:`StudyConfig` from parsed TOML, or raise ConfigError listing every problem."""
    problems: list[str] = []
    unknown = set(raw) - set(SECTIONS) - {"augment", "search"}
    known = ", ".join([*SECTIONS, "augment", "search"])
    problems += [f"{k}: unknown section (known: {known})" for k in sorted(unknown)]
    sections = {name: _build_section(name, raw.get(name, {}), problems) for name in SECTIONS if name != "model"}
    sections["model"], model_keys = families.model_section(raw.get("model", {}), source.parent, problems)
    augment, problem = check_augment(raw.get("augment", "none"), source.parent)
    problems += [problem] if problem else []
    if sections["retrain"].augment:
        again, problem = check_augment(sections["retrain"].augment, source.parent)
        problems += [f"retrain.{problem}"] if problem else []
        sections["retrain"] = dataclasses.replace(sections["retrain"], augment=again)
    search = _build_search(raw.get("search", {}), model_keys, problems)
    data: DataConfig = sections["data"]
    sized = not any(p.startswith(("data.train_size", "data.subset_size")) for p in problems)
    if sized and type(data.subset_size) is type(data.train_size) is int and data.subset_size > data.train_size:
        problems.append(f"data.subset_size: must be <= data.train_size ({data.train_size}), got {data.subset_size}")
    if sections["study"].sampler == "grid":
        problems += [f"search.{k}: the grid sampler needs a list of choices or an integer range, got {d.to_dict()}"
                     for k, d in search.items() if d.grid_points() is None]
    if not sections["study"].name:
        sections["study"] = dataclasses.replace(sections["study"], name=source.stem)
    if problems:
        raise ConfigError(problems)
    return StudyConfig(augment=augment, search=search, source=str(source), **sections)


def load_study(path: str | Path, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Read, override and validate a study file. Raises ConfigError with one line per problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: no such study file; copy one of the repository's studies/*.toml, e.g. "
                           f"studies/recipe-baseline.toml, and try it with `hpo train FILE --data synthetic`"])
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the study file: {e.strerror or e}"]) from None
    raw = apply_overrides(raw, overrides or {})
    cfg = validate(raw, path)
    if folder_name(cfg.study.name) != cfg.study.name:  # it names folders: nothing may land outside --out
        how = "" if raw.get("study", {}).get("name") else " (the study file's name); set [study] name"
        raise ConfigError([f"study.name: must be at most {NAME_MAX} letters, digits, '.', '_' or '-', starting with "
                           f"a letter or digit, got {cfg.study.name!r}{how}"])
    return cfg
