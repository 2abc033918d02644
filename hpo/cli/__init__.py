"""``hpo``: a thin shell. argparse -> typed config -> library call (:mod:`hpo.cli.commands`); errors
are one line and an exit code (:mod:`hpo.workers.exits`)."""

from __future__ import annotations

import argparse
import os

from hpo.cli.commands import (
    cmd_best,
    cmd_check,
    cmd_dashboard,
    cmd_explore,
    cmd_pipeline,
    cmd_proxy,
    cmd_report,
    cmd_retrain,
    cmd_run,
    cmd_train,
    cmd_worker,
)
from hpo.storages.retries import CHECKPOINT_EVERY, DB_TIMEOUT, DEFAULT_STORAGE, GRACE_PERIOD, HEARTBEAT_INTERVAL
from hpo.workers.exits import run_command

EXAMPLES = {  # shown under each command's --help; PATH: a local copy of CIFAR-10 in the ImageFolder layout
    "train": "hpo train studies/recipe-baseline.toml --data synthetic --epochs 2",
    "check": "hpo check studies/recipe-baseline.toml --data PATH",
    "run": "hpo run studies/recipe-random-search.toml --data PATH --storage sqlite:///hpo.db",
    "worker": "hpo worker studies/mlp-search.toml --data PATH --storage postgresql://hpo@db-host/hpo",
    "pipeline": "hpo pipeline studies/recipe-random-search.toml --data PATH",
    "best": "hpo best studies/recipe-random-search.toml --json",
    "explore": "hpo explore --data PATH --out explore",
    "report": "hpo report studies/recipe-random-search.toml --out report.html",
    "dashboard": "hpo dashboard --storage sqlite:///hpo.db --port 8080",
    "proxy": "hpo proxy --storage postgresql://hpo@db-host/hpo --host 0.0.0.0",
    "retrain": "hpo retrain studies/recipe-random-search.toml --data PATH --top 3",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpo", description="Hyperparameter search on Optuna, following the recipe.",
                                epilog=f"start with: {EXAMPLES['pipeline']}; hpo COMMAND --help for each command")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, *parents: argparse.ArgumentParser, help: str) -> argparse.ArgumentParser:
        """A subcommand whose --help says what it does in one line and shows an example."""
        return sub.add_parser(name, parents=list(parents), help=help, description=help,
                              epilog=f"example: {EXAMPLES[name]}")
    study_file = argparse.ArgumentParser(add_help=False)
    study_file.add_argument("study", help="study file (TOML), e.g. studies/recipe-baseline.toml")
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--data", help="cifar10, synthetic, or a cifar-10-batches-py / ImageFolder folder")
    options.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                         help="override a hyperparameter by its dotted name, e.g. train.lr=0.001 (repeatable)")
    options.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    options.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    common = [study_file, options]

    train = command("train", *common, help="one training run with fixed hyperparameters")
    train.add_argument("--epochs", type=int, help="override train.epochs")
    train.add_argument("--out", default="runs", help="folder for run directories (default: runs)")
    train.set_defaults(func=cmd_train)

    command("check", *common, help="the sanity checks: can this pipeline learn?").set_defaults(
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
                        help="trials each worker trains together as one population (the mlp family only); 0: "
                             "1, until a population is measured faster on a GPU (default: [study] population, 0)")
    reader = argparse.ArgumentParser(add_help=False)  # read-only: the study by name, its stored config
    reader.add_argument("study", nargs="?", help="study file (TOML) whose study to read; or --study NAME")
    reader.add_argument("--study", dest="study_name", metavar="NAME", help="the study's name in the storage")
    run = command("run", *common, storage, runner, artifacts, help="run a study: gate, then N trials")
    run.add_argument("--workers", type=int, default=1, help="worker processes on this machine (round-robin GPUs)")
    run.set_defaults(func=cmd_run)
    command("worker", *common, storage, runner, artifacts, help="join a running study").set_defaults(
        func=cmd_worker)
    pipe = command("pipeline", *common, storage, runner, artifacts,
                   help="the whole recipe: explore, gate, search, retrain the top K, report; a second call "
                        "goes on where the first stopped")
    pipe.add_argument("--workers", type=int, default=1, help="worker processes for the search")
    pipe.add_argument("--top", type=int, metavar="K", help="trials to retrain (default: [retrain] top, 1)")
    pipe.set_defaults(func=cmd_pipeline)
    best = command("best", reader, storage, help="the study's best trial")
    best.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    best.set_defaults(func=cmd_best)

    explore = command("explore", help="the recipe's data exploration: stats, samples, histogram")
    explore.add_argument("study", nargs="?", help="study file (optional: its [data] section)")
    explore.add_argument("--data", help="cifar10, synthetic, or a cifar-10-batches-py / ImageFolder folder")
    explore.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    explore.add_argument("--out", default="explore", help="folder for explore.html and explore.json")
    explore.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    explore.set_defaults(func=cmd_explore)

    report = command("report", reader, storage, help="a self-contained HTML report of a study")
    report.add_argument("--out", default="report.html", help="the HTML file to write")
    report.set_defaults(func=cmd_report)

    dash = command("dashboard", storage, artifacts, help="optuna-dashboard on the study's storage")
    dash.add_argument("study", nargs="?", help="study file (unused: the dashboard shows every study)")
    dash.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    dash.add_argument("--port", type=int, default=8080)
    dash.set_defaults(func=cmd_dashboard)

    proxy = command("proxy", storage, help="Optuna's gRPC storage proxy in front of the database, "
                    "keeping the queue; workers by the hundred then use --storage grpc://HOST:PORT")
    proxy.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only; "
                                                          "0.0.0.0 for workers on other machines)")
    proxy.add_argument("--port", type=int, default=13000, help="port to listen on (default: 13000)")
    proxy.add_argument("--grace", type=int, default=GRACE_PERIOD, help="seconds without a heartbeat before a "
                       "worker's trial counts as dead and is retried (the workers' --grace does not apply)")
    proxy.add_argument("--db-timeout", type=float, default=DB_TIMEOUT,
                       help="seconds a call waits for a lost database before it fails")
    proxy.set_defaults(func=cmd_proxy)

    retrain = command("retrain", reader, options, storage, artifacts,
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

