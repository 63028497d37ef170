"""fedward: federated learning for imbalanced, heterogeneous medical image classification.

The Python API (docs/api.md): ``train`` runs one federated training from a dict of settings (the
CLI's flags without ``--``); ``build_config``, ``prepare`` and ``run`` are its three steps. The
names are imported on first use, so ``import fedward`` stays cheap for the command line.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "train": "fedward.api", "load_run": "fedward.api", "TrainedRun": "fedward.api",
    "build_config": "fedward.config", "load_yaml": "fedward.config", "RunConfig": "fedward.config",
    "prepare": "fedward.engine.simulation", "run": "fedward.engine.simulation",
    "RunDirectory": "fedward.tracking", "write_report": "fedward.tracking.report", "compare": "fedward.tracking.report",
    "list_methods": "fedward.algorithms", "get_algorithm": "fedward.algorithms", "register_method": "fedward.algorithms",
    "list_datasets": "fedward.data", "register_dataset": "fedward.data",
    "list_models": "fedward.models", "get_model": "fedward.models", "register_model": "fedward.models",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedward' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
