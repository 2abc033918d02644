"""Model families: what ``[model] family`` names and which keys each takes.

A built-in family (``mlp``, ...) takes the fields of its dataclass in :data:`BUILT_IN_FAMILIES`. A
user's family is a reference ``"package.module:factory"`` to a function called as
``factory(input_shape, num_classes, **kwargs)`` that returns an ``nn.Module``; its keyword arguments
are its ``[model]`` keys, typed by their annotations or defaults. A reference is imported as Python
would from the current directory or the study file's folder, so a spawned or remote worker finds the
same function by name.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpo.config.schema import BUILT_IN_FAMILIES, ConfigError, ModelConfig
from hpo.config.values import Key, check_value, section_keys

REQUIRED = object()  # the default of a factory's keyword argument that has none


def is_reference(family: str) -> bool:
    return ":" in family


def import_factory(ref: str, base: Path | None = None, key: str = "model.family") -> Callable[..., Any]:
    """The function ``"package.module:function"`` names (for the study file's ``key``). Raises
    ConfigError in one line."""
    module_name, _, qualname = ref.partition(":")
    if not module_name or not qualname:
        raise ConfigError([f"{key}: expected 'package.module:function', got {ref!r}"])
    try:
        module = _import(module_name, base)
    except Exception as e:  # the user's module may raise anything while it loads
        raise ConfigError([f"{key}: cannot import {module_name!r} ({type(e).__name__}: {e}); it is looked "
                           "up from the current directory and the study file's folder"]) from None
    target: Any = module
    for part in qualname.split("."):
        target = getattr(target, part, None)
    if not callable(target):
        raise ConfigError([f"{key}: {module_name!r} has no function {qualname!r}"])
    return target


def _import(name: str, base: Path | None) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name.partition(".")[0]:  # the module itself failed to import something
            raise
    for folder in (Path.cwd(), base):  # as `python script.py` would find it, next to the script
        if folder is not None and str(folder.resolve()) not in sys.path:
            sys.path.append(str(folder.resolve()))
    return importlib.import_module(name)


def factory_keys(fn: Callable[..., Any]) -> dict[str, Key] | None:
    """A factory's ``[model]`` keys: its parameters after ``input_shape, num_classes``, each with its
    default (or REQUIRED) and type. None when it also takes ``**kwargs``: any key goes."""
    ref = getattr(fn, "__qualname__", repr(fn))
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        raise ConfigError([f"model.family: cannot read the signature of {ref}"]) from None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in params):
        raise ConfigError([f"model.family: {ref} must take (input_shape, num_classes, **kwargs), "
                           f"got ({', '.join(p.name for p in params)})"])
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # annotations that do not evaluate: fall back to the defaults' types
        hints = {}
    keys: dict[str, Key] = {}
    for p in params[2:] if len(positional) >= 2 else []:
        if p.kind == p.VAR_KEYWORD:
            return None
        if p.kind == p.VAR_POSITIONAL:
            continue
        default = REQUIRED if p.default is p.empty else p.default
        hint = hints.get(p.name, type(default) if type(default) in (bool, int, float, str) else Any)
        keys[p.name] = (dataclasses.field(default=default), hint)
    return keys


def family_keys(family: str, base: Path | None = None) -> dict[str, Key] | None:
    """The ``[model]`` keys ``family`` takes (None: any). Raises ConfigError for an unknown family."""
    if family in BUILT_IN_FAMILIES:
        return section_keys(BUILT_IN_FAMILIES[family])
    if not is_reference(family):
        raise ConfigError([f"model.family: must be one of {', '.join(map(repr, BUILT_IN_FAMILIES))} or "
                           f"'package.module:factory', got {family!r}"])
    return factory_keys(import_factory(family, base))


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else REQUIRED


def factory_reference(fn: Callable[..., Any]) -> str:
    """``"module:qualname"`` for a function another process can import; ConfigError for one it cannot."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or not qualname or "<" in qualname:
        raise ConfigError([f"with_model: {qualname or fn!r} is a lambda or a function defined inside another; "
                           "define the factory at the top level of a module, so that workers can import it"])
    if module == "__main__":  # a script: workers import it by its file's name (its body under `if __name__`)
        main = sys.modules["__main__"]
        spec = getattr(main, "__spec__", None)
        module = spec.name if spec is not None else Path(getattr(main, "__file__", "__main__")).stem
    return f"{module}:{qualname}"


def model_section(raw: Any, base: Path, problems: list[str]) -> tuple[ModelConfig, dict[str, Key] | None]:
    """``[model]``: its family, and every key the family takes (the defaults filled in), checked
    against the family's dataclass or the user's factory's signature. Also the keys themselves."""
    if not isinstance(raw, dict):
        problems.append(f"model: must be a table ([model]), got {raw!r}")
        return ModelConfig(), {}
    values, family = dict(raw), raw.get("family", "mlp")
    values.pop("family", None)
    try:
        if not isinstance(family, str):
            raise ConfigError([f"model.family: must be a string, got {family!r}"])
        keys = family_keys(family, base)
    except ConfigError as e:
        problems.extend(e.problems)
        return ModelConfig(), {}
    for key, value in values.items():
        if keys is not None and key not in keys:
            known = ", ".join(keys) or "none"
            problems.append(f"model.{key}: unknown key for family {family!r} (known: {known})")
        elif keys is not None:
            values[key], problem = check_value(*keys[key], f"model.{key}", value)
            problems += [problem] if problem else []
    for key, (f, _) in (keys or {}).items():
        if key not in values:
            values[key] = default_of(f)
            if values[key] is REQUIRED:
                problems.append(f"model.{key}: {family} takes it without a default; set it in [model]")
    return ModelConfig(family, {k: v for k, v in values.items() if keys is None or k in keys}), keys
