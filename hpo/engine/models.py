"""Step 2 of the recipe: the network, from ``[model]``: a built-in family or the user's factory,
called as ``factory(input_shape, num_classes, **kwargs)``. No Optuna here: the loop takes any
``nn.Module`` that maps a ``[B, *input_shape]`` batch to ``[B, num_classes]`` logits."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from hpo.config.families import import_factory
from hpo.config.schema import BUILT_IN_FAMILIES, CNNKeys, MLPKeys, ModelConfig
from hpo.engine.records import ModelError


def mlp(input_shape: Sequence[int], num_classes: int, **keys: Any) -> nn.Sequential:
    """The recipe's ``build_model``: flatten, ``depth`` x [Linear, BatchNorm?, ReLU, Dropout?], then
    Linear. With the defaults on CIFAR-10 this is exactly the recipe's 3072 -> 100 -> 100 -> 10 MLP."""
    cfg = MLPKeys(**keys)
    width = math.prod(input_shape)
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    for i in range(1, cfg.depth + 1):
        layers.append((f"fc{i}", nn.Linear(width, cfg.hidden)))
        if cfg.batch_norm:
            layers.append((f"bn{i}", nn.BatchNorm1d(cfg.hidden)))
        layers.append((f"relu{i}", nn.ReLU()))
        if cfg.dropout > 0:
            layers.append((f"drop{i}", nn.Dropout(cfg.dropout)))
        width = cfg.hidden
    layers.append(("head", nn.Linear(width, num_classes)))
    model = nn.Sequential(OrderedDict(layers))
    model.register_load_state_dict_pre_hook(_positional_names)
    return model


def _positional_names(module: nn.Sequential, state: dict, prefix: str, *_: Any) -> None:
    """Checkpoints written before the layers had names keyed them by position (``0.weight`` for
    ``fc1.weight``): such a checkpoint still loads, its positions mapped onto the layers' names,
    counted without the Flatten that those MLPs did not have."""
    names = [name for name in module._modules if name != "flatten"]
    for key in [k for k in state if k.startswith(prefix) and k[len(prefix):].partition(".")[0].isdigit()]:
        position, _, rest = key[len(prefix):].partition(".")
        if int(position) < len(names):
            state[f"{prefix}{names[int(position)]}.{rest}"] = state.pop(key)


def _conv_bn(name: str, c_in: int, c_out: int, pool: bool = False) -> list[tuple[str, nn.Module]]:
    """A 3x3 conv (no bias: the BN after it has one), optionally a 2x2 max-pool, BN and GELU."""
    layers = [(f"conv{name}", nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))]
    layers += [(f"pool{name}", nn.MaxPool2d(2))] if pool else []
    return layers + [(f"bn{name}", nn.BatchNorm2d(c_out)), (f"act{name}", nn.GELU())]


def cnn(input_shape: Sequence[int], num_classes: int, **keys: Any) -> nn.Sequential:
    """airbench's network: a conv stem, then ``depth`` groups of two convs, the first pooling by 2
    (its BN after the pool, as airbench has it: a quarter of the work), a global max-pool, a head."""
    cfg = CNNKeys(**keys)
    if len(input_shape) != 3:
        raise ValueError(f"the cnn family takes images [C, H, W], got inputs of shape {list(input_shape)}: "
                         f"use family = \"mlp\" for features")
    channels, *size = input_shape
    if min(size) >> cfg.depth < 1:
        raise ValueError(f"depth {cfg.depth} halves {size[0]}x{size[1]} images below one pixel: use model.depth <= "
                         f"{min(size).bit_length() - 1}")
    layers, width = _conv_bn("0", channels, cfg.stem), cfg.stem
    for i in range(1, cfg.depth + 1):
        group = cfg.width * (cfg.widen if i > 1 else 1)
        layers += _conv_bn(f"{i}a", width, group, pool=True) + _conv_bn(f"{i}b", group, group)
        width = group
    layers += [("pool", nn.AdaptiveMaxPool2d(1)), ("flatten", nn.Flatten()), ("head", nn.Linear(width, num_classes))]
    return nn.Sequential(OrderedDict(layers))


def has_convs(model: nn.Module) -> bool:
    """Whether ``model`` has 2-d convolutions, which run faster channels_last (hpo.engine.loop)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


BN_MOMENTUM, BN_EPS = 0.1, 1e-5  # nn.BatchNorm1d's defaults, which the population engine computes
STACKABLE = (nn.Flatten, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout)  # what Population.forward computes


def stackable(model: nn.Module) -> None:
    """Raise ModelError unless ``model`` is an ``nn.Sequential`` of the layers a population computes,
    each as torch's defaults make it: anything else would be passed over, and train another network."""
    layers = list(model.children()) if isinstance(model, nn.Sequential) else [model]
    odd = [type(m).__name__ for m in layers if type(m) not in STACKABLE]
    plain_bn = (BN_MOMENTUM, BN_EPS, True, True)
    odd += [f"BatchNorm1d(momentum={m.momentum}, eps={m.eps}, ...)" for m in layers if isinstance(m, nn.BatchNorm1d)
            and (m.momentum, m.eps, m.affine, m.track_running_stats) != plain_bn]
    odd += ["Linear(bias=False)" for m in layers if isinstance(m, nn.Linear) and m.bias is None]
    if odd:
        raise ModelError(f"a population stacks only an nn.Sequential of {', '.join(t.__name__ for t in STACKABLE)} "
                         f"layers; this model has {', '.join(dict.fromkeys(odd))}: use --population 1")


BUILDERS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn}
assert BUILDERS.keys() == BUILT_IN_FAMILIES.keys(), "each built-in family needs a builder and a dataclass"


def build_model(cfg: ModelConfig, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10) -> nn.Module:
    """The network ``cfg`` names for inputs of ``input_shape`` (``[C, H, W]``, or ``[D]`` for features).
    Raises ModelError, in one line, when the factory raises or returns something that is not a module."""
    if num_classes < 2 or not input_shape or min(input_shape) < 1:
        raise ValueError(f"need an input shape of sizes >= 1 and num_classes >= 2, got {tuple(input_shape)} "
                         f"and {num_classes}")
    factory = BUILDERS.get(cfg.family) or import_factory(cfg.family)
    try:
        model = factory(tuple(input_shape), num_classes, **cfg.kwargs)
    except Exception as e:  # the user's code may raise anything
        raise ModelError(f"model {cfg.family}: building it raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {cfg.family}: the factory must return an nn.Module, got {type(model).__name__}")
    return model
