"""Everything a run builds before its first round: devices, data, the task facts, the model
factory and the initial global weights. All of it is checked before a run directory is created,
so bad input never leaves a half-written run behind."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fedward.algorithms.base import Arrays, TaskSpec, to_cpu
from fedward.config import HETEROGENEOUS_METHODS, RunConfig
from fedward.data import DATASETS, load_federated
from fedward.data.partition import repartition
from fedward.data.types import ClientData, FederatedData
from fedward.errors import ConfigError
from fedward.losses import build_loss
from fedward.models import get_model, model_options
from fedward.models.heads import PriorAlignedModel, ProjectionModel, use_cosine_classifier
from fedward.models.pretrained import load_pretrained_backbone
from fedward.priors import prior_dim
from fedward.seeding import seed_globals


def notice(message: str) -> None:
    """A one-line notice for the user (stderr, so tables on stdout stay clean)."""
    print(f"fedward: {message}", file=sys.stderr, flush=True)


def resolve_devices(cfg: RunConfig) -> list[str]:
    """One worker per listed device. ``--devices`` wins; else ``--gpu`` ids when CUDA is present;
    else the CPU (with a notice when GPUs were asked for)."""
    if cfg.devices:
        for device in cfg.devices:
            try:
                torch.device(device)
            except RuntimeError:
                raise ConfigError(f"--devices entry '{device}' is not a torch device (expected e.g. cpu, cuda:0)") from None
            if device.startswith("cuda") and not torch.cuda.is_available():
                raise ConfigError(f"--devices entry '{device}' needs CUDA, which this machine does not have")
        return list(cfg.devices)
    if cfg.gpu:
        ids = [g.strip() for g in str(cfg.gpu).split(",") if g.strip()]
        if not all(g.isdigit() for g in ids):
            raise ConfigError(f"--gpu must be comma-separated GPU ids such as '0,1', got '{cfg.gpu}'")
        if torch.cuda.is_available():
            available = [g for g in ids if int(g) < torch.cuda.device_count()]
            if not available:
                raise ConfigError(f"--gpu {cfg.gpu}: none of these ids exist (this machine has {torch.cuda.device_count()} GPUs)")
            return [f"cuda:{g}" for g in available[:max(cfg.thread_number, 1)]]
        notice(f"--gpu {cfg.gpu} asked for GPUs but none is present: running on the CPU")
    return ["cpu"]


def _load_dataset(cfg: RunConfig) -> FederatedData:
    """The data set before any re-partitioning: real data from --data_dir, else the synthetic set."""
    dataset = cfg.dataset
    if cfg.data_dir is not None and not Path(cfg.data_dir).exists():
        notice(f"--data_dir {cfg.data_dir} does not exist: using the built-in synthetic data set instead")
        dataset = "synthetic"
    elif cfg.data_dir is not None and dataset == "synthetic":
        dataset = "fed_isic2019"  # the seed's commands give only --data_dir data/Flamby_isic
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset '{dataset}' is unknown; expected one of: {', '.join(sorted(DATASETS))}")
    if dataset == "synthetic_multires":
        return load_federated(dataset, seed=cfg.data_seed, image_size=cfg.image_size, patients_scale=cfg.patients_scale,
                              labels=cfg.label_set, shared_images=cfg.shared_images, val_fraction=cfg.val_fraction)
    if dataset == "synthetic":
        if cfg.fold != 1:
            raise ConfigError(f"--fold {cfg.fold}: the synthetic data set has a single fold, 1 (the reference code "
                              "also ships only fold 1)")
        return load_federated("synthetic", seed=cfg.data_seed, image_size=cfg.image_size, scale=cfg.data_scale,
                              val_fraction=cfg.val_fraction)
    if cfg.data_dir is None:
        raise ConfigError(f"--dataset {dataset} needs --data_dir (the folder holding its files)")
    if dataset == "medmnist":
        # MedMNIST has no natural clients: the loader splits the official train set itself.
        method = {"natural": "dirichlet", "homo": "iid"}.get(cfg.partition_method, cfg.partition_method)
        data = load_federated(dataset, data_dir=cfg.data_dir, flag=cfg.data_flag, image_size=cfg.image_size,
                              num_clients=cfg.client_number or 4, partition=method, alpha=cfg.partition_alpha,
                              seed=cfg.data_seed, classes_per_client=cfg.classes_per_client)
    elif dataset == "breakhis":
        data = load_federated(dataset, data_dir=cfg.data_dir, image_size=cfg.image_size, magnifications=cfg.magnifications,
                              labels=cfg.label_set, shared_images=cfg.shared_images, group_by=cfg.group_by,
                              val_fraction=cfg.val_fraction, seed=cfg.data_seed, skip_bad_images=cfg.skip_bad_images,
                              progress=cfg.progress)
    elif dataset == "folders":
        data = load_federated(dataset, data_dir=cfg.data_dir, image_size=cfg.image_size, val_fraction=cfg.val_fraction,
                              seed=cfg.data_seed, skip_bad_images=cfg.skip_bad_images, progress=cfg.progress)
    else:
        data = load_federated(dataset, data_dir=cfg.data_dir, image_size=cfg.image_size, val_fraction=cfg.val_fraction,
                              seed=cfg.data_seed, fold=cfg.fold, skip_bad_images=cfg.skip_bad_images,
                              progress=cfg.progress)
    notice(f"{dataset} from {cfg.data_dir} ({data.info.get('layout', '?')} layout): "
           f"{sum(len(c.train) + len(c.val) + len(c.test) for c in data.clients)} images"
           + (f", {data.info['skipped_bad_images']} unreadable image(s) skipped" if data.info.get("skipped_bad_images") else ""))
    return data


def load_data(cfg: RunConfig) -> FederatedData:
    """The federated data set of this run, partitioned as the config says."""
    data = _load_dataset(cfg)
    if data.name in ("medmnist", "breakhis"):  # already split over clients by the loader
        return data
    natural = data.num_clients
    method = cfg.partition_method
    if method == "homo" and cfg.client_number in (None, natural):
        # The reference ignores --partition_method; its README passes 'homo' to mean the natural centres.
        notice("--partition_method homo keeps the natural centres, as the reference code does; use 'iid' for an IID split")
        method = "natural"
    if method == "natural":
        if cfg.client_number not in (None, natural):
            raise ConfigError(f"--client_number {cfg.client_number} with --partition_method natural: the {data.name} data set "
                              f"has {natural} natural centres; use iid, hetero or pathological to split it differently")
        return data
    method = "iid" if method == "homo" else method
    return repartition(data, cfg.client_number or natural, method, alpha=cfg.partition_alpha,
                       classes_per_client=cfg.classes_per_client, seed=cfg.data_seed, val_fraction=cfg.val_fraction)


def task_spec(data: FederatedData) -> TaskSpec:
    counts = data.class_counts("train")
    return TaskSpec(num_classes=data.num_classes, image_size=data.image_size, class_names=list(data.class_names),
                    mean=tuple(data.mean), std=tuple(data.std), train_class_counts=counts.tolist(),
                    global_class_counts=counts.sum(0).tolist())


def pooled_client(data: FederatedData) -> ClientData:
    """The single pseudo-client of centralized training."""
    return ClientData(client_id=0, name="pooled", train=data.pooled("train"), val=data.pooled("val"),
                      test=data.pooled("test"))


def model_builder(cfg: RunConfig, spec: TaskSpec) -> Callable[[], nn.Module]:
    """A function that builds the method's model (backbone, MOON head, LDAM cosine classifier)."""
    cosine = build_loss(cfg.loss_fn_name, [1] * spec.num_classes).needs_cosine_classifier
    # The stem applies to the ResNets; models without one (smallcnn) ignore the setting.
    kwargs = {"stem": cfg.stem} if "stem" in model_options(cfg.model) else {}

    if cfg.method in HETEROGENEOUS_METHODS:  # the global model is the shared messenger / meme / mentee
        return lambda: get_model("messenger", num_classes=spec.num_classes, image_size=spec.image_size,
                                 width=cfg.messenger_dim)

    def build() -> nn.Module:
        model = get_model(cfg.model, num_classes=spec.num_classes, image_size=spec.image_size, **kwargs)
        if cfg.method == "moon":
            model = ProjectionModel(model, spec.num_classes, proj_dim=cfg.moon_proj_dim)
        elif cfg.method == "fedmas":
            model = PriorAlignedModel(model, spec.num_classes, prior_dim(cfg.pre_trained_models, cfg.prior_path, spec.image_size))
        if cosine:
            use_cosine_classifier(model)
        return model

    return build


def initial_global_state(cfg: RunConfig, build: Callable[[], nn.Module]) -> tuple[Arrays, list[str]]:
    """Seeded initial weights (and ImageNet backbone weights with --pre_trained_tv)."""
    seed_globals(cfg.seed, "initial-model")
    model = build()
    notices: list[str] = []
    if cfg.pre_trained_tv is not None:
        target = getattr(model, "backbone", model)  # MOON / Fed-MAS wrappers hold the ResNet as backbone
        path = None if cfg.pre_trained_tv == "default" else cfg.pre_trained_tv
        notices = load_pretrained_backbone(target, cfg.model, path)
    return to_cpu(model.state_dict()), notices


def configure_threads(num_workers: int, requested: int = 0) -> int:
    """Torch threads per worker: the cores shared out, so no more busy threads than cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = requested or max(1, cores // max(num_workers, 1))
    torch.set_num_threads(threads)
    return threads
