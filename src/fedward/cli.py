"""Command line: ``fedward run``, ``fedward report``, ``fedward models``, ``fedward prior``, ``fedward data``.

``fedward run`` accepts the Fed-MAS reference code's flags (``--method``, ``--client_number``,
``--comm_round``, ``--adam``, ``--loss_fn_name``, ...), so its README commands work with
``python main.py`` replaced by ``fedward run``. Errors the user can fix print one line and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, Sequence

from fedward import __version__
from fedward.algorithms import list_methods
from fedward.config import COMMON_FIELDS, DEAD_REFERENCE_FLAGS, all_setting_names, build_config, load_yaml, option_owners
from fedward.data import list_datasets
from fedward.errors import ConfigError, FedwardError
from fedward.options import default_of, is_bool

DOWNLOADABLE = ("isic2019",)  # `fedward data download NAME`


def _add_run_parser(subparsers, shown: dict[str, str | None]) -> None:
    run = subparsers.add_parser("run", help="train a federated run", argument_default=argparse.SUPPRESS,
                                allow_abbrev=False,
                                description="Train a method on a federated data set and write a run directory. "
                                            "`fedward run --method X --help` shows only X's options.")
    run.add_argument("--config", help="YAML file of run settings (flags override it)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    _add_config_flags(run, shown)


def _flag_names(name: str) -> list[str]:
    """The flag and its kebab-case spelling (one style for every command; the reference's names stay)."""
    kebab = name.replace("_", "-")
    return [f"--{kebab}", f"--{name}"] if kebab != name else [f"--{name}"]


def _add_flag(group, f, help_text: str) -> None:
    const = f.metadata.get("const")
    if is_bool(f):
        # `--adam` alone means true (as in the reference); `--adam false` is accepted too.
        group.add_argument(*_flag_names(f.name), dest=f.name, nargs="?", const="true", metavar="BOOL", help=help_text)
    elif const is not None:
        group.add_argument(*_flag_names(f.name), dest=f.name, nargs="?", const=const, metavar="VALUE", help=help_text)
    else:
        group.add_argument(*_flag_names(f.name), dest=f.name, metavar=f.name.upper(), help=help_text)


def _add_config_flags(parser, shown: dict[str, str | None]) -> None:
    """One flag per setting: the common ones, then one group per set of methods and data sets that
    share options. ``shown``: the method and data set named on the command line; the help shows
    only their options then."""
    for name, f in COMMON_FIELDS.items():
        choices = f.metadata.get("choices")
        if name == "method":
            text = f"training method: {', '.join(list_methods())}"
        elif name == "dataset":
            text = f"data set: {', '.join(list_datasets())}; --data_dir alone means fed_isic2019"
        else:
            text = f.metadata["help"] + (f" ({'|'.join(choices)})" if choices else "")
        _add_flag(parser, f, f"{text} (default: {default_of(f)})")
    groups: dict[tuple[tuple[str, ...], tuple[str, ...]], list[str]] = {}
    owners = option_owners()
    for name, entries in owners.items():
        key = (tuple(o for kind, o, _ in entries if kind == "method"), tuple(o for kind, o, _ in entries if kind == "dataset"))
        groups.setdefault(key, []).append(name)
    for (methods, datasets), names in groups.items():
        title = " and ".join(part for part in (f"--method {', '.join(methods)}" if methods else "",
                                               f"--dataset {', '.join(datasets)}" if datasets else "") if part)
        visible = ((shown["method"] is None or shown["method"] in methods) if methods else True) and \
                  ((shown["dataset"] is None or shown["dataset"] in datasets) if datasets else True)
        group = parser.add_argument_group(f"options of {title}")
        for name in names:
            fields_ = [f for _, _, f in owners[name]]
            defaults = {owner: default_of(f) for _, owner, f in owners[name]}
            # the most common default, then the owners that default otherwise
            counts: dict[str, int] = {}
            for value in defaults.values():
                counts[repr(value)] = counts.get(repr(value), 0) + 1
            usual = max(counts, key=counts.get)
            shown_default = "; ".join([str(next(v for v in defaults.values() if repr(v) == usual))] + [
                f"{owner}: {value}" for owner, value in defaults.items() if repr(value) != usual])
            choices = fields_[0].metadata.get("choices")
            text = fields_[0].metadata["help"] + (f" ({'|'.join(choices)})" if choices else "") + \
                f" (default: {shown_default})"
            _add_flag(group, fields_[0], text if visible else argparse.SUPPRESS)


def _add_flower_parser(subparsers, shown: dict[str, str | None]) -> None:
    from fedward.flower import DEFAULT_NODE_PORT, DEFAULT_PORT  # no Flower import: `fedward run` works without it
    from fedward.flower.supernode import DEFAULT_IDLE_POLL

    flower = subparsers.add_parser("flower", help="run methods across machines on Flower (SuperLink + SuperNodes)",
                                   description="A real deployment: one SuperLink (server), one SuperNode per hospital.")
    actions = flower.add_subparsers(dest="flower_command", required=True)
    link = actions.add_parser("superlink", help="start the server (Flower SuperLink)")
    link.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0, all interfaces)")
    link.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port for nodes and runs (default: {DEFAULT_PORT})")
    link.add_argument("--certs", metavar="DIR", help="folder with ca.crt, server.pem, server.key (`fedward flower certs`)")
    link.add_argument("--insecure", action="store_true", help="no TLS (a trial on one machine only)")
    link.add_argument("--database", metavar="FILE", help="SQLite file for the SuperLink's state (default: in memory)")
    link.add_argument("--simulation", action="store_true", help="run ClientApps in Flower's simulation runtime (Ray) instead of on SuperNodes")
    link.add_argument("--auth", action="store_true", help="SuperNode authentication: only nodes whose public key was "
                                                          "registered (`fedward flower register-node`) may connect; needs --certs")

    node = actions.add_parser("supernode", help="start a hospital's node (Flower SuperNode)")
    node.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    node.add_argument("--client-id", type=int, required=True, help="this hospital's index in the federation (0..K-1)")
    node.add_argument("--data", metavar="DIR", help="this hospital's data (default: the run's data_dir; none for synthetic data)")
    node.add_argument("--state-dir", metavar="DIR", help="where this client's state and personalised model are kept "
                                                         "(default: $FEDWARD_CACHE/flower-nodes)")
    node.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    node.add_argument("--prior-path", metavar="FILE", help="Fed-MAS prior checkpoint on this machine")
    node.add_argument("--port", type=int, default=DEFAULT_NODE_PORT,
                      help=f"local ClientApp port; nodes on one machine need distinct ones (default: {DEFAULT_NODE_PORT})")
    node.add_argument("--ca-cert", metavar="FILE", help="CA certificate that signed the SuperLink's (ca.crt)")
    node.add_argument("--insecure", action="store_true", help="no TLS (a trial on one machine only)")
    node.add_argument("--auth-key", metavar="FILE", help="this node's private key (node-<k>.key from `fedward flower "
                                                         "certs --nodes`) for a SuperLink started with --auth")
    node.add_argument("--idle-poll", type=float, default=DEFAULT_IDLE_POLL, metavar="S",
                      help="the longest the SuperNode sleeps between pulls while idle or waiting (Flower's own: "
                           f"3 s idle, 0.5 s waiting; default: {DEFAULT_IDLE_POLL})")
    node.add_argument("--warm-worker", action=argparse.BooleanOptionalAction, default=True,
                      help="run the node's messages in one warm process beside the SuperNode instead of a fresh "
                           "ClientApp process each (default: on)")
    node.add_argument("--fork-server", action=argparse.BooleanOptionalAction, default=True,
                      help="fork each ClientApp process from a warm one (imports done once) instead of starting "
                           "Flower's flwr-clientapp cold for every message (default: on)")

    register = actions.add_parser("register-node", help="allow a SuperNode's public key on a SuperLink started with --auth")
    register.add_argument("public_key", metavar="FILE", help="the node's public key (node-<k>.pub)")
    register.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    register.add_argument("--ca-cert", metavar="FILE", help="CA certificate that signed the SuperLink's")
    register.add_argument("--insecure", action="store_true", help="no TLS")

    run = actions.add_parser("run", help="submit a run to a SuperLink and stream its log",
                             argument_default=argparse.SUPPRESS, allow_abbrev=False,
                             description="Submit a fedward run (the same settings as `fedward run`) to a SuperLink. "
                                         "The run directory is written on the SuperLink's machine.")
    run.add_argument("--config", help="YAML file of run settings (flags override it)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run directory from its last checkpoint")
    run.add_argument("--superlink", metavar="HOST:PORT", help=f"the SuperLink (default: 127.0.0.1:{DEFAULT_PORT})")
    run.add_argument("--ca-cert", metavar="FILE", help="CA certificate that signed the SuperLink's")
    run.add_argument("--insecure", action="store_true", help="no TLS")
    run.add_argument("--simulation", type=int, metavar="N", help="instead: Flower's simulation runtime (Ray) with N "
                                                                 "virtual nodes on this machine")
    run.add_argument("--min-clients", type=int, help="fewest usable replies a round may aggregate (default: all clients)")
    run.add_argument("--round-timeout", type=float, help="seconds a round waits for replies (default: 600)")
    run.add_argument("--join-timeout", type=float, help="seconds to wait for the clients to connect (default: 300)")
    run.add_argument("--drill-bad-reply", metavar="CLIENT:ROUND:KIND", help="fire drill: that client sends a "
                                                                            "nan, inf or shape-broken reply in that round")
    _add_config_flags(run, shown)

    certs = actions.add_parser("certs", help="write a development CA and server certificate")
    certs.add_argument("folder", metavar="DIR")
    certs.add_argument("--host", action="append", default=[], help="server host name or IP (repeatable; localhost always)")
    certs.add_argument("--days", type=int, default=365, help="validity (default: 365)")
    certs.add_argument("--nodes", type=int, default=0, metavar="N", help="also a key pair per SuperNode 0..N-1 "
                                                                        "(node-<k>.key, node-<k>.pub) for --auth")

    app = actions.add_parser("app", help="write the Flower App folder (for plain `flwr run`)")
    app.add_argument("folder", metavar="DIR")


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; ``argv`` is scanned for --method/--dataset, whose options alone the help shows."""
    shown = {name: (_scan(argv, name) or "").lower() or None for name in ("method", "dataset")}
    parser = argparse.ArgumentParser(prog="fedward", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"fedward {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run_parser(subparsers, shown)
    report = subparsers.add_parser("report", help="summarise and plot one or more run directories")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", help="folder for the comparison plot (default: beside the first run)")
    dashboard = subparsers.add_parser(
        "dashboard", help="a live web view of runs (TensorBoard): curves, participation, aggregation weights",
        description="Serve TensorBoard over run directories (or folders of runs) on this machine; it follows "
                    "runs that are still writing.")
    dashboard.add_argument("run_dirs", nargs="*", default=["runs"], metavar="RUN_DIR",
                           help="run directories or folders of runs (default: runs)")
    dashboard.add_argument("--port", type=int, default=6006, help="port (default: 6006)")
    dashboard.add_argument("--host", default="127.0.0.1",
                           help="address to listen on (default: 127.0.0.1, this machine only)")
    subparsers.add_parser("models", help="list the registered models")
    methods = subparsers.add_parser("methods", help="list the registered methods and data sets")
    methods.add_argument("--markdown", action="store_true", help="every option as Markdown tables (docs/options.md)")
    _add_prior_parser(subparsers)
    _add_flower_parser(subparsers, shown)
    _add_reproduce_parser(subparsers)
    data = subparsers.add_parser("data", help="download, check or prepare a data folder")
    data_actions = data.add_subparsers(dest="data_command", required=True)
    check = data_actions.add_parser("check", help="report clients, classes and counts of a data folder, without training",
                                    description="Load a data folder as a run would (decoding images into the cache) "
                                                "and report what was found; bad files are errors that name them.")
    check.add_argument("data_dir", metavar="DIR")
    check.add_argument("--dataset", default="fed_isic2019", help="fed_isic2019 (default), medmnist or folders")
    check.add_argument("--data_flag", help="--dataset medmnist: the <flag>.npz to read (default: dermamnist)")
    check.add_argument("--image_size", type=int, default=32, help="decoding size (default: 32)")
    check.add_argument("--skip_bad_images", action="store_true", help="list unreadable images instead of stopping")
    prepare = data_actions.add_parser("prepare", help="FLamby's ISIC 2019 preprocessing (resumable, parallel)",
                                      description="Resize the raw ISIC 2019 JPEGs (short side to --size, aspect kept) "
                                                  "and apply Shades-of-Gray colour constancy (p = 6), as FLamby does.")
    prepare.add_argument("name", choices=["isic2019"])
    prepare.add_argument("--src", required=True, metavar="RAW", help="folder of the raw ISIC_2019_Training_Input JPEGs")
    prepare.add_argument("--dst", required=True, metavar="DIR",
                         help="output folder (FLamby calls it ISIC_2019_Training_Input_preprocessed)")
    prepare.add_argument("--size", type=int, default=224, help="short side after resizing (default: 224)")
    prepare.add_argument("--workers", type=int, default=None, help="processes (default: up to 4)")
    download = data_actions.add_parser("download", help="fetch a public data set (resumable, content-checked)",
                                       description="isic2019: the ISIC 2019 training images, metadata and ground "
                                                   "truth (CC BY-NC 4.0) and FLamby's split file, extracted and "
                                                   "checked into the layout `--dataset fed_isic2019` reads.")
    download.add_argument("name", help=f"data set: {', '.join(DOWNLOADABLE)}")
    download.add_argument("--to", required=True, metavar="DIR", help="target folder (later: --data_dir DIR)")
    download.add_argument("--accept-licence", action="store_true", help="accept the data licence non-interactively")
    download.add_argument("--no-progress", action="store_true", help="no progress bars")
    download.add_argument("--prepare", action="store_true", help="then preprocess as `fedward data prepare` does, ready for `fedward run`")
    download.add_argument("--delete-zip", action="store_true", help="delete the zip once extracted (default: keep)")
    return parser


def _add_reproduce_parser(subparsers) -> None:
    from fedward.reproduce import TABLES

    reproduce = subparsers.add_parser(
        "reproduce", help="run a paper table (every method, same budget, several seeds) and write it",
        description="Run (or reuse, or resume) every run of a paper table for each seed and write the table as "
                    "Markdown and CSV: per-client and mean ACC/MF1, mean ± std and a 95% interval, next to the "
                    "paper's numbers.")
    reproduce.add_argument("table", choices=sorted(TABLES), help="the table")
    reproduce.add_argument("--data_dir", "--data-dir", help="the real data set (default: the built-in synthetic set)")
    reproduce.add_argument("--seeds", type=int, default=5, help="number of seeds, 0 .. N-1 (default: 5)")
    reproduce.add_argument("--rounds", type=int, help="rounds per run (default: the table's)")
    reproduce.add_argument("--image_size", "--image-size", type=int, help="image size (default: the table's)")
    reproduce.add_argument("--homogeneous_model", "--homogeneous-model",
                           help="mhpflid-breakhis: the one architecture of the homogeneous baselines (default: "
                                "resnet17)")
    reproduce.add_argument("--only", nargs="+", metavar="ROW", help="only these rows or runs (labels as in the table)")
    reproduce.add_argument("--out", help="folder of the runs and the table (default: runs/reproduce-<table>)")
    reproduce.add_argument("--jobs", type=int, default=1,
                           help="runs trained at once, each in its own process with cores/jobs torch threads "
                                "(default: 1; a CPU run's last bits depend on its thread count)")


def _add_prior_parser(subparsers) -> None:
    from fedward.selfsup.moco import MocoSettings

    prior = subparsers.add_parser("prior", help="download or train a Fed-MAS prior")
    actions = prior.add_subparsers(dest="prior_command", required=True)
    download = actions.add_parser("download", help="fetch a public prior checkpoint (resumable, checksum-verified)",
                                  description="Fetch moco (alias moco-v2), IMAGENET1K_V1 or 18_img into a folder.")
    download.add_argument("name", help="moco-v2 | moco | IMAGENET1K_V1 | 18_img")
    download.add_argument("--to", metavar="DIR", help="target folder (default: $FEDWARD_CACHE/priors, where runs look)")
    download.add_argument("--accept-licence", action="store_true", help="accept the weights' licence non-interactively")
    download.add_argument("--no-progress", action="store_true", help="no progress bar")

    train = actions.add_parser("train", help="train a MoCo-v2 prior on unlabelled images",
                               description="Self-supervised MoCo-v2 training on a folder of images (or the built-in "
                                           "data set's public split); saves the MoCo checkpoint format.")
    train.add_argument("--images", metavar="DIR", help="folder of unlabelled images (default: the synthetic public split)")
    train.add_argument("--public_images", type=int, default=3072, help="size of the synthetic public split (default: 3072)")
    train.add_argument("--data_seed", type=int, default=0, help="synthetic world the public split is drawn from (default: 0)")
    train.add_argument("--out", metavar="FILE", help="checkpoint to write (default: moco_v2_<arch>_<size>px_selfsup.pth.tar)")
    train.add_argument("--resume", action="store_true", help="continue the training saved in --out")
    train.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    train.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    for field, value in MocoSettings().__dict__.items():
        train.add_argument(f"--{field}", type=type(value), default=value, help=f"(default: {value})")


class _Parser(argparse.ArgumentParser):
    """No abbreviations anywhere: a prefix of a flag is never taken for the flag."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def _scan(argv: Sequence[str], name: str) -> str | None:
    """The value of --name in argv, if given (before parsing)."""
    for i, token in enumerate(argv):
        for flag in _flag_names(name):
            if token == flag and i + 1 < len(argv):
                return argv[i + 1]
            if token.startswith(flag + "="):
                return token.split("=", 1)[1]
    return None


def _preload_plugins(argv: Sequence[str]) -> None:
    """Import the run's plugins before the parser is built, so their methods' flags exist."""
    specs = [p.strip() for p in (_scan(argv, "plugins") or "").split(",") if p.strip()]
    if specs:
        from fedward.plugins import load_plugins

        load_plugins(specs)
    config = _scan(argv, "config")
    if config:
        try:
            load_yaml(config)  # imports the plugins the file lists
        except ConfigError:
            pass  # the config is read again, and its errors reported, after parsing


def _reject_dead_flags(unknown: Sequence[str]) -> None:
    for token in unknown:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            if name in DEAD_REFERENCE_FLAGS:
                raise ConfigError(f"--{name} is not accepted: {DEAD_REFERENCE_FLAGS[name]}")
            raise ConfigError(f"unknown flag --{name}; see `fedward run --help`")
    if unknown:
        raise ConfigError(f"unexpected argument(s): {' '.join(unknown)}")


def command_run(args: argparse.Namespace) -> int:
    from fedward.engine.simulation import prepare, print_summary, run
    from fedward.tracking import RunDirectory

    flags = {k: v for k, v in vars(args).items() if k in all_setting_names()}
    if getattr(args, "resume", None):
        if flags or getattr(args, "config", None):
            allowed = {"progress"}
            extra = sorted(set(flags) - allowed) + (["config"] if getattr(args, "config", None) else [])
            if extra:
                raise ConfigError(f"--resume continues the saved config of the run; drop --{', --'.join(extra)}")
        run_dir = RunDirectory.open_existing(args.resume)
        cfg = build_config({**run_dir.read_config(), **flags})
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


def command_flower(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedward.flower import require_flwr

    action = args.flower_command
    if action == "app":
        from fedward.flower.app import write_app

        print(f"Flower App written: {write_app(args.folder)} (run it with `flwr run {args.folder} <connection>`)")
        return 0
    require_flwr()  # Flower brings `cryptography` too
    from fedward.flower import launch

    if action == "certs":
        from fedward.flower.tls import generate_certificates

        from fedward.flower.tls import generate_node_keys

        if args.nodes < 0:
            raise ConfigError(f"--nodes {args.nodes}: expected 0 or more")
        paths = generate_certificates(args.folder, args.host, days=args.days)
        paths.update(generate_node_keys(args.folder, range(args.nodes)))
        print("\n".join(f"{name}: {path}" for name, path in paths.items()))
        return 0
    if action == "register-node":
        return launch.register_node(args.public_key, superlink=args.superlink, ca_cert=args.ca_cert,
                                    insecure=args.insecure)
    if action == "superlink":
        launch.exec_command(launch.superlink_command(host=args.host, port=args.port, certs=args.certs,
                                                     insecure=args.insecure, database=args.database,
                                                     simulation=args.simulation, auth=args.auth), launch.flower_env())
    if action == "supernode":
        state_dir = args.state_dir
        from fedward.flower.node import default_state_dir

        home = Path(state_dir or default_state_dir()) / "flower-home" / f"client-{args.client_id}"
        env = launch.flower_env(None if "FLWR_HOME" in os.environ else home)
        from fedward.flower.worker import socket_path

        worker = str(socket_path(os.getpid())) if args.warm_worker else None  # exec keeps this pid
        command = launch.supernode_command(
            superlink=args.superlink, client_id=args.client_id, data=args.data, state_dir=state_dir, port=args.port,
            ca_cert=args.ca_cert, insecure=args.insecure, device=args.device, prior_path=args.prior_path,
            auth_key=args.auth_key, worker_socket=worker)  # checks every flag before anything starts
        if args.idle_poll <= 0:
            raise ConfigError(f"--idle-poll {args.idle_poll:g}: expected a positive number of seconds")
        from fedward.flower.superexec import FORK_SERVER_ENV
        from fedward.flower.supernode import IDLE_POLL_ENV

        env[IDLE_POLL_ENV] = str(args.idle_poll)
        env[FORK_SERVER_ENV] = "1" if args.fork_server else "0"
        if worker:
            launch.start_worker(worker, env)
        launch.exec_command(command, env)
    # run
    flags = {k: v for k, v in vars(args).items() if k in all_setting_names()}
    resume = getattr(args, "resume", None)
    if resume:
        from fedward.tracking import RunDirectory

        if flags or getattr(args, "config", None):
            raise ConfigError("--resume continues the saved config of the run; drop the other run settings")
        existing = RunDirectory.open_existing(resume)
        run_dir = existing.path.resolve()
        cfg = build_config(existing.read_config())
    else:
        values: dict[str, Any] = load_yaml(args.config) if getattr(args, "config", None) else {}
        values.update(flags)
        cfg = build_config(values)
        if not cfg.output:
            import time

            from fedward.tracking.rundir import new_run_folder

            cfg.output = str(new_run_folder(Path("runs") / f"{cfg.method}-{cfg.loss_fn_name}-seed{cfg.seed}-flower-"
                                                           f"{time.strftime('%Y%m%d-%H%M%S')}"))
        run_dir = Path(cfg.output).resolve()
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"run directory {run_dir} exists and is not empty; choose another --output or --resume it")
    overrides = launch.run_config_overrides(
        cfg, run_dir=run_dir, resume=bool(resume), min_clients=getattr(args, "min_clients", 0) or 0,
        round_timeout=getattr(args, "round_timeout", 600.0), join_timeout=getattr(args, "join_timeout", 300.0),
        drill_bad_reply=getattr(args, "drill_bad_reply", "") or "")
    simulation = getattr(args, "simulation", 0) or 0
    insecure = getattr(args, "insecure", False)
    ca_cert = getattr(args, "ca_cert", None)
    superlink = getattr(args, "superlink", None) or f"127.0.0.1:{launch.DEFAULT_PORT}"
    print(f"fedward: run directory (on the SuperLink's machine): {run_dir}", file=sys.stderr)
    return launch.submit(overrides, superlink=superlink, ca_cert=ca_cert, insecure=insecure, simulation=simulation)


def command_report(args: argparse.Namespace) -> int:
    from fedward.tracking import RunDirectory
    from fedward.tracking.report import compare, write_report

    for path in args.run_dirs:
        written = write_report(RunDirectory.open_existing(path))
        print(f"report: {written}")
    print(compare(args.run_dirs, out_dir=args.out))
    from pathlib import Path

    from fedward.tracking.report import COMPARISON_CSV, COMPARISON_HTML

    folder = Path(args.out) if args.out else RunDirectory.open_existing(args.run_dirs[0]).path.resolve().parent
    print(f"comparison: {folder / COMPARISON_HTML}, {folder / COMPARISON_CSV}")
    return 0


def command_dashboard(args: argparse.Namespace) -> int:
    from fedward.tracking.dashboard import serve

    serve(args.run_dirs, host=args.host, port=args.port)
    return 0


def command_methods(args: argparse.Namespace) -> int:
    from fedward import catalog

    print(catalog.markdown() if args.markdown else catalog.text(), end="\n" if not args.markdown else "")
    return 0


def command_models(_args: argparse.Namespace) -> int:
    from fedward.models import list_models

    print("\n".join(list_models()))
    return 0


def command_prior(args: argparse.Namespace) -> int:
    if args.prior_command == "download":
        from fedward.priors import download_prior

        path = download_prior(args.name, args.to, accept_licence=args.accept_licence, progress=not args.no_progress)
        print(f"prior ready: {path}")
        return 0
    return _prior_train(args)


def _prior_train(args: argparse.Namespace) -> int:
    import torch

    from fedward.engine.setup import notice
    from fedward.selfsup.moco import MocoSettings, train_moco

    settings = MocoSettings(**{k: getattr(args, k) for k in MocoSettings().__dict__})
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device != "cpu" and not torch.cuda.is_available():
        notice(f"--device {args.device}: no GPU available; training on the CPU")
        args.device = "cpu"
    labels = None
    if args.images:
        from fedward.selfsup.images import read_image_folder

        images, source = read_image_folder(args.images, settings.image_size, progress=not args.no_progress), args.images
    else:
        from fedward.data.synthetic import public_split

        public = public_split(seed=args.data_seed, image_size=settings.image_size, count=args.public_images)
        images, labels = public.images, public.labels
        source = f"synthetic public split (data_seed {args.data_seed}, {len(images)} images)"
    out = args.out or f"moco_v2_{settings.arch}_{settings.image_size}px_selfsup.pth.tar"
    summary = train_moco(images, settings, out, labels=labels, source=source, resume=args.resume,
                         progress=not args.no_progress, device=args.device, log=notice)
    for row in summary["history"][-3:]:
        print(f"epoch {row['epoch']}: InfoNCE {row['loss']:.3f}, positive ranked first {row['contrastive_accuracy']:.3f}")
    if labels is not None:
        print(f"kNN accuracy of the features (labels used for this check only): {summary['knn_before']:.3f} at "
              f"random init -> {summary['knn_after']:.3f}")
    print(f"prior written: {out} (use it with --pre_trained_models {out})")
    return 0


def command_data(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.data_command == "prepare":
        from fedward.data.prepare import prepare_isic2019

        counts = prepare_isic2019(Path(args.src), Path(args.dst), size=args.size, workers=args.workers)
        print(f"prepared {counts['done']} images, {counts['skipped']} already done: {args.dst}")
        return 0
    if args.data_command == "download":
        if args.name not in DOWNLOADABLE:
            raise ConfigError(f"unknown data set {args.name!r} to download; known: {', '.join(DOWNLOADABLE)}")
        from fedward.data.download_isic import download_isic2019

        download_isic2019(args.to, accept_licence=args.accept_licence, progress=not args.no_progress,
                          prepare=args.prepare, delete_zip=args.delete_zip)
        return 0

    from fedward.engine.setup import load_data
    from fedward.tracking.report import format_table

    if not Path(args.data_dir).exists():
        raise ConfigError(f"data folder {args.data_dir} does not exist")
    values = {"dataset": args.dataset, "data_dir": args.data_dir, "image_size": args.image_size, "progress": True}
    from fedward.data import get_dataset
    from fedward.options import option_fields

    own = {f.name for f in option_fields(get_dataset(args.dataset).Options)}
    for name, value in (("data_flag", args.data_flag), ("skip_bad_images", args.skip_bad_images or None)):
        if value is not None:  # given: it must be one of the data set's options
            if name not in own:
                raise ConfigError(f"--{name} does not apply to --dataset {args.dataset}")
            values[name] = value
    cfg = build_config(values)
    data = load_data(cfg)
    header = ["client", "split", *data.class_names, "total"]
    body = []
    for client in data.clients:
        for split in ("train", "val", "test"):
            counts = getattr(client, split).class_counts(data.num_classes).tolist()
            body.append([f"{client.client_id} {client.name}", split, *map(str, counts), str(sum(counts))])
    pooled = {split: data.class_counts(split).sum(dim=0).tolist() for split in ("train", "val", "test")}
    body += [["all", split, *map(str, counts), str(sum(counts))] for split, counts in pooled.items()]
    print(f"{data.name}: {data.num_clients} clients, {data.num_classes} classes, images decoded at "
          f"{data.image_size} px" + (f" ({data.info['layout']} layout)" if data.info.get("layout") else ""))
    print(format_table(header, body, left_columns=2))
    missing = [(c.name, data.class_names[k]) for c in data.clients for k in range(data.num_classes)
               if c.test.class_counts(data.num_classes)[k] > 0 and c.train.class_counts(data.num_classes)[k] == 0]
    for name, cls in missing:
        print(f"note: {name} has class {cls} in test but not in train")
    skipped = data.info.get("skipped_bad_images") or data.info.get("bad_images")
    if skipped:
        print(f"unreadable images skipped: {skipped}")
    return 0


def command_reproduce(args) -> int:
    from pathlib import Path

    from fedward.reproduce import TABLES, reproduce

    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: expected at least 1")
    if args.rounds is not None and args.rounds < 1:
        raise ConfigError(f"--rounds {args.rounds}: expected at least 1")
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: expected at least 1")
    if args.data_dir and not Path(args.data_dir).exists():
        raise ConfigError(f"--data_dir {args.data_dir} does not exist")
    options = {"data_dir": args.data_dir, "rounds": args.rounds, "image_size": args.image_size,
               "homogeneous_model": args.homogeneous_model}
    table = TABLES[args.table]
    unused = [name for name, value in options.items() if value is not None and name not in table.accepts]
    if unused:
        raise ConfigError(f"--{unused[0]} does not apply to the {args.table} table (it takes "
                          f"{', '.join('--' + name for name in table.accepts)})")
    out = Path(args.out or Path("runs") / f"reproduce-{args.table}")
    files = reproduce(table, out=out, seeds=list(range(args.seeds)), options=options, only=args.only,
                      jobs=args.jobs)
    print(files["markdown"].read_text())
    print("written: " + ", ".join(str(p) for p in files.values()))
    return 0


@contextlib.contextmanager
def _warnings_as_log_lines():
    """fedward's own warnings become one timestamped log line each (in log.txt too), without the
    source path and line a raw Python warning prints; other libraries' warnings are left as they are."""
    import warnings
    from pathlib import Path

    from fedward import logs

    package, shown = str(Path(__file__).resolve().parent), warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if str(Path(filename).resolve()).startswith(package):
            logs.warning(f"warning: {message}")
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _preload_plugins(argv)
    except FedwardError as err:
        print(f"fedward: error: {err}", file=sys.stderr)
        return 2
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    try:
        if unknown:
            if args.command != "run":
                parser.error(f"unrecognized arguments: {' '.join(unknown)}")
            _reject_dead_flags(unknown)
        handler = {"run": command_run, "report": command_report, "models": command_models, "methods": command_methods,
                   "prior": command_prior, "data": command_data, "flower": command_flower,
                   "reproduce": command_reproduce, "dashboard": command_dashboard}[args.command]
        with _warnings_as_log_lines():
            return handler(args)
    except FedwardError as err:
        print(f"fedward: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "dashboard":
            return 0
        resume = getattr(args, "resume", None)
        hint = f"; continue with: fedward run --resume {resume}" if resume else ""
        print(f"\nfedward: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
