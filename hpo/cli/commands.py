"""One function per ``hpo`` subcommand: typed config -> library call -> printed lines. The library
is imported inside each, so a command loads only what it runs (`hpo best` no torch)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hpo.config.study_file import StudyConfig, apply_overrides, load_study, parse_override, validate
from hpo.files import folder_name
from hpo.workers.exits import EXIT_CHECKS_FAILED, UsageError

T = TypeVar("T")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = dict(parse_override(p) for p in getattr(args, "param", []))
    if getattr(args, "data", None) is not None:
        overrides["data.path"] = args.data
    return overrides


def _config(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> StudyConfig:
    return load_study(args.study, {**_overrides(args), **(extra or {})})


def _device(name: str):
    from hpo.engine.data import resolve_device

    try:
        return resolve_device(name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_train(args: argparse.Namespace) -> int:
    from hpo.engine.runs import train_run

    cfg = _config(args, {"train.epochs": args.epochs} if args.epochs is not None else None)
    summary = train_run(cfg, _device(args.device), Path(args.out))
    print(summary.line())
    if args.json:
        print(json.dumps(summary.to_dict()))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from hpo.engine.checks import run_checks
    from hpo.engine.sources import load_data

    cfg = _config(args)
    device = _device(args.device)
    report = run_checks(cfg, load_data(cfg.data.path), device)
    print("\n".join(report.lines()))
    if args.json:
        print(json.dumps(report.to_dict()))
    return 0 if report.passed else EXIT_CHECKS_FAILED


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value}")


def _checked(make: Callable[..., T], **fields: Any) -> T:
    """An options object, which checks itself: what is wrong is the user's, said in one line."""
    try:
        return make(**fields)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _options(args: argparse.Namespace):
    from hpo.storages.retries import Liveness
    from hpo.workers.slots import Options

    _positive("--n-trials", args.n_trials)
    _device(args.device if args.device != "auto" else "cpu")  # an unknown name fails before anything starts
    liveness = _checked(Liveness, heartbeat=args.heartbeat, grace=args.grace, db_timeout=args.db_timeout)
    return _checked(Options, storage=args.storage, device=args.device, out=args.out, artifacts=args.artifacts,
                    skip_checks=args.skip_checks, liveness=liveness, checkpoint_every=args.checkpoint_every,
                    max_failures=args.max_failures, population=args.population)


def _print_best(handle, as_json: bool, extra: dict[str, Any] | None = None) -> int:
    from hpo.study.reads import best_trial, summary

    best = best_trial(handle)
    if best is None:
        print(f"hpo: study {handle.cfg.study.name!r} has no completed trial yet", file=sys.stderr)
        return 1
    info = summary(best)
    print(info.line())
    if as_json:
        print(json.dumps({**(extra or {}), **info.to_dict()}))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from hpo.study.reads import read_study
    from hpo.workers.worker import run_study

    _positive("--workers", args.workers)
    opts = _options(args)
    cfg = _config(args)
    result = run_study(cfg, opts, args.n_trials, args.workers, quiet=args.quiet)
    print(result.line())
    return _print_best(read_study(opts.storage, cfg.study.name), args.json, result.to_dict())


def cmd_worker(args: argparse.Namespace) -> int:
    from hpo.workers.worker import join_study

    result = join_study(_config(args), _options(args), args.n_trials, quiet=args.quiet)
    if not args.quiet:
        print(result.line())
    if args.json:
        print(json.dumps(result.to_dict()))
    return 0


def _read(args: argparse.Namespace):
    """The study a read-only command names (``--study NAME``, or a study file's name), with the
    config stored in it."""
    from hpo.study.reads import read_study

    if args.study_name:
        name = args.study_name
    elif args.study:
        name = load_study(args.study, {k: v for k, v in _overrides(args).items() if k == "study.name"}).study.name
    else:
        raise UsageError("name the study: a study file (STUDY.toml) or --study NAME")
    return read_study(args.storage, name)


def cmd_best(args: argparse.Namespace) -> int:
    return _print_best(_read(args), args.json)


def _explore_config(args: argparse.Namespace) -> StudyConfig:
    """``hpo explore`` takes the study file optionally: without one, the defaults."""
    return _config(args) if args.study else validate(apply_overrides({}, _overrides(args)), Path("explore.toml"))


def cmd_explore(args: argparse.Namespace) -> int:
    from hpo.engine.sources import load_data
    from hpo.recipe.explore import explore, explore_lines

    cfg = _explore_config(args)
    stats = explore(load_data(cfg.data.path), cfg.data, Path(args.out))
    print("\n".join(explore_lines(stats)))
    print(f"report: {Path(args.out) / 'explore.html'}, numbers: {Path(args.out) / 'explore.json'}")
    if args.json:
        print(json.dumps(stats))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from hpo.recipe.report import study_report

    sections = study_report(_read(args), Path(args.out))
    print(f"wrote {args.out}: {', '.join(sections)}")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    import optuna_dashboard
    from optuna.artifacts import FileSystemArtifactStore

    from hpo.storages.rdb import open_storage
    from hpo.storages.retries import mask
    from hpo.study.reads import require_database

    require_database(args.storage)
    storage = open_storage(args.storage)
    Path(args.artifacts).mkdir(parents=True, exist_ok=True)
    print(f"optuna-dashboard on http://{args.host}:{args.port}/dashboard for {mask(args.storage)}", flush=True)
    optuna_dashboard.run_server(storage, host=args.host, port=args.port,
                                artifact_store=FileSystemArtifactStore(args.artifacts))
    return 0


def cmd_proxy(args: argparse.Namespace) -> int:
    from hpo.storages.retries import Liveness
    from hpo.workers.proxy import ProxyOptions, serve

    liveness = _checked(Liveness.watching, grace=args.grace, db_timeout=args.db_timeout)
    serve(_checked(ProxyOptions, storage=args.storage, host=args.host, port=args.port, liveness=liveness))
    return 0


def _retrain_flags(args: argparse.Namespace) -> dict[str, Any]:
    """``--epochs`` and ``--top`` as the [retrain] keys they override."""
    flags = {"retrain.epochs": getattr(args, "epochs", None), "retrain.top": args.top}
    for key, value in flags.items():
        _positive(f"--{key.partition('.')[2]}", value)
    return {k: v for k, v in flags.items() if v is not None}


def cmd_retrain(args: argparse.Namespace) -> int:
    import dataclasses

    from hpo.recipe.retrain import retrain

    device = _device(args.device)
    handle = _read(args)
    # The study's config, with the data where this machine has it and the budget of [retrain]: the
    # study file's (with --param), else the study's; --param and --epochs over them.
    overrides = {k: v for k, v in _overrides(args).items() if k != "study.name"}
    if args.study:
        current = _config(args)
        overrides = {"data.path": current.data.path, **{f"retrain.{k}": v for k, v in current.retrain.keys().items()},
                     **overrides}
    overrides |= _retrain_flags(args)
    if overrides:
        handle = dataclasses.replace(handle, cfg=handle.cfg.with_params(overrides))
    result = retrain(handle, device, Path(args.out), Path(args.artifacts))
    print(result.line())
    if args.json:
        print(json.dumps(result.to_dict()))
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from hpo.recipe.pipeline import pipeline

    _positive("--workers", args.workers)
    opts = _options(args)
    cfg = _config(args, _retrain_flags(args))
    out = Path(args.out) / folder_name(cfg.study.name)
    result = pipeline(cfg, opts, out, args.n_trials, args.workers, quiet=args.quiet)
    print("\n".join(result.lines()))
    if args.json:
        print(json.dumps(result.to_dict()))
    return 0
