"""The data-set registry: a data set is a module that registers a loader with its options.

A registered data set has a name, an options dataclass (its own settings, built with
:func:`fedward.options.option`; the CLI flags, help and validation come from it) and a function
``from_config(cfg) -> FederatedData`` that loads it for a run (``cfg`` has the run's common
settings and these options as attributes). Register with the decorator::

    @register_dataset("my_set", options=MyOptions, needs_data_dir=True)
    def from_config(cfg): ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fedward.data.types import FederatedData, Split
from fedward.errors import ConfigError
from fedward.options import PROBABILITY_LT1, NoOptions, option


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    Options: type
    from_config: Callable[..., FederatedData]
    needs_data_dir: bool  # read from files under --data_dir (else built in)
    partitionable: bool = True  # --partition_method/--client_number apply
    splits_clients: bool = False  # the loader splits the clients itself (no re-partition afterwards)
    summary: str = ""
    # (cfg, count) -> a labelled Split of built-in public images, for the public-data methods
    public: Callable[..., Split] | None = None


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name: str, *, options: type = NoOptions, needs_data_dir: bool, partitionable: bool = True,
                     splits_clients: bool = False, summary: str = "",
                     public: Callable[..., Split] | None = None) -> Callable:
    """Decorator registering ``from_config(cfg)`` as data set ``name``; ``public(cfg, count)``, if given,
    is its built-in public split (images no client holds)."""

    def decorate(from_config: Callable[..., FederatedData]) -> Callable[..., FederatedData]:
        if name in DATASETS:
            raise ValueError(f"data set {name!r} is registered twice")
        DATASETS[name] = DatasetEntry(name, options, from_config, needs_data_dir, partitionable, splits_clients,
                                      summary or (from_config.__doc__ or "").strip().splitlines()[0], public)
        return from_config

    return decorate


def get_dataset(name: str) -> DatasetEntry:
    try:
        return DATASETS[name.lower()]
    except KeyError:
        raise ConfigError(f"--dataset '{name}' is unknown; expected one of: {', '.join(sorted(DATASETS))}") from None


def list_datasets() -> list[str]:
    return list(DATASETS)


# -- options several data sets share -----------------------------------------------------------------
@dataclass
class ValidationSplit:
    val_fraction: float = option(0.1, "fraction of each client's train data held out for validation",
                                 check=PROBABILITY_LT1)


@dataclass
class ImageFiles(ValidationSplit):
    skip_bad_images: bool = option(False, "leave out missing or unreadable images (their count is recorded) instead "
                                          "of stopping")


@dataclass
class BreakHisLabels:
    label_set: str = option("binary", "binary (benign/malignant, MH-pFLID's task) or subtype (8 tumour types)",
                            choices=("binary", "subtype"))
    shared_images: bool = option(False, "every client holds all patients' images at its own resolution (the MH-pFLID "
                                        "reproduction's data) instead of disjoint patients; one patient split for all")
    split_per_client: bool = option(False, "with --shared_images: each client re-splits the patients with its own seed, "
                                           "as the reproduction (leaks test patients across clients; warns)")
