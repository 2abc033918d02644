"""``hpo``: a thin shell. argparse -> typed config -> library call; errors are one line (hpo.exits)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from hpo.config import StudyConfig, apply_overrides, load_study, parse_override, validate
from hpo.exits import EXIT_CHECKS_FAILED, UsageError, run_command
from hpo.files import folder_name
from hpo.storage import CHECKPOINT_EVERY, DB_TIMEOUT, DEFAULT_STORAGE, GRACE_PERIOD, HEARTBEAT_INTERVAL


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = dict(parse_override(p) for p in getattr(args, "param", []))
    if getattr(args, "data", None) is not None:
        overrides["data.path"] = args.data
    return overrides


def _config(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> StudyConfig:
    return load_study(args.study, {**_overrides(args), **(extra or {})})


def _device(name: str):
    from hpo.data import resolve_device

    try:
        return resolve_device(name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_train(args: argparse.Namespace) -> int:
    from hpo.runs import train_run

    cfg = _config(args, {"train.epochs": args.epochs} if args.epochs is not None else None)
    summary = train_run(cfg, _device(args.device), Path(args.out))
    print(summary.line())
    if args.json:
        print(json.dumps(summary.to_dict()))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from hpo.checks import run_checks
    from hpo.data import load_data

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


def _check_db_timeout(seconds: float) -> None:
    if not 0 <= seconds < float("inf"):  # also NaN
        raise UsageError(f"--db-timeout must be 0 (give up at once) or more seconds, got {seconds}")


def _options(args: argparse.Namespace):
    from hpo.worker import Options

    _positive("--n-trials", args.n_trials)
    _device(args.device if args.device != "auto" else "cpu")  # an unknown name fails before anything starts
    for flag in ("--heartbeat", "--grace", "--max-failures"):
        _positive(flag, getattr(args, flag[2:].replace("-", "_")))
    if (args.population or 0) < 0:
        raise UsageError(f"--population must be 0 (automatic) or a number of trials, got {args.population}")
    _check_db_timeout(args.db_timeout)
    if args.grace <= args.heartbeat:
        raise UsageError(f"--grace ({args.grace}s) must be longer than --heartbeat ({args.heartbeat}s)")
    if not args.checkpoint_every >= 0:  # also NaN
        raise UsageError(f"--checkpoint-every must be 0 (every epoch) or more seconds, got {args.checkpoint_every}")
    return Options(storage=args.storage, device=args.device, out=args.out, artifacts=args.artifacts,
                   skip_checks=args.skip_checks, heartbeat=args.heartbeat, grace=args.grace, db_timeout=args.db_timeout,
                   checkpoint_every=args.checkpoint_every, max_failures=args.max_failures, population=args.population)


def _print_best(handle, as_json: bool, extra: dict[str, Any] | None = None) -> int:
    from hpo.study import best_trial, summary

    best = best_trial(handle)
    if best is None:
        print(f"hpo: study {handle.cfg.study.name!r} has no completed trial yet", file=sys.stderr)
        return 1
    info = summary(best)
    params = ", ".join(f"{k}={v}" for k, v in info["params"].items())
    print(f"best trial {info['number']}: val_acc {info['value']:.4f} ({params}), best epoch {info['best_epoch']} "
          f"of {info['epochs_run']} ({info['stop_reason']}), checkpoint artifact {info['checkpoint_artifact']}")
    if as_json:
        print(json.dumps({**(extra or {}), **info}))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from hpo.study import read_study
    from hpo.worker import run_study

    _positive("--workers", args.workers)
    opts = _options(args)
    cfg = _config(args)
    result = run_study(cfg, opts, args.n_trials, args.workers, quiet=args.quiet)
    print(f"study {result['study']}: {result['finished']} finished, {result['failed']} failed, "
          f"{result['wall_seconds']:.1f}s, storage {result['storage']}")
    return _print_best(read_study(opts.storage, cfg.study.name), args.json, result)


def cmd_worker(args: argparse.Namespace) -> int:
    from hpo.worker import join_study

    result = join_study(_config(args), _options(args), args.n_trials, quiet=args.quiet)
    if not args.quiet:
        print(f"worker done: ran {result['ran']} trials; the study has {result['finished']} finished")
    if args.json:
        print(json.dumps(result))
    return 0


def _read(args: argparse.Namespace):
    """The study a read-only command names (``--study NAME``, or a study file's name), with the
    config stored in it."""
    from hpo.study import read_study

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
    from hpo.data import load_data
    from hpo.report import explore, explore_lines

    cfg = _explore_config(args)
    stats = explore(load_data(cfg.data.path), cfg.data, Path(args.out))
    print("\n".join(explore_lines(stats)))
    print(f"report: {Path(args.out) / 'explore.html'}, numbers: {Path(args.out) / 'explore.json'}")
    if args.json:
        print(json.dumps(stats))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from hpo.report import study_report

    sections = study_report(_read(args), Path(args.out))
    print(f"wrote {args.out}: {', '.join(sections)}")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    import optuna_dashboard
    from optuna.artifacts import FileSystemArtifactStore

    from hpo.storage import mask, open_storage
    from hpo.study import require_database

    require_database(args.storage)
    storage = open_storage(args.storage)
    Path(args.artifacts).mkdir(parents=True, exist_ok=True)
    print(f"optuna-dashboard on http://{args.host}:{args.port}/dashboard for {mask(args.storage)}", flush=True)
    optuna_dashboard.run_server(storage, host=args.host, port=args.port,
                                artifact_store=FileSystemArtifactStore(args.artifacts))
    return 0


def cmd_proxy(args: argparse.Namespace) -> int:
    from hpo.proxy import ProxyOptions, serve

    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be a TCP port, 1 to 65535, got {args.port}")
    _positive("--grace", args.grace)
    _check_db_timeout(args.db_timeout)
    serve(ProxyOptions(storage=args.storage, host=args.host, port=args.port, grace=args.grace,
                       db_timeout=args.db_timeout))
    return 0


def _retrain_flags(args: argparse.Namespace) -> dict[str, Any]:
    """``--epochs`` and ``--top`` as the [retrain] keys they override."""
    flags = {"retrain.epochs": getattr(args, "epochs", None), "retrain.top": args.top}
    for key, value in flags.items():
        _positive(f"--{key.partition('.')[2]}", value)
    return {k: v for k, v in flags.items() if v is not None}


def cmd_retrain(args: argparse.Namespace) -> int:
    import dataclasses

    from hpo.retrain import retrain

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
    from hpo.pipeline import pipeline

    _positive("--workers", args.workers)
    opts = _options(args)
    cfg = _config(args, _retrain_flags(args))
    out = Path(args.out) / folder_name(cfg.study.name)
    result = pipeline(cfg, opts, out, args.n_trials, args.workers, quiet=args.quiet)
    print("\n".join(result.lines()))
    if args.json:
        print(json.dumps(result.to_dict()))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpo", description="Hyperparameter search on Optuna, following the recipe.")
    sub = p.add_subparsers(dest="command", required=True)
    study_file = argparse.ArgumentParser(add_help=False)
    study_file.add_argument("study", help="study file (TOML), e.g. studies/recipe-baseline.toml")
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--data", help="cifar10, synthetic, or a cifar-10-batches-py / ImageFolder folder")
    options.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                         help="override a hyperparameter by its dotted name, e.g. train.lr=0.001 (repeatable)")
    options.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    options.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    common = [study_file, options]

    train = sub.add_parser("train", parents=common, help="one training run with fixed hyperparameters")
    train.add_argument("--epochs", type=int, help="override train.epochs")
    train.add_argument("--out", default="runs", help="folder for run directories (default: runs)")
    train.set_defaults(func=cmd_train)

    sub.add_parser("check", parents=common, help="the sanity checks: can this pipeline learn?").set_defaults(
        func=cmd_check)

    storage = argparse.ArgumentParser(add_help=False)
    storage.add_argument("--storage", default=os.environ.get("HPO_STORAGE", DEFAULT_STORAGE),
                         help=f"database URL, or grpc://HOST:PORT of `hpo proxy` "
                              f"(default: $HPO_STORAGE or {DEFAULT_STORAGE})")
    artifacts = argparse.ArgumentParser(add_help=False)
    artifacts.add_argument("--artifacts", default=os.environ.get("HPO_ARTIFACTS", "hpo-artifacts"),
                           help="artifact store folder for checkpoints; shared storage when workers span machines")
    runner = argparse.ArgumentParser(add_help=False)
    runner.add_argument("--n-trials", type=int, help="finished trials the study ends with (default: study.n_trials)")
    runner.add_argument("--skip-checks", action="store_true", help="skip the sanity gate (recorded in the study)")
    runner.add_argument("--out", default="runs", help="folder for the trials' run directories (default: runs)")
    runner.add_argument("--quiet", action="store_true", help="no per-trial lines or progress bar")
    runner.add_argument("--heartbeat", type=int, default=HEARTBEAT_INTERVAL, help="seconds between heartbeats")
    runner.add_argument("--grace", type=int, default=GRACE_PERIOD,
                        help="seconds without a heartbeat before a trial counts as dead and is retried")
    runner.add_argument("--db-timeout", type=float, default=DB_TIMEOUT,
                        help="seconds a worker keeps retrying a lost database before it exits")
    runner.add_argument("--checkpoint-every", type=float, default=CHECKPOINT_EVERY, metavar="SECONDS",
                        help="seconds between a trial's checkpoint writes; a retried trial redoes at most this "
                             f"much (0: every epoch; default {CHECKPOINT_EVERY:g})")
    runner.add_argument("--max-failures", type=int, metavar="N",
                        help="failed trials (NaN loss, OOM, invalid parameters) before the study stops "
                             "(default: the larger of the study's N and 10)")
    runner.add_argument("--population", type=int, metavar="K",
                        help="trials each worker trains together as one population; 0: 1 on a CPU, on CUDA as "
                             "many as free memory holds (default: [study] population, 0)")
    reader = argparse.ArgumentParser(add_help=False)  # read-only: the study by name, its stored config
    reader.add_argument("study", nargs="?", help="study file (TOML) whose study to read; or --study NAME")
    reader.add_argument("--study", dest="study_name", metavar="NAME", help="the study's name in the storage")
    run = sub.add_parser("run", parents=[*common, storage, runner, artifacts], help="run a study: gate, then N trials")
    run.add_argument("--workers", type=int, default=1, help="worker processes on this machine (round-robin GPUs)")
    run.set_defaults(func=cmd_run)
    sub.add_parser("worker", parents=[*common, storage, runner, artifacts], help="join a running study").set_defaults(
        func=cmd_worker)
    pipe = sub.add_parser("pipeline", parents=[*common, storage, runner, artifacts],
                          help="the whole recipe: explore, gate, search, retrain the top K, report; a second call "
                               "goes on where the first stopped")
    pipe.add_argument("--workers", type=int, default=1, help="worker processes for the search")
    pipe.add_argument("--top", type=int, metavar="K", help="trials to retrain (default: [retrain] top, 1)")
    pipe.set_defaults(func=cmd_pipeline)
    best = sub.add_parser("best", parents=[reader, storage], help="the study's best trial")
    best.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    best.set_defaults(func=cmd_best)

    explore = sub.add_parser("explore", help="the recipe's data exploration: stats, samples, histogram")
    explore.add_argument("study", nargs="?", help="study file (optional: its [data] section)")
    explore.add_argument("--data", help="cifar10, synthetic, or a cifar-10-batches-py / ImageFolder folder")
    explore.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    explore.add_argument("--out", default="explore", help="folder for explore.html and explore.json")
    explore.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    explore.set_defaults(func=cmd_explore)

    report = sub.add_parser("report", parents=[reader, storage], help="a self-contained HTML report of a study")
    report.add_argument("--out", default="report.html", help="the HTML file to write")
    report.set_defaults(func=cmd_report)

    dash = sub.add_parser("dashboard", parents=[storage, artifacts], help="optuna-dashboard on the study's storage")
    dash.add_argument("study", nargs="?", help="study file (unused: the dashboard shows every study)")
    dash.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    dash.add_argument("--port", type=int, default=8080)
    dash.set_defaults(func=cmd_dashboard)

    proxy = sub.add_parser("proxy", parents=[storage], help="Optuna's gRPC storage proxy in front of the database, "
                           "keeping the queue; workers by the hundred then use --storage grpc://HOST:PORT")
    proxy.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only; "
                                                          "0.0.0.0 for workers on other machines)")
    proxy.add_argument("--port", type=int, default=13000, help="port to listen on (default: 13000)")
    proxy.add_argument("--grace", type=int, default=GRACE_PERIOD, help="seconds without a heartbeat before a "
                       "worker's trial counts as dead and is retried (the workers' --grace does not apply)")
    proxy.add_argument("--db-timeout", type=float, default=DB_TIMEOUT,
                       help="seconds a call waits for a lost database before it fails")
    proxy.set_defaults(func=cmd_proxy)

    retrain = sub.add_parser("retrain", parents=[reader, options, storage, artifacts],
                             help="the best trial's setting on the full split, evaluated on test; the study's "
                                  "config, with --data and --param over it")
    retrain.add_argument("--epochs", type=int, help="override retrain.epochs (default: [retrain] epochs, 100)")
    retrain.add_argument("--out", default="runs", help="folder for the run directory")
    retrain.add_argument("--top", type=int, metavar="K", help="retrain the K best trials; the best of them on the "
                                                               "full split's val is final (default: [retrain] top, 1)")
    retrain.set_defaults(func=cmd_retrain)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # hpo prints its own lines
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
