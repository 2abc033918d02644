import pytest
import torch
from torch import nn

from hpo.config.schema import ModelConfig
from hpo.engine.models import build_model


def test_default_is_the_recipe_mlp():
    model = build_model(ModelConfig())
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert sum(p.numel() for p in model.parameters()) == 3072 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    assert model(torch.randn(64, 3072)).shape == (64, 10)


def test_batch_norm_dropout_width_and_depth():
    model = build_model(ModelConfig(hidden=32, depth=3, batch_norm=True, dropout=0.2), in_features=12, num_classes=4)
    kinds = [type(m) for m in model]
    assert kinds.count(nn.BatchNorm1d) == 3 and kinds.count(nn.Dropout) == 3 and kinds.count(nn.Linear) == 4
    assert model[0].in_features == 12 and model[-1].out_features == 4 and model[-1].in_features == 32


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="num_classes >= 2"):
        build_model(ModelConfig(), num_classes=1)
