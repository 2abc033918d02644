"""The study file's sections: one frozen dataclass each, a comment on every default. The bounds
each field takes (``metadata``) are checked by :mod:`hpo.config.study_file`, once, at load."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

# What `augment` may name besides an albumentations file: hpo.engine.augment batches each on the device.
BUILT_IN_AUGMENTS = ("none", "recipe", "flip-shift")


class ConfigError(ValueError):
    """A study file (or an override of it) is invalid; ``problems`` holds one line per issue."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _rng(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    return {"lo": lo, "hi": hi, "lo_open": lo_open}


SIZE = {"size": True}  # a split size: a count >= 1, or a fraction in (0, 1)


@dataclass(frozen=True)
class StudySection:
    """``[study]``: how the search runs (used by ``hpo run``)."""

    name: str = ""  # empty: the study file's stem
    sampler: Literal["random", "grid", "tpe"] = "random"  # the recipe's random search
    seed: int = 0  # sampler seed, so a study can be replayed
    n_trials: int = field(default=20, metadata=_rng(1))  # finished trials the study ends with
    # Comparative pruning on top of early stopping (train.patience), which always applies.
    pruner: Literal["none", "median", "successive_halving", "hyperband"] = "none"
    # Trials a worker trains together as one population (hpo.workers.members); --population overrides it.
    # 0: automatic, 1 until a population is measured beating solo trials on a GPU (hpo.workers.members.AUTO_ON_CUDA).
    population: int = field(default=0, metadata=_rng(0, 4096))


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: where the images come from and how they are split (stratified, seeded)."""

    path: str = "cifar10"  # "cifar10" (torchvision download), "synthetic", or a local folder
    train_on: Literal["subset", "full"] = "subset"  # the recipe experiments on a 5k subset
    # Each a count of samples, or a fraction (a float in (0, 1)) of the training samples (subset: of the train split).
    train_size: int | float = field(default=40_000, metadata=SIZE)  # recipe: 40,000 train
    val_size: int | float = field(default=10_000, metadata=SIZE)  # recipe: 10,000 val
    subset_size: int | float = field(default=5_000, metadata=SIZE)  # drawn from the train split
    seed: int = 0  # shuffles before splitting: the JPEG copy is grouped by class


@dataclass(frozen=True)
class MLPKeys:
    """``[model]`` of ``family = "mlp"``: the recipe's MLP, input -> hidden x depth -> classes."""

    # Bounded so that a typo (1e12) is a bad value, not an allocation failure mid-study.
    hidden: int = field(default=100, metadata=_rng(1, 65_536))  # recipe: H = 100
    depth: int = field(default=2, metadata=_rng(1, 64))  # hidden layers; recipe: 2
    batch_norm: bool = False  # the recipe adds it when regularizing
    dropout: float = field(default=0.0, metadata=_rng(0.0, 0.95))  # after each ReLU


@dataclass(frozen=True)
class CNNKeys:
    """``[model]`` of ``family = "cnn"``: airbench's shape. A 3x3 conv stem, then ``depth`` groups of
    (conv, max-pool, BN, GELU, conv, BN, GELU), each halving the resolution; a global max-pool and a linear head."""

    width: int = field(default=64, metadata=_rng(1, 4096))  # channels of the first group; airbench94: 64
    widen: int = field(default=2, metadata=_rng(1, 16))  # the later groups are width * widen wide; airbench94: 4
    depth: int = field(default=3, metadata=_rng(1, 16))  # groups; 3 takes 32x32 images to 4x4
    stem: int = field(default=32, metadata=_rng(1, 4096))  # channels of the stem conv; airbench94: 24


# The families hpo builds itself (hpo.engine.models), each with the dataclass of its [model] keys.
BUILT_IN_FAMILIES: dict[str, type] = {"mlp": MLPKeys, "cnn": CNNKeys}


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: which network (``family``) and its keyword arguments, every one filled in."""

    # "mlp" (the recipe's), another built-in family, or a user's "package.module:factory" (hpo.config.families).
    family: str = "mlp"
    kwargs: dict[str, Any] = field(default_factory=lambda: dataclasses.asdict(MLPKeys()))

    @classmethod
    def mlp(cls, **keys: Any) -> ModelConfig:
        """The recipe's MLP with these keys, the others at their defaults."""
        return cls("mlp", dataclasses.asdict(MLPKeys(**keys)))

    def keys(self) -> dict[str, Any]:
        """``[model]`` as a study file writes it. The default family goes unwritten, so a study stored
        before families keeps its identity (hpo.study.identity)."""
        return {**({} if self.family == "mlp" else {"family": self.family}), **self.kwargs}

    @classmethod
    def from_keys(cls, keys: dict[str, Any]) -> ModelConfig:
        """The inverse of :meth:`keys`, for a config that was validated when it was written."""
        keys = dict(keys)
        return cls(keys.pop("family", "mlp"), keys)


@dataclass(frozen=True)
class TrainConfig:
    """``[train]``: the recipe's ``fit``."""

    optimizer: Literal["adam", "adamw", "sgd"] = "adam"  # recipe: Adam; AdamW decouples weight decay
    lr: float = field(default=1e-3, metadata=_rng(0.0, 10.0))  # recipe: 1e-3
    momentum: float = field(default=0.9, metadata=_rng(0.0, 1.0))  # SGD only
    nesterov: bool = False  # SGD with momentum only; airbench trains with it
    weight_decay: float = field(default=0.0, metadata=_rng(0.0, 1.0))  # the recipe pairs it with SGD
    batch_size: int = field(default=32, metadata=_rng(1))  # recipe: 32
    label_smoothing: float = field(default=0.0, metadata=_rng(0.0, 0.5))  # of the train loss; val loss stays plain
    epochs: int = field(default=10, metadata=_rng(1))  # recipe: 10 on the subset
    patience: int = field(default=0, metadata=_rng(0))  # early stopping; 0 turns it off
    step_size: int = field(default=0, metadata=_rng(0))  # StepLR period in epochs; 0 turns it off
    gamma: float = field(default=0.1, metadata=_rng(0.0, 1.0, lo_open=True))  # StepLR factor
    # The lr over a run: "step" is StepLR (step_size, gamma; step_size 0 keeps lr constant), the recipe's.
    # "one-cycle" rises linearly over the first `warmup` of the run's batches, then falls linearly to 0;
    # "linear" falls linearly from lr to 0. Both move every batch and are sized by epochs, not by patience.
    schedule: Literal["step", "one-cycle", "linear"] = "step"
    warmup: float = field(default=0.2, metadata=_rng(0.0, 1.0))  # one-cycle only: the share of batches rising
    # "bf16": the forward and backward passes under torch.autocast(bfloat16), weights and optimizer in fp32;
    # conv nets run channels_last in any precision. "auto": bf16 where the hardware computes it natively (a
    # CUDA GPU with bf16, a CPU with AVX-512 BF16 or AMX; emulated it is 10x slower), else fp32. fp32 by
    # default, the recipe's (docs/study-files.md, Precision).
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    seed: int = 0  # model init, shuffling and augmentation


@dataclass(frozen=True)
class RetrainSection:
    """``[retrain]``: the budget of the recipe's last step (``hpo retrain``). It replaces the best trial's
    epochs, patience and StepLR, sized for the subset: the best setting was often still improving.
    Any other ``[train]`` key may be set here too, for the full split alone (``label_smoothing = 0.1``)."""

    epochs: int = field(default=100, metadata=_rng(1))  # recipe: 100
    patience: int = field(default=10, metadata=_rng(0))  # recipe: early_stopping=10; 0 turns it off
    step_size: int = field(default=20, metadata=_rng(0))  # recipe: StepLR(optimizer, 20, 0.1); 0 turns it off
    gamma: float = field(default=0.1, metadata=_rng(0.0, 1.0, lo_open=True))  # StepLR factor
    top: int = field(default=1, metadata=_rng(1))  # the K best trials retrained; the best on the full val is final
    # The recipe regularizes after its search: "" keeps each trial's augmentation, else this one (as `augment`).
    augment: str = ""
    train: dict[str, Any] = field(default_factory=dict)  # the other [train] keys it sets, validated as [train]'s

    def overrides(self) -> dict[str, Any]:
        """The ``[train]`` keys that replace each retrained trial's own."""
        return {"epochs": self.epochs, "patience": self.patience, "step_size": self.step_size, "gamma": self.gamma,
                **self.train}

    def keys(self) -> dict[str, Any]:
        """Every key as a study file writes it."""
        return {**self.overrides(), "top": self.top, "augment": self.augment}


SECTIONS: dict[str, type] = {"study": StudySection, "data": DataConfig, "model": ModelConfig, "train": TrainConfig,
                             "retrain": RetrainSection}
HYPERPARAMETER_SECTIONS = ("data", "model", "train")  # what [search] may name
