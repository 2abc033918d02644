"""The search space: how each searched key varies. One small class per kind, a base class for what
they share, one factory that reads a ``[search]`` entry (the shape of timm's ``scheduler/``).

A distribution knows its Optuna counterpart (``to_optuna``), how a queued slot draws from it
(``draw``, from the slot's own seeded generator), how a running trial asks for it (``suggest``, for
TPE) and its points on a grid (``grid_points``). Nothing outside this module looks at which kind
a distribution is.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # Optuna is imported where a distribution meets a trial: the engine reads configs without it
    import optuna
    from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

# How the study file checks one value of a key: (where, value) -> (the value coerced to the key's
# type, a problem or None). Searched values are checked exactly like the key's own value.
Check = Callable[[str, Any], tuple[Any, "str | None"]]


class SpaceError(ValueError):
    """A ``[search]`` entry is invalid; ``problems`` holds one line per issue."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class Distribution(ABC):
    """One searched key's values."""

    @classmethod
    @abstractmethod
    def validate(cls, where: str, spec: Any, kind: Any, check: Check) -> Distribution:
        """The distribution a ``[search]`` entry describes, for a key of type ``kind``; raises
        SpaceError listing every problem."""

    @abstractmethod
    def to_optuna(self) -> BaseDistribution:
        """The Optuna distribution, as stored with each trial."""

    @abstractmethod
    def draw(self, rng: np.random.Generator) -> Any:
        """A value for a queued slot, from the slot's own generator."""

    @abstractmethod
    def suggest(self, trial: optuna.trial.Trial, key: str) -> Any:
        """The trial's value: a queued slot's stored draw, or the sampler's choice now (TPE)."""

    @abstractmethod
    def grid_points(self) -> tuple[Any, ...] | None:
        """Every value, in order, for the grid sampler; None when there are infinitely many."""

    @abstractmethod
    def largest(self) -> Any:
        """The largest value it may take (a batch size bounds a population's memory)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as the study stores it (the config hash is taken over it: keep it stable)."""
        return dataclasses.asdict(self)

    def spec(self) -> Any:
        """As a study file's ``[search]`` writes it: a list of choices or a ``{low, high}`` table."""
        d = self.to_dict()
        return list(d["choices"]) if "choices" in d else d


@dataclass(frozen=True)
class Categorical(Distribution):
    """A key that takes one of ``choices``: ``"train.lr" = [0.01, 0.001]``."""

    choices: tuple[Any, ...]

    @classmethod
    def validate(cls, where: str, spec: Any, kind: Any, check: Check) -> Categorical:
        if not spec:
            raise SpaceError([f"{where}: the list of choices is empty"])
        checked = [check(where, value) for value in spec]
        problems = [problem for _, problem in checked if problem]
        if problems:
            raise SpaceError(problems)
        return cls(tuple(value for value, _ in checked))

    def to_optuna(self) -> CategoricalDistribution:
        from optuna.distributions import CategoricalDistribution

        return CategoricalDistribution(self.choices)

    def draw(self, rng: np.random.Generator) -> Any:
        return self.choices[rng.integers(len(self.choices))]

    def suggest(self, trial: optuna.trial.Trial, key: str) -> Any:
        return trial.suggest_categorical(key, self.choices)

    def grid_points(self) -> tuple[Any, ...]:
        return self.choices

    def largest(self) -> Any:
        return max(self.choices)


@dataclass(frozen=True)
class Range(Distribution):
    """A numeric key drawn from ``[low, high]``: ``{low = 1e-4, high = 1e-1, log = true}``. An integer
    key's range holds ints (validation keeps each key's own type), and draws ints."""

    low: float
    high: float
    log: bool = False
    step: float | None = None

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int)

    @classmethod
    def validate(cls, where: str, spec: Any, kind: Any, check: Check) -> Range:
        if set(spec) - {"low", "high", "log", "step"} or "low" not in spec or "high" not in spec:
            raise SpaceError([f"{where}: a range is {{low, high, log?, step?}}, got {spec!r}"])
        if kind not in (int, float):
            raise SpaceError([f"{where}: a range needs a numeric key, {where.removeprefix('search.')} is {kind}"])
        (low, p1), (high, p2) = check(f"{where}.low", spec["low"]), check(f"{where}.high", spec["high"])
        log, step = spec.get("log", False), spec.get("step")
        bad = [p for p in (p1, p2) if p]
        if not bad and low >= high:
            bad.append(f"{where}: low must be below high, got {low!r} >= {high!r}")
        if not isinstance(log, bool):
            bad.append(f"{where}.log: must be true or false, got {log!r}")
        elif log and not bad and low <= 0:
            bad.append(f"{where}: a log range needs low > 0, got {low!r}")
        if step is not None and (isinstance(step, bool) or not isinstance(step, kind if kind is int else (int, float))
                                 or step <= 0):
            bad.append(f"{where}.step: must be a positive {'integer' if kind is int else 'number'}, got {step!r}")
        elif step is not None and log:
            bad.append(f"{where}: step and log cannot be combined")
        if bad:
            raise SpaceError(bad)
        return cls(low, high, log, step)

    def to_optuna(self) -> IntDistribution | FloatDistribution:
        from optuna.distributions import FloatDistribution, IntDistribution

        if self.integer:
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def draw(self, rng: np.random.Generator) -> float | int:
        if self.step:
            value = self.low + self.step * rng.integers(int((self.high - self.low) // self.step) + 1)
        elif self.log:
            value = float(np.exp(rng.uniform(np.log(self.low), np.log(self.high))))
        else:
            value = float(rng.uniform(self.low, self.high))
        # Within Optuna's bounds (it moves a step range's high onto the grid): float arithmetic can
        # land an ulp outside them (0.004 + 5 * 0.01 > 0.054), and add_trial refuses such a value.
        dist = self.to_optuna()
        value = min(max(value, dist.low), dist.high)
        return int(round(value)) if self.integer else float(value)

    def suggest(self, trial: optuna.trial.Trial, key: str) -> float | int:
        dist = self.to_optuna()
        if self.integer:
            return trial.suggest_int(key, dist.low, dist.high, log=dist.log, step=dist.step)
        return trial.suggest_float(key, dist.low, dist.high, log=dist.log, step=dist.step)

    def grid_points(self) -> tuple[int, ...] | None:
        if not self.integer:
            return None  # float steps do not land exactly on values that Optuna would accept
        dist = self.to_optuna()
        return tuple(range(dist.low, dist.high + 1, dist.step))

    def largest(self) -> float | int:
        return self.high


KINDS: dict[type, type[Distribution]] = {list: Categorical, dict: Range}  # the TOML shape -> the class


def create(where: str, spec: Any, kind: Any, check: Check) -> Distribution:
    """The distribution of one ``[search]`` entry: a list of choices or a ``{low, high}`` table, for
    a key of type ``kind`` whose values ``check`` validates. Raises SpaceError."""
    cls = KINDS.get(type(spec))
    if cls is None:
        raise SpaceError([f"{where}: must be a list of choices or a {{low, high}} table, got {spec!r}"])
    return cls.validate(where, spec, kind, check)


def from_dict(d: dict[str, Any]) -> Distribution:
    """The inverse of :meth:`Distribution.to_dict`, for a config a study stored (validated then)."""
    return Categorical(tuple(d["choices"])) if "choices" in d else Range(**d)
