"""Splitting data: stratified train/val carving and label partitions across clients.

All randomness comes from explicit numpy generators (see ``fedward.seeding.numpy_generator``).
"""

from __future__ import annotations

import numpy as np
import torch

from fedward.data.types import ClientData, FederatedData, Split
from fedward.errors import ConfigError
from fedward.seeding import numpy_generator

PARTITION_METHODS = ("homo", "iid", "hetero", "dirichlet", "pathological")
DIRICHLET_MAX_ATTEMPTS = 1000


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (Python's ``round`` rounds halves to even)."""
    return int(np.floor(x + 0.5))


def stratified_split(data: Split, fraction: float, generator: np.random.Generator) -> tuple[Split, Split]:
    """Split off ``round(fraction * n_c)`` random samples of every class c, never all of a class.

    Returns (rest, carved). Both keep the original sample order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"split fraction must be in [0, 1), got {fraction}")
    labels = data.labels.cpu().numpy()
    carved: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        # A class with n_c samples keeps at least one of them in the remaining split.
        take = min(round_half_up(fraction * len(members)), len(members) - 1)
        if take > 0:
            carved.append(generator.choice(members, size=take, replace=False))
    carved_index = np.sort(np.concatenate(carved)) if carved else np.zeros(0, dtype=np.int64)
    keep = np.ones(len(labels), dtype=bool)
    keep[carved_index] = False
    rest_index = np.flatnonzero(keep)
    return (
        data.subset(torch.from_numpy(rest_index.astype(np.int64))),
        data.subset(torch.from_numpy(carved_index.astype(np.int64))),
    )


def carve_validation(train: Split, fraction: float, generator: np.random.Generator) -> tuple[Split, Split]:
    """Carve a stratified validation split from ``train``; returns (train_rest, val).

    Class c gives ``round(fraction * n_c)`` samples to val but always keeps at least one in train.
    ``fraction == 0`` gives an empty val split of shape (0, 3, H, W).
    """
    return stratified_split(train, fraction, generator)


def partition_indices(
    labels: np.ndarray,
    num_clients: int,
    method: str,
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    min_size: int = 10,
    generator: np.random.Generator,
) -> list[np.ndarray]:
    """Partition sample indices 0..len(labels)-1 across ``num_clients``; every index used exactly once.

    Methods: ``homo``/``iid`` (random, equal sizes), ``hetero``/``dirichlet`` (per class,
    proportions ~ Dirichlet(alpha)), ``pathological`` (each client holds ``classes_per_client``
    classes). Each returned index array is sorted.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ConfigError(f"labels must be a 1-d array, got shape {labels.shape}")
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > len(labels):
        raise ConfigError(f"--client_number {num_clients} is more than the {len(labels)} images to share; "
                          "lower --client_number")
    method_key = method.lower()
    if method_key not in PARTITION_METHODS:
        raise ConfigError(f"unknown partition method {method!r}; expected one of {', '.join(PARTITION_METHODS)}")
    if method_key in ("homo", "iid"):
        parts = np.array_split(generator.permutation(len(labels)), num_clients)
    elif method_key in ("hetero", "dirichlet"):
        parts = _dirichlet_partition(labels, num_clients, alpha, min_size, generator)
    else:
        parts = _pathological_partition(labels, num_clients, classes_per_client, generator)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, min_size: int, generator: np.random.Generator
) -> list[np.ndarray]:
    """Label-skew partition: per class, client shares ~ Dirichlet(alpha), redrawn until every client
    has at least ``min(min_size, n // num_clients)`` samples."""
    if not alpha > 0:
        raise ConfigError(f"partition alpha must be > 0 for the dirichlet method, got {alpha}")
    n = len(labels)
    required = min(min_size, n // num_clients)
    for _ in range(DIRICHLET_MAX_ATTEMPTS):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            members = generator.permutation(np.flatnonzero(labels == label))
            shares = generator.dirichlet(np.full(num_clients, alpha))
            # As in the FedML "hetero" partition: a client that already holds its fair share
            # (n / num_clients) gets no more, which keeps client sizes from drifting apart.
            sizes = np.array([len(p) for p in parts])
            shares = shares * (sizes < n / num_clients)
            if shares.sum() == 0:
                shares = np.full(num_clients, 1.0)
            shares = shares / shares.sum()
            cuts = (np.cumsum(shares) * len(members)).astype(int)[:-1]
            for part, piece in zip(parts, np.split(members, cuts)):
                part.extend(piece.tolist())
        if min(len(p) for p in parts) >= required:
            return [np.asarray(p, dtype=np.int64) for p in parts]
    raise ConfigError(
        f"could not draw a dirichlet partition (alpha={alpha}) giving every one of {num_clients} clients "
        f">= {required} samples in {DIRICHLET_MAX_ATTEMPTS} attempts; raise alpha or lower the number of clients"
    )


def _pathological_partition(
    labels: np.ndarray, num_clients: int, classes_per_client: int, generator: np.random.Generator
) -> list[np.ndarray]:
    """Each client holds ``classes_per_client`` distinct classes; a class's samples are cut into equal
    shards, one per client holding it."""
    classes = generator.permutation(np.unique(labels))
    num_classes = len(classes)
    if not 1 <= classes_per_client <= num_classes:
        raise ConfigError(f"classes_per_client must be in [1, {num_classes}] (the classes present), got {classes_per_client}")
    if num_clients * classes_per_client < num_classes:
        raise ConfigError(
            f"pathological partition needs num_clients * classes_per_client >= {num_classes} classes "
            f"so no class is dropped, got {num_clients} * {classes_per_client}"
        )
    # Client i takes classes i*m .. i*m+m-1 (mod C) of a random class order: m distinct classes each,
    # every class held by at least one client, holders spread evenly over classes.
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(num_clients):
        for j in range(classes_per_client):
            holders[int(classes[(client * classes_per_client + j) % num_classes])].append(client)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for label, owners in holders.items():
        members = generator.permutation(np.flatnonzero(labels == label))
        for owner, shard in zip(owners, np.array_split(members, len(owners))):
            parts[owner].extend(shard.tolist())
    return [np.asarray(p, dtype=np.int64) for p in parts]


def repartition(
    data: FederatedData,
    num_clients: int,
    method: str,
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
) -> FederatedData:
    """Pool every client's train+val+test and re-split it into ``num_clients`` new clients.

    Each new client's share is split stratified into train/test, then val is carved from train.
    """
    pooled = Split.concat([Split.concat([c.train, c.val, c.test]) for c in data.clients])
    parts = partition_indices(
        pooled.labels.numpy(),
        num_clients,
        method,
        alpha=alpha,
        classes_per_client=classes_per_client,
        generator=numpy_generator(seed, "repartition", method.lower()),
    )
    clients = []
    for client_id, index in enumerate(parts):
        share = pooled.subset(torch.from_numpy(index))
        train, test = stratified_split(share, test_fraction, numpy_generator(seed, "repartition-test", client_id))
        train, val = carve_validation(train, val_fraction, numpy_generator(seed, "repartition-val", client_id))
        clients.append(ClientData(client_id, f"client_{client_id}", train, val, test))
    smallest = min(clients, key=lambda c: (min(len(c.train), len(c.test)), c.client_id))
    if not (len(smallest.train) and len(smallest.test)):
        raise ConfigError(f"--client_number {num_clients} ({method}) leaves client {smallest.client_id} with "
                          f"{len(smallest.train)} train and {len(smallest.test)} test images: every client needs "
                          f"both; lower --client_number ({len(pooled)} images in all)")
    info = dict(data.info)
    info["repartition"] = {
        "num_clients": num_clients,
        "method": method,
        "alpha": alpha,
        "classes_per_client": classes_per_client,
        "seed": seed,
        "test_fraction": test_fraction,
        "val_fraction": val_fraction,
    }
    return FederatedData(
        name=data.name,
        num_classes=data.num_classes,
        class_names=list(data.class_names),
        image_size=data.image_size,
        clients=clients,
        mean=data.mean,
        std=data.std,
        info=info,
    )
