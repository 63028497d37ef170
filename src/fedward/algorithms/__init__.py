"""Methods: one module each, a client update plus a server aggregate, registered by decorator.

A new method is one module: subclass :class:`Algorithm` (or :class:`FedAvg`), give it a ``name``
and an ``Options`` dataclass, decorate it with :func:`register_method`, and name the module
in the run's ``plugins`` setting (``fedward run --plugins my_method.py``).
"""

from __future__ import annotations

import importlib
import pkgutil

from fedward.algorithms.base import Algorithm, ClientReply, ServerMessage, TaskSpec, Workspace
from fedward.algorithms.registry import METHOD_REGISTRY, get_algorithm, list_methods, register_method
from fedward.algorithms.fedavg import FedAvg

# Every module of this package is imported, so a method module registers itself by its decorator:
# adding one is adding a file. The order below is the order of ``--help``.
for _name in ("fedavg", "fedprox", "moon", "local", "centralized", "fedmas", "mhpflid", "fml", "fedkd",
              *sorted(m.name for m in pkgutil.iter_modules(__path__))):
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["METHOD_REGISTRY", "Algorithm", "ClientReply", "FedAvg", "ServerMessage", "TaskSpec", "Workspace",
           "get_algorithm", "list_methods", "register_method"]
