"""Methods: one module each, a client update plus a server aggregate, registered by decorator.

A new method is one module: subclass :class:`Algorithm` (or :class:`FedAvg`), give it a ``name``
and an ``Options`` dataclass, decorate it with :func:`register_method`, and name the module
in the run's ``plugins`` setting (``fedward run --plugins my_method.py``).
"""

from __future__ import annotations

from fedward.algorithms.base import Algorithm, ClientReply, ServerMessage, TaskSpec, Workspace
from fedward.algorithms.registry import METHOD_REGISTRY, get_algorithm, list_methods, register_method
from fedward.algorithms import (  # noqa: E402,F401  (each module registers its methods)
    fedavg, fedprox, moon, local, centralized, fedmas, mhpflid, fml, fedkd,
)
from fedward.algorithms.fedavg import FedAvg  # noqa: E402

__all__ = ["METHOD_REGISTRY", "Algorithm", "ClientReply", "FedAvg", "ServerMessage", "TaskSpec", "Workspace",
           "get_algorithm", "list_methods", "register_method"]
