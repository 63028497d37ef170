"""Data sets, partitions, augmentation and loaders.

Every data-set module exports the same names (FLamby style): ``NAME``, ``NUM_CLIENTS``,
``NUM_CLASSES``, ``CLASS_NAMES``, ``CLIENT_NAMES`` and ``load(**kwargs) -> FederatedData``, so
swapping a data set is one line.
"""

from __future__ import annotations

from types import ModuleType

from fedward.data import breakhis, fed_isic2019, folders, medmnist, synthetic, synthetic_multires
from fedward.data.types import ClientData, FederatedData, Split
from fedward.errors import ConfigError

DATASETS: dict[str, ModuleType] = {module.NAME: module for module in (synthetic, synthetic_multires, fed_isic2019, breakhis, medmnist, folders)}

__all__ = ["DATASETS", "ClientData", "FederatedData", "Split", "get_dataset_module", "load_federated"]


def get_dataset_module(name: str) -> ModuleType:
    """The data-set module registered as ``name``."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown data set {name!r}; expected one of {', '.join(sorted(DATASETS))}") from None


def load_federated(name: str, **kwargs) -> FederatedData:
    """Load the data set registered as ``name`` with its ``load(**kwargs)``."""
    return get_dataset_module(name).load(**kwargs)
