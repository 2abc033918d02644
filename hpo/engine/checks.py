"""Step 2 of the recipe as a gate: prove the pipeline can learn before a study spends compute.

The recipe checks the output shape, fits one sample, then fits one batch. hpo adds the loss at
init, an input-independent baseline (the model must beat itself trained on zeroed inputs), an
augmentation check (training on augmented images must still learn) and a data check (labels in
range, finite inputs, splits disjoint by content, class balance). The training checks run the
real engine (``fit``) with the study's optimizer and lr, so a broken loop fails them too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from hpo.config.study_file import StudyConfig
from hpo.engine.augment import make_augment
from hpo.engine.data import DeviceSplit, ImageData, Splits, TrainVal, make_splits, normalize, to_device
from hpo.engine.loop import fit
from hpo.engine.models import build_model
from hpo.engine.records import Stop

INIT_LOSS_TOLERANCE = 0.5  # |loss - ln(classes)| at init; a summed or wrong loss lands far outside
ONE_SAMPLE_LOSS = 0.05  # the recipe reached 0.0075 after 2 steps at lr 0.01
ONE_SAMPLE_STEPS = 300  # bounded: the study's lr may be 100x below the recipe's 0.01
ONE_BATCH_SIZE = 64  # the recipe's batch
ONE_BATCH_EPOCHS = 500  # the recipe reached 64/64 by epoch 60 at lr 0.01
BASELINE_TRAIN, BASELINE_VAL, BASELINE_EPOCHS = 2500, 1000, 5  # a short real training run
BASELINE_MARGIN = 0.05  # val accuracy that real inputs must add over zeroed inputs
AUGMENT_SHARE = 0.5  # share of the no-augmentation gain that training with augmentation must keep
MAX_OVERLAP = 0.001  # share of the smaller split that may appear in another (CIFAR has a few twins)
IMBALANCE_WARNING = 1.5  # largest / smallest class count


@dataclass(frozen=True)
class Check:
    """One check's outcome, as the table and the JSON show it."""

    name: str
    passed: bool
    value: Any
    threshold: str
    seconds: float
    detail: str = ""


@dataclass(frozen=True)
class CheckReport:
    checks: tuple[Check, ...]
    warnings: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [dataclasses.asdict(c) for c in self.checks],
                "warnings": list(self.warnings)}

    def lines(self) -> list[str]:
        """The table ``hpo check`` prints: a row per check, the detail of a failed one, warnings, verdict."""
        out = [f"{'check':<28} {'result':<6} {'value':<44} {'threshold':<46} seconds"]
        for c in self.checks:
            value = json.dumps(c.value) if isinstance(c.value, (dict, list)) else str(c.value)
            verdict = "pass" if c.passed else "FAIL"
            out.append(f"{c.name:<28} {verdict:<6} {value:<44} {c.threshold:<46} {c.seconds:.2f}")
            out += [f"    {c.detail}"] if c.detail and not c.passed else []
        out += [f"warning: {w}" for w in self.warnings]
        return [*out, "all checks passed" if self.passed else f"failed: {', '.join(self.failed())}"]


@dataclass
class _Context:
    cfg: StudyConfig
    data: ImageData
    splits: Splits
    device: torch.device
    model_fn: Callable[[], nn.Module]
    warnings: list[str] = field(default_factory=list)

    def split(self, idx: np.ndarray, zero: bool = False) -> DeviceSplit:
        x = self.data.train_x[idx]
        return to_device(np.zeros_like(x) if zero else x, self.data.train_y[idx], self.device)


def _content_hashes(images: np.ndarray) -> np.ndarray:
    """A 64-bit fingerprint per image (wrapping arithmetic over its bytes), vectorised."""
    flat = images.reshape(len(images), -1)
    pad = (-flat.shape[1]) % 8
    words = np.pad(flat, ((0, 0), (0, pad))).view(np.uint64)
    weights = np.random.default_rng(0).integers(1, 2**63, words.shape[1], dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):
        return (words * weights).sum(axis=1, dtype=np.uint64)


def check_data(ctx: _Context) -> Check:
    data, s = ctx.data, ctx.splits
    n_classes = len(data.classes)
    problems = []
    for name, labels in (("train", data.train_y), ("test", data.test_y)):
        if labels.min() < 0 or labels.max() >= n_classes:
            problems.append(f"{name} labels outside [0, {n_classes})")
    train = s.subset if ctx.cfg.data.train_on == "subset" else s.train
    x = normalize(torch.from_numpy(data.train_x[train[:256]]))
    gen = torch.Generator(ctx.device).manual_seed(0)
    batch, _ = next(make_augment(ctx.cfg.augment).batches(ctx.split(train[:256]), 256, gen))
    if not (torch.isfinite(x).all() and torch.isfinite(batch).all()):
        problems.append("NaN or inf in the (augmented) inputs")
    parts = {"train": _content_hashes(data.train_x[train]), "val": _content_hashes(data.train_x[s.val]),
             "test": _content_hashes(data.test_x)}
    pairs = (("train", "val"), ("train", "test"), ("val", "test"))
    overlap = {f"{a}/{b}": int(np.isin(parts[a], parts[b]).sum()) for a, b in pairs}
    worst = max(overlap[f"{a}/{b}"] / min(len(parts[a]), len(parts[b])) for a, b in pairs)
    if worst > MAX_OVERLAP:
        problems.append(f"splits share images ({overlap})")
    counts = {name: np.bincount(data.train_y[idx], minlength=n_classes).tolist()
              for name, idx in (("train", train), ("val", s.val))}
    counts["test"] = np.bincount(data.test_y, minlength=n_classes).tolist()
    for name, c in counts.items():
        if min(c) == 0 or max(c) / min(c) > IMBALANCE_WARNING:
            ctx.warnings.append(f"{name} classes are unbalanced ({min(c)} to {max(c)} images); "
                                "consider oversampling the rare classes, as the recipe suggests")
    detail = "; ".join(problems) or f"class counts {counts}; shared images {overlap}"
    return Check("data", not problems, overlap, f"labels in range, finite, overlap <= {MAX_OVERLAP:.1%}", 0, detail)


def check_output_and_init(ctx: _Context) -> list[Check]:
    n_classes = len(ctx.data.classes)
    bs = ctx.cfg.train.batch_size
    idx = ctx.splits.train[:max(bs, 2)]
    x = normalize(ctx.split(idx).x)
    y = torch.from_numpy(ctx.data.train_y[idx]).to(ctx.device)
    torch.manual_seed(ctx.cfg.train.seed)
    model = ctx.model_fn().to(ctx.device).train()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y).item()
        shape_ok = tuple(logits.shape) == (len(idx), n_classes)
        shape_detail = "" if shape_ok else (f"the model returns {list(logits.shape)}; it must return logits of "
                                            f"[batch, classes] = [{len(idx)}, {n_classes}]")
    except (RuntimeError, IndexError) as e:  # a shape that the loss cannot take
        logits, loss, shape_ok, shape_detail = None, math.nan, False, f"{type(e).__name__}: {e}"
    shape = Check("output_shape", shape_ok, list(logits.shape) if logits is not None else None,
                  f"[{len(idx)}, {n_classes}]", time.perf_counter() - t0, shape_detail)
    if not shape_ok:
        return [shape]
    expected = math.log(n_classes)
    probabilities = bool((logits >= 0).all() and torch.allclose(logits.sum(1), torch.ones(len(logits)).to(logits)))
    ok = abs(loss - expected) <= INIT_LOSS_TOLERANCE and not probabilities
    detail = ("outputs are probabilities (rows sum to 1): CrossEntropyLoss wants raw logits, drop the softmax"
              if probabilities else "" if ok else "far from ln(classes): check the loss and the last layer")
    return [shape, Check("loss_at_init", ok, round(loss, 4), f"{expected:.3f} +- {INIT_LOSS_TOLERANCE}",
                         time.perf_counter() - t0, detail)]


def _batch_norm_from_running_stats(model: nn.Module) -> nn.Module:
    """A batch of one has no statistics: let BatchNorm use its running ones (identity at init)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(lambda module, args: setattr(module, "training", False))
    return model


def _memorize(ctx: _Context, name: str, idx: np.ndarray, max_epochs: int, done: Callable, threshold: str) -> Check:
    """Train on ``idx`` alone (one batch an epoch) until ``done(stats)``; the value is the epochs."""
    t0 = time.perf_counter()
    split = ctx.split(idx)
    torch.manual_seed(ctx.cfg.train.seed)
    model = ctx.model_fn().to(ctx.device)
    if len(idx) == 1:
        model = _batch_norm_from_running_stats(model)
    # Plain cross-entropy: a smoothed loss has a floor (0.5 at smoothing 0.1) above the thresholds.
    # A constant lr: a one-cycle over these few steps would spend them warming up.
    cfg = dataclasses.replace(ctx.cfg.train, batch_size=len(idx), epochs=max_epochs, patience=0, step_size=0,
                              schedule="step", label_smoothing=0.0)
    try:
        result = fit(model, TrainVal(split, split), cfg, make_augment("none"), on_epoch=done)
    except RuntimeError as e:  # e.g. nothing requires grad: backward() refuses
        return Check(name, False, None, threshold, time.perf_counter() - t0, f"training failed: {e}")
    last = result.history[-1]
    ok = result.stop == Stop.REQUESTED
    detail = "" if ok else (f"after {max_epochs} steps loss {last.loss:.4f}, acc {last.acc:.3f}: "
                            "check the optimizer, the lr and that parameters are trainable")
    return Check(name, ok, result.epochs_run if ok else None, threshold, time.perf_counter() - t0, detail)


def check_fit_one_sample(ctx: _Context) -> Check:
    return _memorize(ctx, "fit_one_sample", ctx.splits.train[:1], ONE_SAMPLE_STEPS,
                     lambda s: s.loss < ONE_SAMPLE_LOSS and s.acc == 1.0,
                     f"loss < {ONE_SAMPLE_LOSS} and right within {ONE_SAMPLE_STEPS} steps")


def check_fit_one_batch(ctx: _Context) -> Check:
    return _memorize(ctx, "fit_one_batch", ctx.splits.train[:ONE_BATCH_SIZE], ONE_BATCH_EPOCHS,
                     lambda s: s.acc == 1.0, f"{ONE_BATCH_SIZE}/{ONE_BATCH_SIZE} within {ONE_BATCH_EPOCHS} epochs")


def check_baselines(ctx: _Context) -> list[Check]:
    train_idx, val_idx = ctx.splits.train[:BASELINE_TRAIN], ctx.splits.val[:BASELINE_VAL]
    cfg = dataclasses.replace(ctx.cfg.train, epochs=BASELINE_EPOCHS, patience=0, step_size=0, schedule="step")

    def accuracy(zero: bool, augment: str) -> float:
        torch.manual_seed(cfg.seed)
        model = ctx.model_fn().to(ctx.device)
        data = TrainVal(ctx.split(train_idx, zero), ctx.split(val_idx, zero))
        return fit(model, data, cfg, make_augment(augment)).best_val_acc

    t0 = time.perf_counter()
    try:
        zero, real = accuracy(True, "none"), accuracy(False, "none")
    except RuntimeError as e:  # e.g. nothing requires grad: backward() refuses
        return [Check(n, False, None, "", time.perf_counter() - t0, f"training failed: {e}")
                for n in ("input_independent_baseline", "augmentation")]
    gain = real - zero
    baseline = Check("input_independent_baseline", gain >= BASELINE_MARGIN, round(gain, 4),
                     f">= {BASELINE_MARGIN} val acc over zeroed inputs", time.perf_counter() - t0,
                     f"real inputs {real:.3f}, zeroed {zero:.3f}" + (
                         "" if gain >= BASELINE_MARGIN else ": the model does not use its input; check that "
                         "labels match their images and that the images are not blank"))
    if ctx.cfg.augment == "none":
        return [baseline, Check("augmentation", True, None, "no augmentation configured", 0.0)]
    t0 = time.perf_counter()
    augmented = accuracy(False, ctx.cfg.augment) - zero
    need = max(AUGMENT_SHARE * gain, BASELINE_MARGIN)
    return [baseline, Check("augmentation", augmented >= need, round(augmented, 4),
                            f">= {need:.3f} val acc over zeroed inputs", time.perf_counter() - t0,
                            f"trained on augmented images {augmented + zero:.3f}" + (
                                "" if augmented >= need else ": the augmentation destroys what the model needs"))]


def run_checks(cfg: StudyConfig, data: ImageData, device: torch.device, splits: Splits | None = None,
               model_fn: Callable[[], nn.Module] | None = None) -> CheckReport:
    """Run every check for ``cfg`` on ``data``. ``splits`` and ``model_fn`` default to what a
    study would use; tests replace them to plant bugs."""
    splits = splits if splits is not None else make_splits(data.train_y, cfg.data)
    model_fn = model_fn or (lambda: build_model(cfg.model, data.input_shape, len(data.classes)))
    ctx = _Context(cfg, data, splits, device, model_fn)
    t0 = time.perf_counter()
    checks = [dataclasses.replace(check_data(ctx), seconds=time.perf_counter() - t0)]
    checks += check_output_and_init(ctx)
    if checks[-1].name == "output_shape":  # nothing can train on a wrong shape
        names = ("loss_at_init", "fit_one_sample", "fit_one_batch", "input_independent_baseline", "augmentation")
        checks += [Check(n, False, None, "", 0.0, "not run: output_shape failed") for n in names]
    else:
        checks += [check_fit_one_sample(ctx), check_fit_one_batch(ctx), *check_baselines(ctx)]
    return CheckReport(tuple(checks), tuple(ctx.warnings))
