"""See it: a study report as self-contained plotly HTML (plotly.js inlined, so the file opens
anywhere, offline). No torch here: `hpo report` reads the study only."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from hpo.engine.records import Stop
from hpo.files import atomic_write
from hpo.study.handle import COUNTED, StudyHandle
from hpo.study.records import RETRAIN_ATTR, GateRecord, TrialRecord

if TYPE_CHECKING:  # plotly is imported where a figure is drawn: every worker imports hpo, none draws
    import plotly.graph_objects as go

Section = tuple[str, "go.Figure | str"]


def write_html(path: Path, title: str, sections: list[Section]) -> None:
    """One HTML file: headings, figures (plotly.js inlined once) and HTML snippets. Atomic."""
    parts, js = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>",
                 f"<h1>{html.escape(title)}</h1>"], "inline"
    for heading, content in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if not isinstance(content, str):  # a plotly figure
            if content.layout.height is None:  # else it stretches to the window's height
                content.update_layout(height=450)
            parts.append(content.to_html(full_html=False, include_plotlyjs=js))
            js = False
        else:
            parts.append(content)
    parts.append("</body></html>")
    atomic_write(path, lambda f: f.write("\n".join(parts).encode()))


def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table border='1' cellpadding='4'><tr>{head}</tr>{body}</table>"


# --- the study report --------------------------------------------------------------------------


def _label(t: optuna.trial.FrozenTrial) -> str:
    return " ".join(f"{k.rpartition('.')[2]}={v:g}" if isinstance(v, float) else f"{k.rpartition('.')[2]}={v}"
                    for k, v in t.params.items())


def _or_note(draw, *args, **kwargs) -> go.Figure | str:
    """An Optuna figure, or why it cannot be drawn yet (too few trials, one value only...)."""
    try:
        return draw(*args, **kwargs)
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        return f"<p>not drawn: {html.escape(str(e))}</p>"


def _timeline(trials: list[optuna.trial.FrozenTrial]) -> go.Figure:
    """A Gantt chart: one row per worker process, one bar per trial, coloured by state."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for state in sorted({t.state.name for t in trials}):
        rows = [t for t in trials if t.state.name == state]
        fig.add_bar(orientation="h", name=state, text=[f"#{t.number}" for t in rows],
                    y=[(r := TrialRecord.of(t)).worker or r.hostname or "?" for t in rows],
                    base=[t.datetime_start.isoformat() for t in rows],
                    x=[(t.datetime_complete - t.datetime_start).total_seconds() * 1000 for t in rows])
    return fig.update_xaxes(type="date").update_layout(yaxis_title="worker (host:pid)", barmode="overlay")


@dataclass(frozen=True)
class EpochBudget:
    """The search's epochs: what its finished trials could have run, what they ran, what stopped them short."""

    budget: int  # each finished trial's train.epochs, summed
    run: int
    saved_by_pruning: int  # budget - run of the PRUNED trials
    saved_by_early_stopping: int  # of the trials train.patience stopped

    def line(self) -> str:
        saved = self.budget - self.run
        share = f" ({saved / self.budget:.0%})" if self.budget else ""
        return (f"{self.run} of {self.budget} run, {saved} saved{share}: {self.saved_by_pruning} by the pruner, "
                f"{self.saved_by_early_stopping} by early stopping")


def epoch_budget(handle: StudyHandle) -> EpochBudget:
    """What pruning (``[study] pruner``) and early stopping saved the study's finished trials."""
    budget = run = pruned = early = 0
    for t in handle.trials(COUNTED):
        r = TrialRecord.of(t)
        full, ran = int(t.params.get("train.epochs", handle.cfg.train.epochs)), int(r.epochs_run or 0)
        budget, run = budget + full, run + ran
        if t.state == TrialState.PRUNED:
            pruned += full - ran
        elif r.stop_reason == Stop.EARLY_STOPPING.value:
            early += full - ran
    return EpochBudget(budget, run, pruned, early)


def _transfer(retrained: dict[str, Any], trials: list[optuna.trial.FrozenTrial]) -> str:
    """The recipe's bet, that what wins on the subset wins on the full split, measured on the
    retrained trials: their val acc on each, side by side, and Spearman's rho between them."""
    if not retrained.get("transfer"):
        return "<p>not retrained yet: <code>hpo retrain --top K</code> trains the K best trials on the full split</p>"
    rho, labels = retrained["spearman"], {t.number: _label(t) for t in trials}
    rows = [{"trial": r["trial"], "params": labels.get(r["trial"], ""), **{k: v for k, v in r.items() if k != "trial"}}
            for r in retrained["transfer"]]
    return table(rows) + (
        f"<p>Spearman's rho, subset against full: {'-' if rho is None else f'{rho:.2f}'} over "
        f"{len(retrained['transfer'])} trials. Final model: trial {retrained['from_trial']}, "
        f"test acc {retrained['test_acc']:.4f}.</p>")


def study_report(handle: StudyHandle, path: Path) -> list[str]:
    """The recipe's figures for a whole study; returns the section titles written."""
    import plotly.graph_objects as go

    study, vis = handle.study, optuna.visualization
    done = handle.trials(COUNTED)
    curves = go.Figure()
    for t in done:
        hist = TrialRecord.of(t).history
        curves.add_scatter(x=[h["epoch"] for h in hist], y=[h["loss"] for h in hist], mode="lines",
                           name=f"#{t.number} {_label(t)}")
    curves.update_layout(xaxis_title="epoch", yaxis_title="train loss")
    params = list(handle.cfg.search)[:2]
    gates = [{"config": g.config_hash, "passed": g.passed, "skipped": g.skipped,
              **{c["name"]: f"{'pass' if c['passed'] else 'FAIL'} ({c['value']})" for c in g.checks}}
             for g in GateRecord.read_all(study)]
    ended = [t for t in handle.trials() if t.datetime_start and t.datetime_complete]
    sections: list[Section] = [
        ("Optimization history", _or_note(vis.plot_optimization_history, study)),
        ("Learning curves: val accuracy per epoch", _or_note(vis.plot_intermediate_values, study)),
        ("Learning curves: train loss per epoch", curves),
        (f"{' against '.join(params)}, coloured by value",
         _or_note(vis.plot_rank, study, params=params) if len(params) == 2 else "<p>needs two searched keys</p>"),
        ("Parameter importances", _or_note(vis.plot_param_importances, study)),
        ("Sanity gate", table(gates)),
        ("Trials per worker", _timeline(ended) if ended else "<p>no finished trial</p>"),
        ("Epochs: what pruning and early stopping saved", f"<p>{html.escape(epoch_budget(handle).line())}</p>"),
        ("Subset to full split: did the ranking hold?", _transfer(study.user_attrs.get(RETRAIN_ATTR) or {}, done)),
    ]
    write_html(path, f"Study {study.study_name}: {len(done)} finished trials", sections)
    return [s[0] for s in sections]
