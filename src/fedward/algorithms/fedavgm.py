"""FedAvgM (Hsu, Qi and Brown 2019): FedAvg with server momentum.

The server's pseudo-gradient is g = theta - avg_k(theta_k) (example-weighted, as FedAvg); with
momentum buffer u (0 at the start, server state):

    u <- beta u + g,        theta <- theta - eta u

on every trainable parameter (Flower's ``fedavgm.py`` rule: no dampening, no Nesterov; BatchNorm
running statistics take the plain average). Defaults: server learning rate eta 1, momentum
beta 0.9 (Hsu et al.'s usual value; Flower's default 0 is FedAvg itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedward.algorithms.base import Arrays, GlobalTraining
from fedward.algorithms.fedavg import FedAvg
from fedward.algorithms.registry import register_method
from fedward.options import POSITIVE, PROBABILITY_LT1, option


@dataclass
class FedAvgMOptions(GlobalTraining):
    server_lr: float = option(1.0, "server learning rate eta", check=POSITIVE)
    server_momentum: float = option(0.9, "server momentum beta (0: FedAvg)", check=PROBABILITY_LT1)


@register_method
class FedAvgM(FedAvg):
    name = "fedavgm"
    summary = "FedAvgM (Hsu et al. 2019): FedAvg with momentum on the server's pseudo-gradient"
    Options = FedAvgMOptions

    def initial_server_state(self, global_state: Arrays) -> dict[str, Any]:
        return {"momentum": {k: torch.zeros_like(global_state[k], dtype=torch.float32) for k in self.parameter_names}}

    def aggregate_average(self, round_index: int, global_state: Arrays, average: Arrays, weights: list[float],
                          server_state: dict[str, Any]) -> tuple[Arrays, dict[str, Any]]:
        average, info = super().aggregate_average(round_index, global_state, average, weights, server_state)
        new_state, momentum = dict(average), {}
        for name in self.parameter_names:
            x = global_state[name]
            momentum[name] = self.cfg.server_momentum * server_state["momentum"][name] + (x.float() - average[name].float())
            new_state[name] = (x.float() - self.cfg.server_lr * momentum[name]).to(x.dtype)
        server_state["momentum"] = momentum
        return new_state, info
