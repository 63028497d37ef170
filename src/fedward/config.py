"""Run configuration: one typed dataclass, filled from a YAML file and/or command-line flags.

The flag names of the Fed-MAS reference code (``--client_number``, ``--comm_round``, ``--adam``,
``--loss_fn_name`` ...) are the field names, so the seed's README commands work with
``python main.py`` replaced by ``fedward run``. Flags the reference declares but never uses are
rejected with a message that says so (see ``DEAD_REFERENCE_FLAGS``), never silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fedward.errors import ConfigError

METHODS = ("fedavg", "fedprox", "moon", "local", "centralized", "fedmas", "mhpflid", "fml", "fedkd")
# Model-heterogeneous methods: a shared small model (the messenger) plus one local model per client.
HETEROGENEOUS_METHODS = ("mhpflid", "fml", "fedkd")
# Their default local architectures (MH-pFLID's BreakHis clients), cycled when there are more clients.
DEFAULT_CLIENT_MODELS = ("resnet17", "resnet11", "resnet8", "resnet5")
FUSIONS = ("attention", "add", "none")
AGGREGATE_METHODS = ("avg", "mas", "mas_inv", "mas_drw")
PROJECTOR_HEAD_POLICIES = ("both", "free", "global")
PARTITION_METHODS = ("natural", "homo", "iid", "hetero", "dirichlet", "pathological")
BN_POLICIES = ("average", "local")
# Keys a run directory's config.yaml carries for information; a config file may hold them.
INFO_KEYS = ("class_names", "client_names", "fedward_version")

# Flags of the reference code that have no effect there (fedmas.md section 7 item 11, 6.3).
DEAD_REFERENCE_FLAGS: dict[str, str] = {
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
    "client_sample": "fedward runs every client every round (the reference default, 1.0)",
}


@dataclass
class RunConfig:
    """Everything a run needs. Field names follow the reference code's flags where one exists."""

    # -- method and training
    method: str = "fedavg"
    comm_round: int = 10
    epochs: int = 1
    batch_size: int = 64
    lr: float = 3e-4
    adam: bool = False
    momentum: float = 0.9
    nesterov: bool = True
    wd: float = 1e-4  # SGD weight decay; the reference's Adam has none
    persist_optimizer_state: bool = True  # the reference keeps each client's optimizer state
    loss_fn_name: str = "CE"
    mu: float = 0.45  # FedProx / MOON coefficient (reference default)
    temperature: float = 0.5  # MOON
    moon_proj_dim: int = 256
    grad_clip: float | None = None  # None: the reference's choice per method (5.0 for moon)
    bn_policy: str = "average"  # "average": whole state dict (reference); "local": FedBN/FLamby
    # -- model
    model: str = "resnet18"
    stem: str = "imagenet"  # torchvision's stem; "auto" picks a finer stem for small images (slower on CPU)
    pre_trained_tv: str | None = None  # None: off; "default": torchvision's cache path; else a file
    # -- data
    dataset: str = "synthetic"
    data_seed: int = 0  # the data set's seed; --seed varies training only
    data_dir: str | None = None
    skip_bad_images: bool = False  # leave out unreadable images (counted in the run) instead of stopping
    data_flag: str = "dermamnist"  # --dataset medmnist: which <flag>.npz in --data_dir
    image_size: int = 32
    data_scale: float = 0.2
    client_number: int | None = None  # None: the data set's natural number of clients
    partition_method: str = "natural"
    partition_alpha: float = 0.5
    classes_per_client: int = 2
    val_fraction: float = 0.1
    label_set: str = "binary"  # synthetic_multires (BreakHis-like): binary (benign/malignant) or subtype (8 classes)
    shared_images: bool = False  # synthetic_multires: every client holds all images (the MH-pFLID reproduction)
    patients_scale: float = 4.0  # synthetic_multires: patients per BreakHis patient
    magnifications: list[str] = field(default_factory=lambda: ["40X", "100X", "200X", "400X"])  # breakhis
    group_by: str = "patient"  # breakhis splits: patient, or patient_magnification (the reproduction's; leaks)
    fold: int = 1
    augment: bool = True
    # Blur strength relative to the reference, which blurs the ~1024 px ISIC original before resizing
    # to 224 (an effective scale of about 224/1024); None: image_size / 1024, the same relative blur.
    blur_scale: float | None = None
    # -- evaluation
    validate_client: bool = False
    eval_every: int = 1  # evaluate every N rounds (the last round always); 0: only the last
    eval_batch_size: int = 256
    # -- execution
    seed: int = 0
    thread_number: int = 1
    gpu: str | None = None
    devices: list[str] = field(default_factory=list)  # resolved from gpu / thread_number
    threads: int = 0  # torch threads per worker; 0: the machine's cores shared out over the workers
    output: str | None = None
    checkpoint_every: int = 1
    progress: bool = True
    # -- Fed-MAS flags of the reference, accepted for its commands; used by issue 3's fedmas
    free_u: float = 0.0
    pre_trained_models: str | None = None
    prior_path: str | None = None  # the prior's checkpoint file (default: $FEDWARD_CACHE/priors/<file>)
    prior_bn_drift: bool = False  # reproduce the reference's round-0 BatchNorm drift of the prior
    cache_prior_features: bool = False  # approximation: prior features of un-augmented images, computed once
    update_projector_head: str = "both"
    aggregate_method: str = "avg"
    # -- model-heterogeneous methods (mhpflid, fml, fedkd; local with client_models)
    client_models: list[str] = field(default_factory=list)  # [] : mhpflid/fml/fedkd DEFAULT_CLIENT_MODELS, local --model
    messenger_dim: int = 512  # D_mes, the messenger's width
    injection_epochs: int = 4  # mhpflid E_inj
    distillation_epochs: int = 1  # mhpflid E_dis
    local_lr: float = 1e-4  # Adam lr of the local model and R/T (mhpflid), of both models (fml, fedkd)
    messenger_lr: float = 1e-5  # Adam lr of the messenger in mhpflid's distillation
    lambda_inj_local: float = 0.9
    lambda_inj_messenger: float = 0.1
    lambda_dis_messenger: float = 0.9
    lambda_dis_kl: float = 0.1
    kd_temperature: float = 1.0
    mhpflid_fusion: str = "attention"  # R/T: attention (the paper), add (1x1-conv addition), none
    fml_alpha: float = 0.5  # FML: weight of CE in the local model's loss
    fml_beta: float = 0.5  # FML: weight of CE in the shared model's loss
    fedkd_energy_start: float = 0.95  # FedKD SVD energy kept, first round -> last round (1: no compression)
    fedkd_energy_end: float = 0.98

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_NAMES = tuple(f.name for f in fields(RunConfig))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict of RunConfig fields."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if k not in INFO_KEYS}
    for key in data:
        if key in DEAD_REFERENCE_FLAGS:
            raise ConfigError(f"config key '{key}' in {path} is not accepted: {DEAD_REFERENCE_FLAGS[key]}")
        if key not in FIELD_NAMES:
            raise ConfigError(f"unknown config key '{key}' in {path}; see `fedward run --help` for the keys")
    return data


def _coerce(name: str, value: Any) -> Any:
    """Convert a YAML/flag value to the field's type, with an error naming the key."""
    default = RunConfig.__dataclass_fields__[name]
    kind = default.type if isinstance(default.type, str) else str(default.type)
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"'{name}' must not be empty")
    try:
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("list"):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
        return str(value)
    except (TypeError, ValueError):
        expected = kind.split(" |")[0]
        raise ConfigError(f"'{name}' must be {expected}, got {value!r}") from None


# Defaults that differ by method (the MH-pFLID seed's batch size); a given value always wins.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {method: {"batch_size": 8} for method in HETEROGENEOUS_METHODS}


def build_config(values: dict[str, Any]) -> RunConfig:
    """A validated RunConfig from a dict of field values (file values overridden by flags)."""
    method = str(values.get("method", RunConfig.method)).lower()
    values = {**METHOD_DEFAULTS.get(method, {}), **values}
    cfg = RunConfig(**{k: _coerce(k, v) for k, v in values.items()})
    validate(cfg)
    return cfg


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: RunConfig) -> None:
    """Check values and cross-field rules; normalise case where the reference is case-insensitive."""
    cfg.method = cfg.method.lower()
    _require(cfg.method in METHODS, f"--method '{cfg.method}' is unknown; expected one of: {', '.join(METHODS)}")
    for name in ("comm_round", "epochs", "batch_size", "image_size", "eval_batch_size", "thread_number"):
        _require(getattr(cfg, name) >= 1, f"--{name} must be at least 1, got {getattr(cfg, name)}")
    _require(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}")
    _require(cfg.mu >= 0, f"--mu must be >= 0, got {cfg.mu}")
    _require(cfg.temperature > 0, f"--temperature must be positive, got {cfg.temperature}")
    _require(0 < cfg.data_scale <= 1, f"--data_scale must be in (0, 1], got {cfg.data_scale}")
    _require(cfg.label_set in ("binary", "subtype"), f"--label_set '{cfg.label_set}' is unknown; expected binary or subtype")
    _require(cfg.group_by in ("patient", "patient_magnification"),
             f"--group_by '{cfg.group_by}' is unknown; expected patient or patient_magnification")
    _require(cfg.patients_scale > 0, f"--patients_scale must be positive, got {cfg.patients_scale}")
    _require(0 <= cfg.val_fraction < 1, f"--val_fraction must be in [0, 1), got {cfg.val_fraction}")
    _require(cfg.blur_scale is None or cfg.blur_scale > 0, f"--blur_scale must be positive, got {cfg.blur_scale}")
    _require(cfg.threads >= 0, f"--threads must be >= 0, got {cfg.threads}")
    _require(cfg.eval_every >= 0, f"--eval_every must be >= 0, got {cfg.eval_every}")
    _require(cfg.checkpoint_every >= 1, f"--checkpoint_every must be >= 1, got {cfg.checkpoint_every}")
    _require(cfg.client_number is None or cfg.client_number >= 1,
             f"--client_number must be at least 1, got {cfg.client_number}")
    cfg.partition_method = cfg.partition_method.lower()
    _require(cfg.partition_method in PARTITION_METHODS,
             f"--partition_method '{cfg.partition_method}' is unknown; expected one of: {', '.join(PARTITION_METHODS)}")
    if cfg.partition_method in ("hetero", "dirichlet"):
        _require(cfg.partition_alpha > 0, f"--partition_alpha must be > 0 for a Dirichlet split, got {cfg.partition_alpha}")
    _require(cfg.bn_policy in BN_POLICIES, f"--bn_policy '{cfg.bn_policy}' is unknown; expected one of: {', '.join(BN_POLICIES)}")
    # Case-insensitive, so the reference README's --aggregate_method='MAS' works (the reference crashes on it).
    cfg.aggregate_method = cfg.aggregate_method.lower()
    _require(cfg.aggregate_method in AGGREGATE_METHODS,
             f"--aggregate_method '{cfg.aggregate_method}' is unknown; expected one of: {', '.join(AGGREGATE_METHODS)}")
    _require(cfg.update_projector_head in PROJECTOR_HEAD_POLICIES,
             f"--update_projector_head '{cfg.update_projector_head}' is unknown; expected one of: "
             f"{', '.join(PROJECTOR_HEAD_POLICIES)}")
    _require(cfg.free_u >= 0, f"--free_u must be >= 0, got {cfg.free_u}")
    if cfg.method == "fedmas":
        _require(cfg.pre_trained_models is not None,
                 "--method fedmas needs --pre_trained_models: moco, IMAGENET1K_V1, 18_img, mix, auto, random, "
                 "or a checkpoint file")
        _require(not (cfg.cache_prior_features and cfg.prior_bn_drift),
                 "--cache_prior_features needs a fixed prior; --prior_bn_drift changes it in round 1")
        _require(not (cfg.pre_trained_models == "mix" and cfg.prior_path),
                 "--pre_trained_models mix uses two files (moco and IMAGENET1K_V1) from the prior folder "
                 "($FEDWARD_CACHE/priors); drop --prior_path")
    else:
        _require(cfg.aggregate_method == "avg",
                 f"--aggregate_method {cfg.aggregate_method} needs --method fedmas; {cfg.method} aggregates with 'avg'")
        _require(cfg.update_projector_head == "both",
                 f"--update_projector_head {cfg.update_projector_head} applies to --method fedmas only; expected 'both'")
        _require(cfg.free_u == 0, f"--free_u applies to --method fedmas only; got {cfg.free_u} with --method {cfg.method}")
        _require(cfg.pre_trained_models is None,
                 f"--pre_trained_models applies to --method fedmas only; got '{cfg.pre_trained_models}'")
        _require(not cfg.cache_prior_features, "--cache_prior_features applies to --method fedmas only")
    _validate_heterogeneous(cfg)


def _validate_heterogeneous(cfg: RunConfig) -> None:
    from fedward.models import list_models

    _require(not cfg.client_models or cfg.method in ("local", *HETEROGENEOUS_METHODS),
             f"--client_models applies to --method local, {', '.join(HETEROGENEOUS_METHODS)}; got --method {cfg.method}")
    for name in cfg.client_models:
        _require(name in list_models() and name != "messenger",
                 f"--client_models entry '{name}' is not a model; expected names from: "
                 f"{', '.join(m for m in list_models() if m != 'messenger')}")
    for name in ("messenger_dim", "injection_epochs", "distillation_epochs"):
        _require(getattr(cfg, name) >= (0 if name.endswith("epochs") else 1),
                 f"--{name} must be {'>= 0' if name.endswith('epochs') else 'at least 1'}, got {getattr(cfg, name)}")
    _require(cfg.injection_epochs + cfg.distillation_epochs >= 1,
             "--injection_epochs and --distillation_epochs are both 0: an mhpflid round would train nothing")
    for name in ("local_lr", "messenger_lr", "kd_temperature"):
        _require(getattr(cfg, name) > 0, f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("lambda_inj_local", "lambda_inj_messenger", "lambda_dis_messenger", "lambda_dis_kl"):
        _require(getattr(cfg, name) >= 0, f"--{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("fml_alpha", "fml_beta"):
        _require(0 <= getattr(cfg, name) <= 1, f"--{name} must be in [0, 1], got {getattr(cfg, name)}")
    for name in ("fedkd_energy_start", "fedkd_energy_end"):
        _require(0 < getattr(cfg, name) <= 1, f"--{name} must be in (0, 1], got {getattr(cfg, name)}")
    cfg.mhpflid_fusion = cfg.mhpflid_fusion.lower()
    _require(cfg.mhpflid_fusion in FUSIONS,
             f"--mhpflid_fusion '{cfg.mhpflid_fusion}' is unknown; expected one of: {', '.join(FUSIONS)}")


def client_architectures(cfg: RunConfig, num_clients: int) -> list[str]:
    """Each client's local model: --client_models (one per client), else the method's default."""
    if cfg.client_models:
        if len(cfg.client_models) != num_clients:
            raise ConfigError(f"--client_models lists {len(cfg.client_models)} models ({', '.join(cfg.client_models)}) "
                              f"but the data set has {num_clients} clients; give one model per client")
        return list(cfg.client_models)
    if cfg.method in HETEROGENEOUS_METHODS:
        return [DEFAULT_CLIENT_MODELS[k % len(DEFAULT_CLIENT_MODELS)] for k in range(num_clients)]
    return [cfg.model] * num_clients


def config_help() -> dict[str, str]:
    """One line of help per field, for the CLI."""
    return {
        "method": f"training method: {', '.join(METHODS)}",
        "comm_round": "number of communication rounds",
        "epochs": "local epochs per round",
        "batch_size": "training batch size (the last incomplete batch is dropped, as in the reference)",
        "lr": "learning rate",
        "adam": "use Adam (no weight decay, as the reference) instead of SGD",
        "momentum": "SGD momentum",
        "nesterov": "SGD Nesterov momentum",
        "wd": "SGD weight decay",
        "persist_optimizer_state": "keep each client's optimizer state across rounds (reference: true)",
        "loss_fn_name": "local loss: CE, BSM, focal, LDAM, CB, RW, LCC, FLAMBY_FOCAL",
        "mu": "FedProx proximal / MOON contrastive coefficient",
        "temperature": "MOON temperature",
        "moon_proj_dim": "MOON projection width",
        "grad_clip": "gradient-norm clip (default: 5 for moon, none otherwise, as the reference)",
        "bn_policy": "BatchNorm statistics: 'average' (whole state dict, reference) or 'local' (FedBN/FLamby)",
        "model": "model name from the registry (fedward models)",
        "stem": "ResNet stem: imagenet (torchvision), medium, small, or auto (by image size: finer and slower for small images)",
        "pre_trained_tv": "initialise the backbone from torchvision ImageNet weights: a file, or no value for torchvision's cache path",
        "dataset": "data set: synthetic, synthetic_multires (built in; BreakHis-like, 4 resolutions, for mhpflid); with --data_dir: fed_isic2019, breakhis, medmnist, folders "
                   "(<client>/<train|val|test>/<class>/*)",
        "data_flag": "--dataset medmnist: the <flag>.npz file to read (dermamnist, pathmnist, ...)",
        "data_seed": "seed of the generated data set and its partition (--seed varies training only)",
        "data_dir": "data folder (Fed-ISIC2019 in the FLamby or Fed-MAS layout); the built-in synthetic set is used "
                    "when it does not exist (with a notice)",
        "skip_bad_images": "leave out missing or unreadable images (their count is recorded) instead of stopping",
        "image_size": "image side in pixels",
        "data_scale": "fraction of Fed-ISIC2019's per-centre counts the synthetic set generates",
        "client_number": "number of clients (default: the data set's natural centres)",
        "partition_method": "natural, homo/iid, hetero/dirichlet, pathological",
        "partition_alpha": "Dirichlet concentration for hetero",
        "classes_per_client": "classes per client for pathological",
        "val_fraction": "fraction of each client's train data held out for validation",
        "label_set": "synthetic_multires, breakhis: binary (benign/malignant, MH-pFLID's task) or subtype (8 tumour types)",
        "shared_images": "synthetic_multires, breakhis: every client holds all patients' images at its own resolution (the "
                         "MH-pFLID reproduction's setting) instead of disjoint patients",
        "magnifications": "breakhis: magnifications to read (default all four, pooled, as the reproduction)",
        "group_by": "breakhis: split grouping, patient (default) or patient_magnification (the reproduction's, which "
                    "lets a patient be in train and test at different magnifications)",
        "patients_scale": "synthetic_multires: synthetic patients per BreakHis patient (82 x scale patients)",
        "fold": "data fold (the reference ships fold 1 only)",
        "augment": "batched train augmentation of the reference (flips, blur, rotation)",
        "blur_scale": "blur sigma/kernel factor (default image_size/1024: the reference's blur of ~1024 px originals)",
        "validate_client": "also evaluate each client's local model on its own splits every round",
        "eval_every": "evaluate every N rounds (the last round always)",
        "eval_batch_size": "evaluation batch size",
        "seed": "random seed",
        "thread_number": "reference flag: worker count; fedward uses one worker per device",
        "gpu": "comma-separated GPU ids (falls back to CPU with a notice when none is present)",
        "devices": "explicit device list, e.g. cpu,cpu for two CPU workers",
        "threads": "torch threads per worker (0: cores / workers)",
        "output": "run directory",
        "checkpoint_every": "checkpoint every N rounds (and the last)",
        "progress": "show progress bars",
        "free_u": "Fed-MAS prior-alignment weight lambda_f; 0 switches the divergence to the supervised loss",
        "pre_trained_models": "Fed-MAS prior: moco, IMAGENET1K_V1, 18_img, mix, auto (moco if present, else a self-trained "
                              "prior), random, or a checkpoint file",
        "prior_path": "the prior's checkpoint file (default: $FEDWARD_CACHE/priors/<its file name>)",
        "prior_bn_drift": "reproduce the reference's quirk: the prior's BatchNorm statistics drift in round 0",
        "cache_prior_features": "approximation, off by default: align to the prior's features of the un-augmented "
                                "images, computed once per client, instead of a prior forward on every batch",
        "update_projector_head": "which heads a fedmas client takes from the global model: both, free, global",
        "aggregate_method": "server aggregation: avg, mas, mas_inv, mas_DRW (any case; mas variants need fedmas)",
        "client_models": "one local model per client, e.g. resnet17,resnet11,resnet8,resnet5 (mhpflid/fml/fedkd default: "
                         "that list, cycled; local: --model for every client)",
        "messenger_dim": "mhpflid/fml/fedkd: width D_mes of the shared messenger model",
        "injection_epochs": "mhpflid: injection epochs per round (messenger frozen; local model and R learn)",
        "distillation_epochs": "mhpflid: distillation epochs per round (local model frozen; messenger and T learn)",
        "local_lr": "mhpflid: Adam lr of the local model, R and T; fml/fedkd: of both models",
        "messenger_lr": "mhpflid: Adam lr of the messenger during distillation",
        "lambda_inj_local": "mhpflid: weight of the local model's CE in the injection loss",
        "lambda_inj_messenger": "mhpflid: weight of the messenger-path CE (through R) in the injection loss",
        "lambda_dis_messenger": "mhpflid: weight of the messenger CE (through T) in the distillation loss",
        "lambda_dis_kl": "mhpflid: weight of KL(local || messenger) in the distillation loss",
        "kd_temperature": "mhpflid: distillation temperature",
        "mhpflid_fusion": "mhpflid R/T: attention (the paper), add (ablation: 1x1-conv feature addition), none (ablation)",
        "fml_alpha": "fml: weight of CE in the local model's loss (1 - alpha on KL)",
        "fml_beta": "fml: weight of CE in the shared model's loss (1 - beta on KL)",
        "fedkd_energy_start": "fedkd: fraction of SVD energy kept in round 1 (1: no compression)",
        "fedkd_energy_end": "fedkd: fraction of SVD energy kept in the last round",
    }
