"""Methods: one module each, a client update plus a server aggregate."""

from __future__ import annotations

from fedward.algorithms.base import Algorithm, ClientReply, ServerMessage, TaskSpec, Workspace
from fedward.algorithms.centralized import Centralized
from fedward.algorithms.fedavg import FedAvg
from fedward.algorithms.fedkd import FedKD
from fedward.algorithms.fedmas import FedMAS
from fedward.algorithms.fedprox import FedProx
from fedward.algorithms.fml import FML
from fedward.algorithms.local import Local
from fedward.algorithms.mhpflid import MHpFLID
from fedward.algorithms.moon import Moon
from fedward.errors import ConfigError

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (FedAvg, FedProx, Moon, Local, Centralized, FedMAS, MHpFLID, FML, FedKD)}


def get_algorithm(name: str) -> type[Algorithm]:
    try:
        return ALGORITHMS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown method '{name}'; expected one of: {', '.join(ALGORITHMS)}") from None


__all__ = ["ALGORITHMS", "Algorithm", "ClientReply", "ServerMessage", "TaskSpec", "Workspace", "get_algorithm"]
