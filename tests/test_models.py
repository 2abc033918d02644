import pytest
import torch
from torch import nn

from hpo.config.schema import ModelConfig
from hpo.engine.models import build_model
from hpo.engine.records import ModelError


def test_default_is_the_recipe_mlp():
    model = build_model(ModelConfig())
    assert [type(m) for m in model] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert sum(p.numel() for p in model.parameters()) == 3072 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    assert model(torch.randn(64, 3, 32, 32)).shape == (64, 10)  # it flattens the images itself


def test_batch_norm_dropout_width_and_depth():
    model = build_model(ModelConfig.mlp(hidden=32, depth=3, batch_norm=True, dropout=0.2), (12,), num_classes=4)
    kinds = [type(m) for m in model]
    assert kinds.count(nn.BatchNorm1d) == 3 and kinds.count(nn.Dropout) == 3 and kinds.count(nn.Linear) == 4
    assert model.fc1.in_features == 12 and model.head.out_features == 4 and model.head.in_features == 32


def test_any_channels_and_resolution():
    model = build_model(ModelConfig(), (1, 64, 64), 3)
    assert model.fc1.in_features == 64 * 64 and model(torch.zeros(2, 1, 64, 64)).shape == (2, 3)


def test_layer_names_do_not_depend_on_position_and_old_checkpoints_load():
    """Before the layers had names, a checkpoint keyed them by position (no Flatten, dropout counted)."""
    cfg = ModelConfig.mlp(batch_norm=True, dropout=0.3)
    assert list(build_model(cfg).state_dict())[:3] == ["fc1.weight", "fc1.bias", "bn1.weight"]
    torch.manual_seed(0)
    old = nn.Sequential(nn.Linear(3072, 100), nn.BatchNorm1d(100), nn.ReLU(), nn.Dropout(0.3),
                        nn.Linear(100, 100), nn.BatchNorm1d(100), nn.ReLU(), nn.Dropout(0.3), nn.Linear(100, 10))
    model = build_model(cfg)
    model.load_state_dict(old.state_dict())  # strict
    x = torch.rand(8, 3, 32, 32)
    assert torch.equal(model.eval()(x), old.eval()(x.flatten(1)))
    with pytest.raises(RuntimeError, match="size mismatch"):  # another shape is still refused
        build_model(ModelConfig.mlp(hidden=50)).load_state_dict(old.state_dict())


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="num_classes >= 2"):
        build_model(ModelConfig(), num_classes=1)


def test_a_broken_factory_is_one_line():
    with pytest.raises(ModelError, match=r"^model factories:raises: building it raised RuntimeError: no such"):
        build_model(ModelConfig("factories:raises", {"width": 8}))
    with pytest.raises(ModelError, match="must return an nn.Module, got str"):
        build_model(ModelConfig("factories:returns_a_string", {}))


def test_the_cnn_family_is_airbench_s_shape_for_any_image_size():
    model = build_model(ModelConfig("cnn", {"width": 8, "widen": 2, "depth": 3, "stem": 4}), (1, 8, 8), 5)
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [4, 8, 8, 16, 16, 16, 16] and model.head.in_features == 16
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 5)


def test_the_cnn_family_refuses_features_and_a_depth_the_images_cannot_take():
    with pytest.raises(ModelError, match=r"depth 4 halves 8x8 images below one pixel: use model.depth <= 3$"):
        build_model(ModelConfig("cnn", {"width": 8, "widen": 2, "depth": 4, "stem": 4}), (3, 8, 8))
    with pytest.raises(ModelError, match=r"takes images \[C, H, W\], got inputs of shape \[20\]"):
        build_model(ModelConfig("cnn", {"width": 8, "widen": 2, "depth": 1, "stem": 4}), (20,))
