"""The recipe's whole path in one call: explore the data, gate, search on the subset, retrain the
top K on the full split, report. ``hpo pipeline`` is this; so is :func:`pipeline` from a script.

Each stage that finishes is recorded in the study (user attribute ``hpo:pipeline:<stage>``: its wall
time and what it depended on), so a second call goes on where the first stopped and never repeats a
finished stage; a larger N reruns the search and the stages after it. A stage cut short runs again;
the search's trials are not lost with it (a study resumes, see hpo.study.queue).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpo.config.study_file import StudyConfig
from hpo.engine.data import ImageData, resolve_device
from hpo.recipe.explore import explore
from hpo.recipe.report import EpochBudget, epoch_budget, study_report
from hpo.recipe.retrain import RetrainResult, retrain
from hpo.study.handle import COUNTED, StudyHandle
from hpo.study.records import StageRecord
from hpo.workers.gate import gate
from hpo.workers.runner import say
from hpo.workers.slots import Options
from hpo.workers.worker import prepare, run_study

STAGES = ("explore", "gate", "search", "retrain", "report")


@dataclass(frozen=True)
class Stage:
    """One stage of a pipeline call: its wall time, and whether an earlier call had done it."""

    name: str
    seconds: float
    done_before: bool

    def line(self) -> str:
        return f"{self.name} {self.seconds:.0f}s" + (" (done before)" if self.done_before else "")


@dataclass(frozen=True)
class PipelineResult:
    """What ``hpo pipeline`` ends with."""

    study: str
    stages: tuple[Stage, ...]
    final: RetrainResult  # the retrained model: test acc, params, transfer and rho
    epochs: EpochBudget  # what the search's pruning and early stopping saved
    explore: Path  # explore.html
    report: Path  # report.html

    def to_dict(self) -> dict[str, Any]:
        return {"study": self.study, "stages": [dataclasses.asdict(s) for s in self.stages],
                "final": self.final.to_dict(), "epochs": dataclasses.asdict(self.epochs), "explore": str(self.explore),
                "report": str(self.report)}

    def lines(self) -> list[str]:
        """The one summary: the model, whether the subset's ranking held, where things are, the time."""
        final, rho = self.final, self.final.spearman
        params = ", ".join(f"{k}={v}" for k, v in final.params.items())
        held = "-" if rho is None else f"{rho:.2f}"
        stages = ", ".join(s.line() for s in self.stages)
        return [f"pipeline {self.study}: test_acc {final.test_acc:.4f} (val_acc {final.val_acc:.4f}, full split), "
                f"trial {final.from_trial}: {params}",
                f"subset-to-full Spearman rho {held} over {len(final.transfer)} retrained trials",
                f"search epochs: {self.epochs.line()}",
                f"report {self.report}, model {final.checkpoint}, data {self.explore}",
                f"wall time: {stages}; {sum(s.seconds for s in self.stages):.0f}s in all"]


def _stage(handle: StudyHandle, name: str, run: Callable[[], object], inputs: Any, quiet: bool) -> Stage:
    """Run stage ``name`` unless the study records it as done with the same ``inputs`` (what it depends
    on: a larger N reruns the search and what follows it); record it when it finishes."""
    done = StageRecord.read(handle.study, name)
    if done is not None and done.inputs == inputs:
        return Stage(name, done.seconds, True)
    if not quiet:
        say(f"pipeline: {name}")
    t0 = time.perf_counter()
    run()
    seconds = round(time.perf_counter() - t0, 1)
    StageRecord(seconds, inputs).write(handle.study, name)
    return Stage(name, seconds, False)


def pipeline(cfg: StudyConfig, opts: Options, out: Path, n_trials: int | None = None, workers: int = 1,
             quiet: bool = False, data: ImageData | None = None) -> PipelineResult:
    """explore -> gate -> search (``n_trials``, ``workers``) -> retrain ``[retrain] top`` -> report,
    each stage once per study. ``out`` gets explore/ and report.html; runs go to ``opts.out``."""
    device = resolve_device(opts.device)
    handle, opts, data = prepare(cfg, opts, n_trials, create=True, data=data)
    target = handle.target
    study = cfg.study.name
    paths = {"explore": out / "explore", "report": out / "report.html"}
    results: dict[str, RetrainResult] = {}

    def search() -> None:
        if len(handle.trials(COUNTED)) < handle.target:
            run_study(cfg, opts, target, workers, quiet=quiet, data=data)

    def final() -> None:
        results["retrain"] = retrain(handle, device, Path(opts.out), Path(opts.artifacts), data,
                                     log=None if quiet else print)

    budget = {"n_trials": target, **cfg.retrain.keys()}  # what the final model depends on
    stages = (
        _stage(handle, "explore", lambda: explore(data, cfg.data, paths["explore"]), None, quiet),
        _stage(handle, "gate", lambda: gate(handle.study, cfg, data, device, skip=opts.skip_checks), None, quiet),
        _stage(handle, "search", search, {"n_trials": target}, quiet),
        _stage(handle, "retrain", final, budget, quiet),
        _stage(handle, "report", lambda: study_report(handle, paths["report"]), budget, quiet),
    )
    final_model = results.get("retrain") or RetrainResult.stored(handle)
    return PipelineResult(study, stages, final_model, epoch_budget(handle), paths["explore"] / "explore.html",
                          paths["report"])
