"""Command line: ``fedward run``, ``fedward report``, ``fedward models``.

``fedward run`` accepts the Fed-MAS reference code's flags (``--method``, ``--client_number``,
``--comm_round``, ``--adam``, ``--loss_fn_name``, ...), so its README commands work with
``python main.py`` replaced by ``fedward run``. Errors the user can fix print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from fedward import __version__
from fedward.config import DEAD_REFERENCE_FLAGS, FIELD_NAMES, RunConfig, build_config, config_help, load_yaml
from fedward.errors import ConfigError, FedwardError

BOOL_FIELDS = {name for name, f in RunConfig.__dataclass_fields__.items() if str(f.type).startswith("bool")}


def _add_run_parser(subparsers) -> None:
    run = subparsers.add_parser("run", help="train a federated run", argument_default=argparse.SUPPRESS,
                                description="Train a method on a federated data set and write a run directory.")
    run.add_argument("--config", help="YAML file of run settings (flags override it)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    helps = config_help()
    defaults = RunConfig()
    for name in FIELD_NAMES:
        default = getattr(defaults, name)
        text = f"{helps.get(name, '')} (default: {default})"
        if name in BOOL_FIELDS:
            # `--adam` alone means true (as in the reference); `--adam false` is accepted too.
            run.add_argument(f"--{name}", nargs="?", const="true", metavar="BOOL", help=text)
        elif name == "pre_trained_tv":
            run.add_argument("--pre_trained_tv", nargs="?", const="default", metavar="PATH", help=text)
        else:
            run.add_argument(f"--{name}", metavar=name.upper(), help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedward", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fedward {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(subparsers)
    report = subparsers.add_parser("report", help="summarise and plot one or more run directories")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", help="folder for the comparison plot (default: beside the first run)")
    subparsers.add_parser("models", help="list the registered models")
    return parser


def _reject_dead_flags(unknown: Sequence[str]) -> None:
    for token in unknown:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0]
            if name in DEAD_REFERENCE_FLAGS:
                raise ConfigError(f"--{name} is not accepted: {DEAD_REFERENCE_FLAGS[name]}")
            raise ConfigError(f"unknown flag --{name}; see `fedward run --help`")
    if unknown:
        raise ConfigError(f"unexpected argument(s): {' '.join(unknown)}")


def command_run(args: argparse.Namespace) -> int:
    from fedward.engine.simulation import prepare, print_summary, run
    from fedward.tracking import RunDirectory

    flags = {k: v for k, v in vars(args).items() if k in FIELD_NAMES}
    if getattr(args, "resume", None):
        if flags or getattr(args, "config", None):
            allowed = {"progress"}
            extra = sorted(set(flags) - allowed) + (["config"] if getattr(args, "config", None) else [])
            if extra:
                raise ConfigError(f"--resume continues the saved config of the run; drop --{', --'.join(extra)}")
        run_dir = RunDirectory.open_existing(args.resume)
        saved = {k: v for k, v in run_dir.read_config().items() if k in FIELD_NAMES}
        cfg = build_config({**saved, **flags})
        summary = run(cfg, run_dir, resume=True)
        print_summary(summary, run_dir)
        return 0

    values: dict[str, Any] = load_yaml(args.config) if getattr(args, "config", None) else {}
    values.update(flags)
    cfg = build_config(values)
    run_dir, data = prepare(cfg)
    try:
        summary = run(cfg, run_dir, data=data)
    except KeyboardInterrupt:
        print(f"\nfedward: interrupted; continue with: fedward run --resume {run_dir.path}", file=sys.stderr)
        return 130
    print_summary(summary, run_dir)
    return 0


def command_report(args: argparse.Namespace) -> int:
    from fedward.tracking import RunDirectory
    from fedward.tracking.report import compare, write_report

    for path in args.run_dirs:
        written = write_report(RunDirectory.open_existing(path))
        print(f"report: {written}")
    print(compare(args.run_dirs, out_dir=args.out))
    return 0


def command_models(_args: argparse.Namespace) -> int:
    from fedward.models import list_models

    print("\n".join(list_models()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    try:
        if unknown:
            if args.command != "run":
                parser.error(f"unrecognized arguments: {' '.join(unknown)}")
            _reject_dead_flags(unknown)
        handler = {"run": command_run, "report": command_report, "models": command_models}[args.command]
        return handler(args)
    except FedwardError as err:
        print(f"fedward: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = getattr(args, "resume", None)
        hint = f"; continue with: fedward run --resume {resume}" if resume else ""
        print(f"\nfedward: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
