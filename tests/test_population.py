"""Population training: a member trained among others is the run it would be alone, and it stops,
is pruned or fails on its own."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hpo.config.schema import DataConfig, ModelConfig, TrainConfig
from hpo.engine.augment import make_augment
from hpo.engine.data import training_splits
from hpo.engine.loop import fit
from hpo.engine.models import build_model, stackable
from hpo.engine.population import Member, Population, fit_population
from hpo.engine.records import FitResult, ModelError, Stop, TrainingDiverged
from hpo.engine.sources import synthetic

CPU = torch.device("cpu")
REL = 1e-3  # float32 rounding apart (other matmul kernels), grown over a few epochs of training


VAL_IMAGES = 1000  # the tolerance on val acc is two of them (with 200, one would be 0.005)


@pytest.fixture(scope="module")
def splits():
    return training_splits(synthetic(per_class=200), DataConfig(train_size=1000, val_size=VAL_IMAGES, subset_size=300),
                           CPU)


def images_apart(a: float, b: float) -> int:
    """How many val images two val accs differ by (0.237 - 0.235 is 0.0020000000000000018 in floats)."""
    return round(abs(a - b) * VAL_IMAGES)


def solo(splits, model: ModelConfig, cfg: TrainConfig, augment: str = "none", on_epoch=None) -> FitResult:
    """The member's run alone, as hpo.engine.runs.train_run seeds it."""
    torch.manual_seed(cfg.seed)
    return fit(build_model(model), splits, cfg, make_augment(augment), on_epoch)


@pytest.mark.parametrize("model, optimizer", [
    (ModelConfig(), "adam"),
    (ModelConfig.mlp(batch_norm=True), "adam"),
    (ModelConfig.mlp(batch_norm=True, depth=3, hidden=64), "sgd"),
    (ModelConfig.mlp(depth=1, hidden=64), "adamw"),  # with label smoothing, which members share
])
def test_each_member_is_its_solo_run(splits, model, optimizer):
    """Members of different lr, batch size, weight decay, momentum, StepLR, seed and augmentation in one
    population: per epoch the train loss and val accuracy of a solo fit, within float tolerance."""
    base = TrainConfig(optimizer=optimizer, epochs=5, label_smoothing=0.1 if optimizer == "adamw" else 0.0)
    cfgs = [dataclasses.replace(base, lr=0.01 if optimizer == "sgd" else 1e-3, batch_size=32),
            dataclasses.replace(base, lr=0.05 if optimizer == "sgd" else 3e-3, batch_size=64, weight_decay=1e-3),
            dataclasses.replace(base, lr=0.02 if optimizer == "sgd" else 5e-4, batch_size=16, momentum=0.5,
                                step_size=2, gamma=0.5, seed=3)]
    augments = ["none", "recipe", "none"]
    members = [Member(c, make_augment(a)) for c, a in zip(cfgs, augments, strict=True)]
    together = fit_population(model, optimizer, members, splits)
    # The batched matmuls round other than the solo run's by an ulp. Adam divides each update by a
    # second moment, so a weight whose true gradient is zero (a bias before batch norm) takes
    # lr-sized steps from rounding noise, in either run; batch norm cancels them in training, and
    # eval sees them through the running mean. Everywhere else the runs agree to float32's rounding.
    rel = 5e-2 if model.kwargs["batch_norm"] and optimizer == "adam" else REL
    for cfg, augment, got in zip(cfgs, augments, together, strict=True):
        alone = solo(splits, model, cfg, augment)
        assert [s.epoch for s in got.history] == [1, 2, 3, 4, 5] and got.stop == alone.stop == Stop.COMPLETED
        for a, b in zip(alone.history, got.history, strict=True):
            assert images_apart(a.val_acc, b.val_acc) <= 2, (cfg, a, b)
            assert b.loss == pytest.approx(a.loss, rel=rel / 5) and b.val_loss == pytest.approx(a.val_loss, rel=rel)
            assert b.lr == a.lr and b.acc == pytest.approx(a.acc, abs=0.01)
        assert got.best_epoch == alone.best_epoch


@pytest.mark.parametrize("model", [ModelConfig(), ModelConfig.mlp(batch_norm=True)])
def test_the_best_weights_are_the_solo_run_s(splits, model):
    """As a solo model's state_dict (batch norm's running statistics included): best.pt as today."""
    cfg = TrainConfig(optimizer="sgd", lr=0.05, epochs=3, batch_size=32)
    population = Population(model, "sgd", [Member(cfg, make_augment("none"))] * 2, splits)
    for _ in range(3):
        population.epoch()
    torch.manual_seed(cfg.seed)
    alone = build_model(model)
    fit(alone, splits, cfg, make_augment("none"))
    for k in range(2):
        best = population.slots[k].best_weights
        assert best.keys() == alone.state_dict().keys()  # a solo model's state_dict: best.pt as today
        for name, value in alone.state_dict().items():
            assert torch.allclose(best[name].float(), value.float(), atol=1e-4), name


def test_members_stop_on_their_own(splits):
    """Early stopping (lr 0: no epoch beats the first), pruning, the last epoch and divergence are each
    one member's business; the others go on and end as they would alone."""
    base = TrainConfig(epochs=6, batch_size=32)
    members = [Member(dataclasses.replace(base, lr=0.0, patience=2), make_augment("none")),
               Member(base, make_augment("none")),
               Member(dataclasses.replace(base, epochs=3), make_augment("none")),
               Member(dataclasses.replace(base, optimizer="adam", lr=1e30), make_augment("none"))]
    seen: dict[int, list[int]] = {}

    def prune_member_1_at_epoch_4(k: int, stats) -> bool:
        seen.setdefault(k, []).append(stats.epoch)
        return k == 1 and stats.epoch == 4

    early, pruned, short, diverged = fit_population(ModelConfig(), "adam", members, splits,
                                                    on_epoch=prune_member_1_at_epoch_4)
    assert (early.stop, early.epochs_run, early.best_epoch) == (Stop.EARLY_STOPPING, 3, 1)
    assert (pruned.stop, pruned.epochs_run) == (Stop.REQUESTED, 4)
    assert (short.stop, short.epochs_run) == (Stop.COMPLETED, 3)
    assert isinstance(diverged, TrainingDiverged) and "lower train.lr" in str(diverged)
    assert seen[0] == [1, 2, 3] and seen[1] == [1, 2, 3, 4] and seen[2] == [1, 2, 3] and 3 not in seen
    alone = solo(splits, ModelConfig(), dataclasses.replace(base, epochs=3))
    assert [round(s.val_acc, 3) for s in short.history] == [round(s.val_acc, 3) for s in alone.history]


def run_out(population: Population) -> None:
    while any(s.stop is None for s in population.slots):
        population.epoch()


def assert_same_run(got: FitResult | list, alone: FitResult) -> None:
    history = got.history if isinstance(got, FitResult) else got
    assert [s.epoch for s in history] == [s.epoch for s in alone.history]
    for a, b in zip(alone.history, history, strict=True):
        assert images_apart(a.val_acc, b.val_acc) <= 2 and b.loss == pytest.approx(a.loss, rel=REL) and b.lr == a.lr


CUT = [TrainConfig(epochs=5, batch_size=32, step_size=2, gamma=0.5),
       TrainConfig(optimizer="sgd", lr=0.05, epochs=5, batch_size=64, step_size=2, gamma=0.5, weight_decay=1e-3)]


@pytest.mark.parametrize("cfg", CUT, ids=["adam", "sgd"])
def test_a_member_cut_short_goes_on_alone_as_the_unbroken_run(splits, tmp_path, cfg):
    """Its checkpoint is a solo run's last.pt and best.pt: `hpo` resumes it wherever the retry runs."""
    from hpo.engine.checkpoints import Checkpoints, save_checkpoint

    model = ModelConfig.mlp(batch_norm=True)
    neighbour = Member(dataclasses.replace(cfg, lr=cfg.lr / 2), make_augment("none"))
    population = Population(model, cfg.optimizer, [neighbour, Member(cfg, make_augment("recipe"))], splits)
    for _ in range(3):
        population.epoch()
    last, best = population.checkpoint(1)
    save_checkpoint(tmp_path / "last.pt", last)
    save_checkpoint(tmp_path / "best.pt", best)
    torch.manual_seed(cfg.seed)
    resumed = fit(build_model(model), splits, cfg, make_augment("recipe"), checkpoints=Checkpoints(tmp_path))
    assert resumed.resumed_from_epoch == 3
    assert_same_run(resumed, solo(splits, model, cfg, "recipe"))


@pytest.mark.parametrize("cfg", CUT, ids=["adam", "sgd"])
def test_a_solo_run_cut_short_goes_on_inside_a_population(splits, tmp_path, cfg):
    from hpo.engine.checkpoints import Checkpoints, load_checkpoint

    model = ModelConfig.mlp(batch_norm=True)
    torch.manual_seed(cfg.seed)
    fit(build_model(model), splits, dataclasses.replace(cfg, epochs=2), make_augment("recipe"),
        checkpoints=Checkpoints(tmp_path))  # killed after epoch 2, as far as the files tell
    other = Member(dataclasses.replace(cfg, seed=5, batch_size=16), make_augment("none"))
    population = Population(model, cfg.optimizer, [other, other], splits)
    population.admit(1, Member(cfg, make_augment("recipe")), load_checkpoint(tmp_path / "last.pt"),
                     load_checkpoint(tmp_path / "best.pt"))
    run_out(population)
    assert_same_run(population.result(1), solo(splits, model, cfg, "recipe"))
    # The member beside it trains as it does without the newcomer, to the bit. (Against its solo run,
    # float32 rounding apart, test_each_member_is_its_solo_run; here at epoch 1, half trained, a few val
    # images sit on the boundary and the rounding of another CPU's kernels moves them.)
    undisturbed = Population(model, cfg.optimizer, [other, other], splits)
    run_out(undisturbed)
    numbers = lambda r: [dataclasses.replace(s, seconds=0.0) for s in r.history]  # noqa: E731
    assert numbers(population.result(0)) == numbers(undisturbed.result(0))


def test_a_member_cut_after_its_last_epoch_does_not_train_again(splits):
    cfg, lr0 = TrainConfig(epochs=2, batch_size=64), TrainConfig(epochs=9, batch_size=64, lr=0.0, patience=2)
    population = Population(ModelConfig(), "adam", [Member(cfg, make_augment("none")),
                                                    Member(lr0, make_augment("none"))], splits)
    run_out(population)  # 2 epochs; 3 for lr 0 (early stopping)
    cut = [population.checkpoint(k) for k in range(2)]
    again = Population(ModelConfig(), "adam", [Member(cfg, make_augment("none"))] * 2, splits)
    for k, member in enumerate((cfg, lr0)):
        again.admit(k, Member(member, make_augment("none")), *cut[k])
    assert [s.stop for s in again.slots] == [Stop.COMPLETED, Stop.EARLY_STOPPING]
    run_out(again)
    assert [again.result(k).epochs_run for k in range(2)] == [2, 3]


def test_a_freed_slot_takes_the_next_member_at_an_epoch_boundary(splits):
    short, long_, next_ = (TrainConfig(epochs=2, batch_size=32), TrainConfig(epochs=4, batch_size=64, lr=3e-3),
                           TrainConfig(epochs=3, batch_size=16, seed=9))
    population = Population(ModelConfig(), "adam", [Member(short, make_augment("none")),
                                                    Member(long_, make_augment("none"))], splits)
    population.epoch()
    population.epoch()
    first = population.result(0)
    assert first.stop == Stop.COMPLETED and population.slots[1].stop is None
    population.admit(0, Member(next_, make_augment("none")))  # the queue's next trial, in the freed slot
    run_out(population)
    for k, cfg in ((0, next_), (1, long_)):
        assert_same_run(population.result(k), solo(splits, ModelConfig(), cfg))
    assert_same_run(first, solo(splits, ModelConfig(), short))


def test_members_have_their_own_dropout_rate(splits):
    """A member without dropout stays its solo run beside members with it. A member with dropout
    keeps its solo model's state dict names (its Dropout layers shift them): its checkpoint goes on
    alone or in another population."""
    model, cfg = ModelConfig.mlp(batch_norm=True), TrainConfig(optimizer="sgd", lr=0.05, epochs=3, batch_size=32)
    population = Population(model, "sgd", [Member(cfg, make_augment("none"), p) for p in (0.0, 0.5, 0.9)], splits)
    run_out(population)
    assert_same_run(population.result(0), solo(splits, model, cfg))
    none, half, most = ([s.loss for s in population.result(k).history] for k in range(3))
    assert all(a < b < c for a, b, c in zip(none, half, most, strict=True))  # more dropped, a higher train loss
    last, best = population.checkpoint(1)
    for saved in (last["model"], best["model"]):
        build_model(ModelConfig.mlp(**{**model.kwargs, "dropout": 0.5})).load_state_dict(saved)  # strict: solo names
    again = Population(model, "sgd", [Member(cfg, make_augment("none"))] * 2, splits)
    again.admit(1, Member(cfg, make_augment("none"), 0.5), last, best)
    assert again.member_state(1).keys() == last["model"].keys()
    assert all(torch.equal(again.member_state(1)[n], v) for n, v in last["model"].items())


def test_a_user_s_stack_of_linear_layers_trains_as_a_population_and_anything_else_is_refused(splits):
    """A factory of Flatten, Linear, ReLU and Dropout stacks (its Dropout at its own rate); any other
    layer, or a batch norm that is not torch's default, is refused by name."""
    model = ModelConfig("factories:linear_stack", {"hidden": 64})
    stackable(build_model(model))
    cfg = TrainConfig(epochs=4)
    results = fit_population(model, "adam", [Member(cfg, make_augment("none")),
                                             Member(dataclasses.replace(cfg, seed=1), make_augment("none"))], splits)
    assert all(isinstance(r, FitResult) and r.best_val_acc >= 0.9 for r in results)  # solo: 1.0 by epoch 3
    with pytest.raises(ModelError, match="this model has Conv2d, MaxPool2d: use --population 1"):
        Population(ModelConfig("factories:tiny_cnn", {"width": 4, "pool": True}), "adam",
                   [Member(cfg, make_augment("none"))], splits)
    with pytest.raises(ModelError, match=r"this model has BatchNorm1d\(momentum=0.5"):
        stackable(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3, momentum=0.5)))
