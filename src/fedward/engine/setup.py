"""Everything a run builds before its first round: devices, data, the task facts, the model
factory and the initial global weights. All of it is checked before a run directory is created,
so bad input never leaves a half-written run behind."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fedward.algorithms import get_algorithm
from fedward.algorithms.base import Arrays, TaskSpec
from fedward.config import RunConfig
from fedward.data import get_dataset
from fedward.data.partition import repartition
from fedward.data.registry import ValidationSplit
from fedward.data.types import ClientData, FederatedData
from fedward.errors import ConfigError


def notice(message: str) -> None:
    """A one-line notice for the user: timestamped, on stderr (tables on stdout stay clean) and in
    the run's log.txt while a run writes it."""
    from fedward import logs

    logs.info(message)


def resolve_devices(cfg: RunConfig) -> list[str]:
    """One worker per listed device. ``--devices`` wins; else ``--gpu`` ids when CUDA is present;
    else the CPU (with a notice when GPUs were asked for)."""
    devices = _devices(cfg)
    if cfg.augment and cfg.augment_backend == "opencv" and any(d != "cpu" for d in devices):
        raise ConfigError(f"--augment_backend opencv works on the CPU, but this run trains on {', '.join(devices)}; "
                          "use --augment_backend torch or auto")
    return devices


def _devices(cfg: RunConfig) -> list[str]:
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
    """The data set before any re-partitioning, loaded by its registered ``from_config``."""
    entry = get_dataset(cfg.dataset)
    if entry.needs_data_dir and not Path(cfg.data_dir).exists():
        raise ConfigError(f"--data_dir {cfg.data_dir} does not exist (--dataset {cfg.dataset} reads its files from there)")
    data = entry.from_config(cfg)
    if entry.needs_data_dir:
        notice(f"{cfg.dataset} from {cfg.data_dir}" + (f" ({data.info['layout']} layout)" if data.info.get("layout") else "")
               + f": {sum(len(c.train) + len(c.val) + len(c.test) for c in data.clients)} images"
               + (f", {data.info['skipped_bad_images']} unreadable image(s) skipped"
                  if data.info.get("skipped_bad_images") else ""))
    return data


def load_data(cfg: RunConfig) -> FederatedData:
    """The federated data set of this run, partitioned as the config says."""
    data = _load_dataset(cfg)
    if get_dataset(cfg.dataset).splits_clients:  # already split over clients by the loader
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
                       classes_per_client=cfg.classes_per_client, seed=cfg.data_seed,
                       # a data set without the option re-splits with its default
                       val_fraction=cfg.val_fraction if cfg.has("val_fraction") else ValidationSplit().val_fraction)


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
    """A function that builds the method's global model."""
    return get_algorithm(cfg.method).model_builder(cfg, spec)


def initial_global_state(cfg: RunConfig, build: Callable[[], nn.Module]) -> tuple[Arrays, list[str]]:
    """Seeded initial weights (and ImageNet backbone weights with --pre_trained_tv), with notices."""
    return get_algorithm(cfg.method).initial_state(cfg, build)


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def configure_threads(num_workers: int, requested: int = 0) -> int:
    """Torch threads per worker: the cores shared out, so no more busy threads than cores."""
    threads = requested or max(1, cpu_cores() // max(num_workers, 1))
    torch.set_num_threads(threads)
    return threads
