"""Step 2 of the recipe: the network. An MLP built from a typed config; no Optuna here."""

from __future__ import annotations

from torch import nn

from hpo.config.schema import ModelConfig


def build_model(cfg: ModelConfig, in_features: int = 32 * 32 * 3, num_classes: int = 10) -> nn.Sequential:
    """The recipe's ``build_model``: ``depth`` x [Linear, BatchNorm?, ReLU, Dropout?], then Linear.

    With the defaults this is exactly the recipe's 3072 -> 100 -> 100 -> 10 ReLU MLP.
    """
    if in_features < 1 or num_classes < 2:
        raise ValueError(f"need in_features >= 1 and num_classes >= 2, got {in_features} and {num_classes}")
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(cfg.depth):
        layers.append(nn.Linear(width, cfg.hidden))
        if cfg.batch_norm:
            layers.append(nn.BatchNorm1d(cfg.hidden))
        layers.append(nn.ReLU())
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
        width = cfg.hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
