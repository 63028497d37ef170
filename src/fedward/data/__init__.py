"""Data sets, partitions, augmentation and loaders.

Every data-set module exports the same names (FLamby style): ``NAME``, ``NUM_CLIENTS``,
``NUM_CLASSES``, ``CLASS_NAMES``, ``CLIENT_NAMES``, ``Options``, ``load(**kwargs) -> FederatedData``,
and registers ``from_config(cfg)`` with :func:`register_dataset`, so swapping a data set is one
line (``--dataset NAME``) and a new data set is one module.
"""

from __future__ import annotations

from types import ModuleType

from fedward.data.registry import DATASETS, DatasetEntry, get_dataset, list_datasets, register_dataset
from fedward.data.types import ClientData, FederatedData, Split
from fedward.data import breakhis, fed_isic2019, folders, medmnist, synthetic, synthetic_multires  # noqa: E402  (registers)

MODULES: dict[str, ModuleType] = {m.NAME: m for m in (synthetic, synthetic_multires, fed_isic2019, breakhis, medmnist, folders)}

__all__ = ["DATASETS", "ClientData", "DatasetEntry", "FederatedData", "Split", "get_dataset", "get_dataset_module",
           "list_datasets", "load_federated", "register_dataset"]


def get_dataset_module(name: str) -> ModuleType:
    """The built-in data-set module registered as ``name``."""
    get_dataset(name)
    return MODULES[name]


def load_federated(name: str, **kwargs) -> FederatedData:
    """Load the built-in data set ``name`` with its module's ``load(**kwargs)``."""
    return get_dataset_module(name).load(**kwargs)
