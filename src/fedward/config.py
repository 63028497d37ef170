"""Run configuration: the common settings of every run, plus the chosen method's and data set's options.

Settings are declared once, as :func:`fedward.options.option` fields: the common ones here
(:class:`RunConfig`), each method's on its class (``Algorithm.Options``), each data set's in its
module (``Options``). The CLI, ``fedward run --help``, YAML keys and validation are derived from
them. A setting that belongs to another method or data set is an error naming its owners; flags
the Fed-MAS reference declares but never uses are rejected with the reason
(``DEAD_REFERENCE_FLAGS``). Field names are the reference's flag names, so the seed's README
commands work with ``python main.py`` replaced by ``fedward run``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedward.errors import ConfigError, FedwardError
from fedward.options import (
    NON_NEGATIVE, POSITIVE, as_dict, at_least, build_options, check_value, coerce, default_of, option, option_fields,
)

AUGMENT_BACKENDS = ("torch", "opencv")  # fedward.data.augment.BatchAugment(backend=...)

PARTITION_METHODS = ("natural", "homo", "iid", "hetero", "dirichlet", "pathological")
# Keys a run directory's config.yaml carries for information; a config file may hold them.
INFO_KEYS = ("class_names", "client_names", "fedward_version")

# Flags of the reference code that fedward rejects, each with the reason: no effect there, or a
# crash or bug there (fedmas.md section 7 item 11, 6.3).
DEAD_REFERENCE_FLAGS: dict[str, str] = {
    "balanced_free": "the reference crashes with it on the first batch when --free_u > 0 (its class-weighted "
                     "alignment loss has shape (1, B), which the class-wise accumulation rejects), and with --free_u 0 "
                     "it has no effect",
    "multi_step": "with --adjust_learning_rate the reference multiplies the lr by 0.1 at every round from 60 on, "
                  "compounding through the saved optimizer state (a bug); fedward has the cosine schedule only",
    "adam_w": "the reference crashes with it (torch's Adam has no 'wd' argument); use --adamw",
    "validate_client_every": "it only sets how often the reference's --validate_client evaluates (training and "
                             "aggregation do not change); fedward's --eval_every sets the cadence of every evaluation",
    "distill_u": "its 'global' distillation loss is the constant 0 in the reference code",
    "ramp_fed": "it has no effect on the fedavg/fedmas paths of the reference code",
    "update_encoder": "it has no effect on the fedavg/fedmas paths of the reference code",
    "fusion": "it has no effect on the fedavg/fedmas paths of the reference code",
    "add_free_projector": "it has no effect in the reference code",
    "blur": "the reference always applies its Gaussian blur; use --augment false to turn augmentation off",
    "blur_prob": "the reference always applies its Gaussian blur",
    "cosine_restart_n": "it has no effect in the reference code",
    "pretrained": "it has no effect in the reference code; use --pre_trained_tv",
    "aug": "the reference ignores it; use --augment true|false",
    "save_free_losses": "fedward logs the class-wise divergences in metrics.jsonl instead",
    "save_client": "it crashes in the reference code; per-client models are saved in the run directory",
    "update_clients": "clients always load the global model (the reference default)",
    "client_sample": "use --clients_per_round (the reference's client sampling crashes when a client first takes "
                     "part after round 0: it has no saved optimizer state)",
}


def _loss_names() -> tuple[str, ...]:
    from fedward.losses import LOSS_NAMES

    return LOSS_NAMES


@dataclass
class RunConfig:
    """The settings every run has; ``method_options`` and ``data_options`` hold the chosen method's
    and data set's, readable as attributes of the config (``cfg.mu`` on a FedProx run)."""

    # -- what runs
    method: str = option("fedavg", "training method (see the method groups below)")
    dataset: str | None = option(None, "data set (see the data-set groups below; default: the method's own, synthetic "
                                       "or synthetic_multires, and with --data_dir alone fed_isic2019 or breakhis)")
    comm_round: int = option(10, "number of communication rounds", check=at_least(1))
    batch_size: int = option(64, "training batch size (the last incomplete batch is dropped, as in the reference)",
                             check=at_least(1))
    loss_fn_name: str = option("CE", "local loss: CE, BSM, focal, LDAM, CB, RW, LCC, FLAMBY_FOCAL")
    grad_clip: float | None = option(None, "gradient-norm clip (default: the method's, e.g. 5 for moon and fedmas, "
                                           "1 for mhpflid, 10 for fml and fedkd, none for fedavg)", check=POSITIVE)
    persist_optimizer_state: bool = option(True, "keep each client's optimizer state across rounds (reference: true)")
    stem: str = option("imagenet", "ResNet stem: imagenet (torchvision), medium, small, or auto (by image size: finer "
                                   "and slower for small images)", choices=("auto", "imagenet", "medium", "small"))
    augment: bool = option(True, "batched train augmentation of the reference (flips, blur, rotation)")
    augment_backend: str = option("auto", "who applies --augment's ops (same parameters, same ops, equal up to float "
                                          "rounding): torch (batched tensor ops), opencv (per image; faster on a CPU "
                                          "from about 96 px), or auto: opencv on a CPU from 96 px, torch otherwise",
                                  choices=("auto", *AUGMENT_BACKENDS))
    # The reference blurs the ~1024 px ISIC original before resizing to 224 (an effective scale of
    # about 224/1024); None: image_size / 1024, the same relative blur.
    blur_scale: float | None = option(None, "blur sigma/kernel factor (default image_size/1024: the reference's blur "
                                            "of ~1024 px originals)", check=POSITIVE)
    # -- data
    data_dir: str | None = option(None, "data folder of a real data set (Fed-ISIC2019 in the FLamby or Fed-MAS layout "
                                        "when --dataset is not given)")
    data_seed: int = option(0, "seed of the generated data set and its partition (--seed varies training only)")
    image_size: int = option(32, "image side in pixels", check=at_least(1))
    client_number: int | None = option(None, "number of clients (default: the data set's natural centres)",
                                       check=at_least(1))
    partition_method: str = option("natural", "natural, homo/iid, hetero/dirichlet, pathological",
                                   choices=PARTITION_METHODS, lower=True)
    partition_alpha: float = option(0.5, "Dirichlet concentration for hetero", reference=True)
    classes_per_client: int = option(2, "classes per client for pathological", check=at_least(1))
    # -- participation
    clients_per_round: float = option(0, "clients that train each round, drawn per round from (seed, round): a count "
                                         "K >= 1, a fraction in (0, 1) of the clients (rounded, at least 1), or 0 for "
                                         "every client (Flower's fraction_train, PFLlib's join_ratio)",
                                      check=NON_NEGATIVE)
    # -- evaluation
    validate_client: bool = option(False, "also evaluate each client's local model on its own splits every round")
    eval_every: int = option(1, "evaluate every N rounds (the last round always); 0: only the last", check=NON_NEGATIVE)
    eval_batch_size: int = option(256, "evaluation batch size", check=at_least(1))
    # -- execution
    seed: int = option(0, "random seed")
    thread_number: int = option(1, "reference flag: with --gpu, at most this many GPU workers", check=at_least(1))
    gpu: str | None = option(None, "comma-separated GPU ids (falls back to CPU with a notice when none is present)")
    devices: list[str] = option(factory=list, help="explicit device list, e.g. cpu,cpu for two CPU workers")
    threads: int = option(0, "torch threads per worker (0: cores / workers)", check=NON_NEGATIVE)
    output: str | None = option(None, "run directory")
    checkpoint_every: int = option(1, "checkpoint every N rounds (and the last)", check=at_least(1))
    states_in_memory: int = option(0, "client states (optimizer moments, personalised models, ...) also kept in "
                                      "memory between rounds, least recently used out; 0: each is read back from "
                                      "checkpoints/clients/ when its client trains (memory flat in the number of "
                                      "clients)", check=NON_NEGATIVE)
    keep_checkpoint: bool = option(True, "keep checkpoints/last.pt when the run has finished (false: only the final "
                                         "model files stay; the checkpoint is what --resume and a personalised "
                                         "method's shared part, e.g. MH-pFLID's messenger, live in)")
    offline: bool = option(False, "never download weights: a missing torchvision ImageNet or MoCo-v2 file is an error "
                                  "that names the command fetching it (as FEDWARD_OFFLINE=1)")
    progress: bool = option(True, "show progress bars (on a terminal only; the log lines come whatever stderr is)")
    quiet: bool = option(False, "log warnings and errors only on stderr (log.txt keeps every line)")
    verbose: bool = option(False, "also log one line per client and round")
    plugins: list[str] = option(factory=list, help="Python files (.py) or modules to import first: they register "
                                                   "methods, data sets or models")
    # -- the method's and the data set's own options (not settings themselves)
    method_options: Any = field(default=None, repr=False, init=True, metadata={"group": True})
    data_options: Any = field(default=None, repr=False, init=True, metadata={"group": True})

    def __getattr__(self, name: str) -> Any:
        # Called only when normal lookup fails: the method's and data set's options read as settings.
        for group in ("method_options", "data_options"):
            options = self.__dict__.get(group)
            if options is not None and name in getattr(options, "__dataclass_fields__", {}):
                return getattr(options, name)
        raise AttributeError(f"'{name}' is not a setting of this run (--method {self.__dict__.get('method')}, "
                             f"--dataset {self.__dict__.get('dataset')})")

    def __setattr__(self, name: str, value: Any) -> None:
        for group in ("method_options", "data_options"):
            options = self.__dict__.get(group)
            if options is not None and name in getattr(options, "__dataclass_fields__", {}):
                setattr(options, name, value)
                return
        object.__setattr__(self, name, value)

    def has(self, name: str) -> bool:
        """Whether ``name`` is a setting of this run."""
        return name in COMMON_NAMES or any(
            name in getattr(self.__dict__.get(g), "__dataclass_fields__", {}) for g in ("method_options", "data_options"))

    def updated(self, **changes: Any) -> "RunConfig":
        """A validated copy with some settings changed."""
        return build_config({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Every setting of this run, flat (the keys of config.yaml and of ``fedward run``'s flags)."""
        return {**{name: getattr(self, name) for name in COMMON_NAMES}, **as_dict(self.method_options),
                **as_dict(self.data_options)}


COMMON_FIELDS = {f.name: f for f in option_fields(RunConfig) if not f.metadata.get("group")}
COMMON_NAMES = tuple(COMMON_FIELDS)


def option_owners() -> dict[str, list[tuple[str, str, Any]]]:
    """Every method and data-set option: name -> [(kind 'method'|'dataset', owner, field)]."""
    from fedward.algorithms import METHOD_REGISTRY
    from fedward.data import DATASETS

    owners: dict[str, list[tuple[str, str, Any]]] = {}
    for name, cls in METHOD_REGISTRY.items():
        for f in option_fields(cls.Options):
            owners.setdefault(f.name, []).append(("method", name, f))
    for name, entry in DATASETS.items():
        for f in option_fields(entry.Options):
            owners.setdefault(f.name, []).append(("dataset", name, f))
    return owners


def all_setting_names() -> set[str]:
    return set(COMMON_NAMES) | set(option_owners())


def applicable_settings(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` without the settings that do not apply to its method and data set: for one base
    of settings shared by a grid of methods (a benchmark, a test)."""
    from fedward.algorithms import get_algorithm
    from fedward.data import get_dataset

    method = get_algorithm(values.get("method", default_of(COMMON_FIELDS["method"])))
    own = set(COMMON_NAMES) | {f.name for f in option_fields(method.Options)} | {
        f.name for f in option_fields(get_dataset(resolve_dataset(values)).Options)}
    return {k: v for k, v in values.items() if k in own}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict of settings (checked by :func:`build_config`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not a text file (byte {err.start} is not UTF-8); "
                          "expected a YAML file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:  # an empty file would silently start the full default run
        raise ConfigError(f"config file {path} is empty; expected a mapping of settings (or leave out --config)")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if k not in INFO_KEYS}
    if data.get("plugins"):  # their methods' and data sets' keys are known once they are imported
        from fedward.plugins import load_plugins

        load_plugins(coerce(COMMON_FIELDS["plugins"], data["plugins"]))
    known = all_setting_names()
    for key in data:
        if key in DEAD_REFERENCE_FLAGS:
            raise ConfigError(f"config key '{key}' in {path} is not accepted: {DEAD_REFERENCE_FLAGS[key]}")
        if key not in known:
            raise ConfigError(f"unknown config key '{key}' in {path}; see `fedward run --help` for the keys")
    return data


def resolve_dataset(values: dict[str, Any]) -> str:
    """The data set a run uses: --dataset, or else the method's natural one (``natural_datasets``):
    its built-in set, or with --data_dir alone its real one (the seed's commands give just
    ``--data_dir data/Flamby_isic``; ``--dataset synthetic`` with --data_dir also means fed_isic2019)."""
    from fedward.algorithms import get_algorithm

    built_in, real = get_algorithm(str(values.get("method", default_of(COMMON_FIELDS["method"]))).lower()).natural_datasets
    dataset = values.get("dataset")
    if not dataset:
        return real if values.get("data_dir") is not None else built_in
    dataset = str(dataset).lower()
    if values.get("data_dir") is not None and dataset == "synthetic":
        return "fed_isic2019"
    return dataset


def _not_applicable(name: str, method: str, dataset: str, owners: list[tuple[str, str, Any]]) -> str:
    methods = [owner for kind, owner, _ in owners if kind == "method"]
    datasets = [owner for kind, owner, _ in owners if kind == "dataset"]
    parts = []
    if methods:
        parts.append(f"--method {', '.join(methods)}")
    if datasets:
        parts.append(f"--dataset {', '.join(datasets)}")
    return f"--{name} applies to {' and to '.join(parts)}; this run is --method {method} on --dataset {dataset}"


def _normalised(f, value: Any) -> Any:
    value = coerce(f, value)
    return value.lower() if f.metadata.get("lower") and isinstance(value, str) else value


def build_config(values: dict[str, Any]) -> RunConfig:
    """A validated RunConfig from a dict of settings (file values overridden by flags)."""
    from fedward.algorithms import get_algorithm
    from fedward.data import get_dataset

    values = {k: v for k, v in values.items() if k not in INFO_KEYS}
    if values.get("plugins"):
        from fedward.plugins import load_plugins

        load_plugins(coerce(COMMON_FIELDS["plugins"], values["plugins"]))
    method = str(values.get("method", default_of(COMMON_FIELDS["method"]))).lower()
    algorithm = get_algorithm(method)
    dataset = resolve_dataset(values)
    entry = get_dataset(dataset)
    values = {**algorithm.default_overrides, **values, "method": method, "dataset": dataset}
    method_fields = {f.name: f for f in option_fields(algorithm.Options)}
    data_fields = {f.name: f for f in option_fields(entry.Options)}
    owners = option_owners()
    common, method_values, data_values = {}, {}, {}
    for name, value in values.items():
        if name in DEAD_REFERENCE_FLAGS:
            raise ConfigError(f"--{name} is not accepted: {DEAD_REFERENCE_FLAGS[name]}")
        if name in COMMON_FIELDS:
            common[name] = value
        elif name in method_fields:
            method_values[name] = value
        elif name in data_fields:
            data_values[name] = value
        elif name in owners:
            # A reference flag at its default is what the reference's commands pass to every method.
            if any(f.metadata.get("reference") and _normalised(f, value) == default_of(f) for _, _, f in owners[name]):
                continue
            raise ConfigError(_not_applicable(name, method, dataset, owners[name]))
        else:
            raise ConfigError(f"unknown setting '{name}'; see `fedward run --help`")
    cfg = RunConfig(**{name: check_value(COMMON_FIELDS[name], coerce(COMMON_FIELDS[name], value))
                       for name, value in common.items()},
                    method_options=build_options(algorithm.Options, method_values),
                    data_options=build_options(entry.Options, data_values))
    _validate_common(cfg, entry)
    if cfg.clients_per_round and not algorithm.partial_participation:
        raise ConfigError(f"--clients_per_round does not apply to --method {method}: "
                          + ("it picks its own clients" if method in ("cyclic", "centralized") else
                             "each round needs every client" if method != "local" else "its clients never communicate"))
    algorithm.check_config(cfg)
    return cfg


def completed_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config's settings with every setting it predates at its default (a config of
    another fedward, which does not build, as written): what a run folder stands for today."""
    saved = {k: v for k, v in saved.items() if k not in INFO_KEYS}
    try:
        return build_config(saved).to_dict()
    except FedwardError:
        return saved


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _validate_common(cfg: RunConfig, entry) -> None:
    """Rules across common settings and the data set."""
    if cfg.loss_fn_name.lower() not in {n.lower() for n in _loss_names()}:
        raise ConfigError(f"--loss_fn_name '{cfg.loss_fn_name}' is unknown; expected one of: {', '.join(_loss_names())}")
    if cfg.partition_method in ("hetero", "dirichlet"):
        _require(cfg.partition_alpha > 0, f"--partition_alpha must be > 0 for a Dirichlet split, got {cfg.partition_alpha}")
    _require(cfg.clients_per_round < 1 or float(cfg.clients_per_round).is_integer(),
             f"--clients_per_round {cfg.clients_per_round}: a count must be a whole number (or give a fraction in (0, 1))")
    _require(cfg.thread_number == 1 or cfg.gpu is not None,
             f"--thread_number {cfg.thread_number} sets the number of GPU workers with --gpu; on a CPU give "
             "--devices cpu,cpu for two workers")
    _require(cfg.data_dir is None or entry.needs_data_dir,
             f"--data_dir applies to data sets read from files; --dataset {cfg.dataset} is built in")
    _require(cfg.data_dir is not None or not entry.needs_data_dir,
             f"--dataset {cfg.dataset} needs --data_dir (the folder holding its files)")
    if not entry.partitionable:
        _require(cfg.partition_method in ("natural", "homo") and cfg.client_number is None,
                 f"--dataset {cfg.dataset} comes split over its clients; --partition_method and --client_number do not "
                 "apply")
