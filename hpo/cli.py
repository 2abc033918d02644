"""``hpo``: a thin shell. argparse -> typed config -> library call; errors are one line, exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hpo.config import ConfigError, StudyConfig, load_study, parse_override
from hpo.data import DataError
from hpo.train import TrainingDiverged

EXIT_BAD_INPUT = 2
EXIT_CHECKS_FAILED = 3


class UsageError(Exception):
    """Bad input from the command line; the message is the one line the user sees."""


def _config(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> StudyConfig:
    overrides = dict(parse_override(p) for p in args.param)
    if args.data is not None:
        overrides["data.path"] = args.data
    return load_study(args.study, {**overrides, **(extra or {})})


def _device(name: str):
    from hpo.train import resolve_device

    try:
        return resolve_device(name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_train(args: argparse.Namespace) -> int:
    from hpo.runs import train_run

    cfg = _config(args, {"train.epochs": args.epochs} if args.epochs is not None else None)
    summary = train_run(cfg, _device(args.device), Path(args.out))
    print(f"best val_acc {summary['best_val_acc']:.5f} at epoch {summary['best_epoch']} of "
          f"{summary['epochs_run']} ({summary['stop_reason']}), {summary['seconds']:.1f}s in fit, "
          f"{summary['train_samples_per_s']:.0f} train samples/s; checkpoint {summary['checkpoint']}")
    if args.json:
        print(json.dumps(summary))
    return 0


def _short(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def cmd_check(args: argparse.Namespace) -> int:
    from hpo.checks import run_checks
    from hpo.data import load_data

    cfg = _config(args)
    device = _device(args.device)
    report = run_checks(cfg, load_data(cfg.data.path), device)
    print(f"{'check':<28} {'result':<6} {'value':<44} {'threshold':<46} seconds")
    for c in report.checks:
        print(f"{c.name:<28} {'pass' if c.passed else 'FAIL':<6} {_short(c.value):<44} {c.threshold:<46} "
              f"{c.seconds:.2f}")
        if c.detail and not c.passed:
            print(f"    {c.detail}")
    for w in report.warnings:
        print(f"warning: {w}")
    print("all checks passed" if report.passed else f"failed: {', '.join(report.failed())}")
    if args.json:
        print(json.dumps(report.to_dict()))
    return 0 if report.passed else EXIT_CHECKS_FAILED


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpo", description="Hyperparameter search on Optuna, following the recipe.")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("study", help="study file (TOML), e.g. studies/recipe-baseline.toml")
    common.add_argument("--data", help="cifar10, synthetic, or a cifar-10-batches-py / ImageFolder folder")
    common.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="override a hyperparameter by its dotted name, e.g. train.lr=0.001 (repeatable)")
    common.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    common.add_argument("--json", action="store_true", help="print a JSON object as the last line")

    train = sub.add_parser("train", parents=[common], help="one training run with fixed hyperparameters")
    train.add_argument("--epochs", type=int, help="override train.epochs")
    train.add_argument("--out", default="runs", help="folder for run directories (default: runs)")
    train.set_defaults(func=cmd_train)

    check = sub.add_parser("check", parents=[common], help="the sanity checks: can this pipeline learn?")
    check.set_defaults(func=cmd_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        for line in e.problems:
            print(f"hpo: {line}", file=sys.stderr)
    except (DataError, UsageError) as e:
        print(f"hpo: {e}", file=sys.stderr)
    except TrainingDiverged as e:
        print(f"hpo: training diverged: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hpo: interrupted", file=sys.stderr)
        return 130
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
