import dataclasses

import pytest
import torch
from conftest import DEVICES, ON_CUDA

from hpo.config.schema import DataConfig, ModelConfig, TrainConfig
from hpo.engine.augment import make_augment
from hpo.engine.checkpoints import Checkpoints, load_checkpoint
from hpo.engine.data import normalize, resolve_device, training_splits
from hpo.engine.loop import fit
from hpo.engine.models import build_model
from hpo.engine.optim import make_optimizer
from hpo.engine.records import Stop, TrainingDiverged
from hpo.engine.sources import synthetic

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=DEVICES)
def splits(request):
    """Every test here runs on the CPU, and again on CUDA where there is one."""
    return training_splits(synthetic(), DataConfig(train_size=600, val_size=200, subset_size=300),
                           torch.device(request.param))


def run(splits, folder=None, augment="none", model=None, graphs=True, on_epoch=None, save_every=0.0, **train):
    """``fit`` from seed 0; with ``folder``, under the checkpoint policy of hpo.engine.runs in that folder."""
    torch.manual_seed(0)
    net = build_model(model or ModelConfig()).to(splits.train.x.device)
    checkpoints = Checkpoints(folder, save_every) if folder else None
    result = fit(net, splits, TrainConfig(**{"epochs": 4, **train}), make_augment(augment), on_epoch, checkpoints,
                 cuda_graphs=graphs)
    return net, result


def test_fit_learns_and_reports_the_recipe_metrics(splits, tmp_path):
    _, result = run(splits, epochs=6)
    assert result.best_val_acc > 0.9  # synthetic classes are easy
    assert result.epochs_run == 6 and result.stop == Stop.COMPLETED
    first, last = result.history[0], result.history[-1]
    assert last.loss < first.loss and 0 <= last.acc <= 1 and last.seconds > 0
    assert last.lr == pytest.approx(1e-3, rel=1e-6)  # a float32 tensor on CUDA
    assert result.best_val_acc == max(s.val_acc for s in result.history)
    assert result.train_samples_per_s > 0 and result.seconds >= sum(s.seconds for s in result.history) * 0.99


def test_metrics_are_exact_means_over_samples(splits, tmp_path):
    net, result = run(splits, epochs=1, lr=0.0)  # lr 0: the weights stay as evaluated
    train, val = splits
    with torch.no_grad():
        logits = net.eval()(val.x.reshape(len(val), -1).float() / 255)
    assert result.history[0].val_acc == pytest.approx((logits.argmax(1) == val.y).float().mean().item())
    assert result.history[0].val_loss == pytest.approx(torch.nn.functional.cross_entropy(logits, val.y).item(), 1e-5)


def test_same_seed_same_run(splits):
    a = run(splits, augment="recipe", model=ModelConfig.mlp(batch_norm=True))[1]
    b = run(splits, augment="recipe", model=ModelConfig.mlp(batch_norm=True))[1]
    strip = lambda r: [dataclasses.replace(s, seconds=0) for s in r.history]  # noqa: E731
    assert strip(a) == strip(b)
    c = run(splits, augment="recipe", model=ModelConfig.mlp(batch_norm=True), seed=1)[1]
    assert strip(a) != strip(c)


def test_early_stopping_follows_the_recipe(splits):
    # lr 0: val accuracy never improves after epoch 1, so the run stops `patience` epochs later.
    _, result = run(splits, lr=0.0, epochs=50, patience=3)
    assert (result.best_epoch, result.epochs_run, result.stop) == (1, 4, Stop.EARLY_STOPPING)


def test_step_lr(splits):
    _, result = run(splits, epochs=5, step_size=2, gamma=0.1)
    assert [s.lr for s in result.history] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5], rel=1e-6)


@pytest.mark.parametrize("files", [False, True])
def test_the_best_epoch_is_what_the_model_ends_with(splits, tmp_path, files):
    """In memory without a checkpoint policy (the gate's checks), and as best.pt with one."""
    net, result = run(splits, tmp_path if files else None, epochs=5, optimizer="sgd", lr=0.5)
    assert result.best_epoch < result.epochs_run  # lr 0.5 overshoots: the last epoch is not the best
    best = run(splits, epochs=result.best_epoch, optimizer="sgd", lr=0.5)[0]  # the same run, cut at its best epoch
    assert all(torch.equal(best.state_dict()[k], v) for k, v in net.state_dict().items())
    if files:
        state = load_checkpoint(tmp_path / "best.pt", splits.train.x.device)  # weights_only=True inside
        assert state["epoch"] == result.best_epoch and state["val_acc"] == result.best_val_acc
        assert all(torch.equal(state["model"][k], v) for k, v in net.state_dict().items())
        assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temporary file left
    else:
        assert list(tmp_path.iterdir()) == []


def test_a_resumed_run_is_the_run_that_was_never_stopped(splits, tmp_path):
    """Killed after epoch 3 and resumed from last.pt, a run ends exactly as an unbroken one."""
    cfg = dict(model=ModelConfig.mlp(batch_norm=True), augment="recipe", step_size=2, gamma=0.5)

    def go(folder, epochs):
        return run(splits, folder, cfg["augment"], cfg["model"], epochs=epochs, step_size=cfg["step_size"],
                   gamma=cfg["gamma"])[1]

    whole = go(tmp_path / "whole", 6)
    go(tmp_path / "broken", 3)
    resumed = go(tmp_path / "broken", 6)
    strip = lambda r: [dataclasses.replace(s, seconds=0) for s in r.history]  # noqa: E731
    assert resumed.resumed_from_epoch == 3 and whole.resumed_from_epoch == 0
    assert strip(resumed) == strip(whole)
    assert (resumed.best_epoch, resumed.best_val_acc) == (whole.best_epoch, whole.best_val_acc)


@pytest.mark.parametrize("save_every, on_disk_at_epoch_3", [(0.0, 2), (1e9, None)])
def test_checkpoints_are_written_every_save_every_seconds_and_at_the_end(splits, tmp_path, save_every,
                                                                         on_disk_at_epoch_3):
    seen = {}

    def on_epoch(stats):  # runs before the epoch's own files are written
        if stats.epoch == 3:
            last = tmp_path / "last.pt"
            seen["last"] = len(load_checkpoint(last)["history"]) if last.is_file() else None
            seen["best"] = (tmp_path / "best.pt").is_file()

    result = run(splits, tmp_path, on_epoch=on_epoch, save_every=save_every, epochs=5)[1]
    assert seen == {"last": on_disk_at_epoch_3, "best": on_disk_at_epoch_3 is not None}
    assert len(load_checkpoint(tmp_path / "last.pt")["history"]) == 5  # the end is always written
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == result.best_epoch


def test_a_run_killed_after_it_stopped_early_stays_stopped(splits, tmp_path):
    stopped = run(splits, tmp_path, lr=0.0, epochs=50, patience=3)[1]
    again = run(splits, tmp_path, lr=0.0, epochs=50, patience=3)[1]
    assert stopped.epochs_run == again.epochs_run == 4 and again.stop == Stop.EARLY_STOPPING


def test_on_epoch_can_stop_the_run(splits):
    seen = []
    result = run(splits, on_epoch=lambda s: seen.append(s.epoch) or s.epoch == 2, epochs=10)[1]
    assert seen == [1, 2] and result.stop == Stop.REQUESTED and result.epochs_run == 2


def test_divergence_is_an_error_not_a_result(splits):
    torch.manual_seed(0)
    net = build_model(ModelConfig()).to(splits.train.x.device)
    with torch.no_grad():
        net.fc1.weight[0, 0] = float("inf")  # inf - inf in the logits: NaN loss
    with pytest.raises(TrainingDiverged, match="lower train.lr"):
        fit(net, splits, TrainConfig(epochs=3), make_augment("none"))


def test_device_names():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize("device", [ON_CUDA])
@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_cuda_graphs_train_as_eager_steps_do(tmp_path, monkeypatch, device, optimizer):
    """Replayed graphs must be the eager run: batch norm, augmentation, StepLR, a short last batch."""
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda g: replays.append(1) or replay(g))
    splits = training_splits(synthetic(), DataConfig(train_size=600, val_size=200, subset_size=300),
                             torch.device(device))
    kw = dict(augment="recipe", model=ModelConfig.mlp(batch_norm=True), epochs=5, batch_size=32, step_size=2,
              gamma=0.5, optimizer=optimizer, lr=0.01)
    eager = run(splits, graphs=False, **kw)[1]
    assert not replays
    graphed = run(splits, graphs=True, **kw)[1]
    assert len(replays) == 5 * (300 // 32) - 3  # every full batch but the warm-up; 300 % 32 run eagerly
    for a, b in zip(eager.history, graphed.history, strict=True):
        assert a.epoch == b.epoch and a.lr == pytest.approx(b.lr, rel=1e-6)  # the graphs' lr is a float32 tensor
        assert a.loss == pytest.approx(b.loss, rel=1e-4) and a.val_loss == pytest.approx(b.val_loss, rel=1e-4)
        assert abs(a.val_acc - b.val_acc) <= 0.01


def test_label_smoothing_raises_the_train_loss_and_leaves_the_val_loss_plain(splits):
    """The smoothed loss is what the model trains on; val loss stays cross-entropy, comparable across trials."""
    _, plain = run(splits, epochs=2, lr=0.01)
    net, smooth = run(splits, epochs=2, lr=0.01, label_smoothing=0.2)
    assert smooth.history[0].loss > plain.history[0].loss
    net.eval()
    with torch.no_grad():
        logits = net(normalize(splits.val.x))
    best = smooth.history[smooth.best_epoch - 1]  # the model ends on its best epoch's weights
    assert best.val_loss == pytest.approx(torch.nn.functional.cross_entropy(logits, splits.val.y).item(), rel=1e-4)


def test_adamw_decays_the_weights_apart_from_the_gradient(splits):
    """AdamW's decay shrinks weights by lr x wd each step whatever the gradient; Adam's L2 term goes
    through the moments instead, so the two runs part."""
    _, adam = run(splits, epochs=2, lr=0.01, optimizer="adam", weight_decay=0.1)
    net, adamw = run(splits, epochs=2, lr=0.01, optimizer="adamw", weight_decay=0.1)
    assert adam.history[-1].loss != adamw.history[-1].loss
    assert isinstance(make_optimizer(net, TrainConfig(optimizer="adamw")), torch.optim.AdamW)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
def test_precision_runs_bf16_as_asked_and_auto_only_where_the_hardware_has_it(precision):
    from hpo.engine.loop import Forward, native_bf16

    model = build_model(ModelConfig("cnn", {"width": 4, "widen": 1, "depth": 1, "stem": 4}))
    forward = Forward(model, TrainConfig(precision=precision), images=True, device=torch.device("cpu"))
    expected = {"fp32": False, "bf16": True, "auto": native_bf16(torch.device("cpu"))}[precision]
    assert forward.bf16 is expected
    x = torch.randn(2, 3, 8, 8)
    conv = model.get_submodule("conv0")
    seen = []
    conv.register_forward_hook(
        lambda m, i, o: seen.append((o.dtype, o.is_contiguous(memory_format=torch.channels_last))))
    logits = forward(x)
    assert logits.dtype == torch.float32 and seen == [(torch.bfloat16 if expected else torch.float32, True)]
