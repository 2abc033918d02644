"""Model factories as a user writes them (``factory(input_shape, num_classes, **kwargs)``), some
broken on purpose. Study files name them as ``factories:NAME``: pytest puts tests/ on sys.path, and
spawned workers inherit it."""

from __future__ import annotations

from torch import nn


def tiny_cnn(input_shape: tuple[int, ...], num_classes: int, width: int = 8, pool: bool = True) -> nn.Module:
    """A user's own network: a conv, a pool, a linear head."""
    channels, height, w = input_shape
    out = (height // 2) * (w // 2) if pool else height * w
    return nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2) if pool else nn.Identity(), nn.Flatten(), nn.Linear(width * out, num_classes))


def linear_stack(input_shape, num_classes, hidden=16):
    """Unannotated: the keys' types come from the defaults. Only layers a population stacks."""
    width = 1
    for n in input_shape:
        width *= n
    return nn.Sequential(nn.Flatten(), nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(0.1),
                         nn.Linear(hidden, num_classes))


def needs_depth(input_shape, num_classes, depth: int):
    return linear_stack(input_shape, num_classes)


def raises(input_shape, num_classes, width: int = 8):
    raise RuntimeError("no such layer")


def returns_a_string(input_shape, num_classes):
    return "not a module"


def wrong_output(input_shape, num_classes):
    """Logits for one class too many: the gate's output_shape check fails."""
    return linear_stack(input_shape, num_classes + 1)


def no_arguments():
    return nn.Identity()
