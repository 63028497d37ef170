"""FedAdam, FedYogi and FedAdagrad (Reddi et al. 2021, "Adaptive Federated Optimization").

Clients train as in FedAvg. The server treats the example-weighted average update as a
pseudo-gradient, Delta = avg_k(theta_k) - theta, and takes an adaptive step on every trainable
parameter:

    m <- beta1 m + (1 - beta1) Delta
    v <- beta2 v + (1 - beta2) Delta^2                       (FedAdam)
    v <- v - (1 - beta2) Delta^2 sign(v - Delta^2)           (FedYogi)
    v <- v + Delta^2                                         (FedAdagrad)
    theta <- theta + eta m / (sqrt(v) + tau)

m and v start at 0 and are server state (checkpointed, so a resumed run continues exactly).
Defaults are Flower's (``flwr/serverapp/strategy/fedadam.py`` etc.): eta 0.1 (FedYogi 0.01),
beta1 0.9 (FedAdagrad 0), beta2 0.99, tau 1e-3. FedAdam corrects the moments' bias as Kingma
and Ba (step t = the server's t-th update); Flower uses the exponent t + 1 and FLamby corrects
nothing (``--bias_correction false``). FLamby's defaults differ (eta 1e-2, beta2 0.999).
BatchNorm running statistics are not parameters: they take the plain weighted average (FLamby
exchanges parameters only; Flower applies the step to every array a client sends).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedward.algorithms.base import Arrays, GlobalTraining
from fedward.algorithms.fedavg import FedAvg
from fedward.algorithms.registry import register_method
from fedward.options import POSITIVE, PROBABILITY_LT1, new_default, option


@dataclass
class FedAdagradOptions(GlobalTraining):
    server_lr: float = option(0.1, "server learning rate eta", check=POSITIVE)
    beta1: float = option(0.0, "server first-moment decay beta_1", check=PROBABILITY_LT1)
    tau: float = option(1e-3, "adaptivity tau, added to sqrt(v)", check=POSITIVE)


@dataclass
class FedYogiOptions(FedAdagradOptions):
    beta2: float = option(0.99, "server second-moment decay beta_2", check=PROBABILITY_LT1)


@dataclass
class FedYogiDefaults(FedYogiOptions):
    server_lr: float = new_default(FedAdagradOptions, "server_lr", 0.01)
    beta1: float = new_default(FedAdagradOptions, "beta1", 0.9)


@dataclass
class FedAdamOptions(FedYogiOptions):
    beta1: float = new_default(FedAdagradOptions, "beta1", 0.9)
    bias_correction: bool = option(True, "correct the moments' bias (Kingma and Ba); false: FLamby's FedAdam")


class FedOpt(FedAvg):
    """FedAvg's clients with an adaptive server step; subclasses say how v is updated."""

    def initial_server_state(self, global_state: Arrays) -> dict[str, Any]:
        zeros = {k: torch.zeros_like(global_state[k], dtype=torch.float32) for k in self.parameter_names}
        return {"m": zeros, "v": {k: t.clone() for k, t in zeros.items()}, "t": 0}

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step_size(self, t: int) -> float:
        return self.cfg.server_lr

    def aggregate_average(self, round_index: int, global_state: Arrays, average: Arrays, weights: list[float],
                          server_state: dict[str, Any]) -> tuple[Arrays, dict[str, Any]]:
        average, info = super().aggregate_average(round_index, global_state, average, weights, server_state)
        beta1, tau = self.cfg.beta1, self.cfg.tau
        t = server_state["t"] + 1
        step = self.step_size(t)
        new_state, m_new, v_new = dict(average), {}, {}
        for name in self.parameter_names:
            x = global_state[name]
            delta = average[name].float() - x.float()
            m_new[name] = beta1 * server_state["m"][name] + (1 - beta1) * delta
            v_new[name] = self.second_moment(server_state["v"][name], delta * delta)
            new_state[name] = (x.float() + step * m_new[name] / (v_new[name].sqrt() + tau)).to(x.dtype)
        server_state.update(m=m_new, v=v_new, t=t)  # new tensors: the checkpoint being written keeps the old
        return new_state, info


@register_method
class FedAdam(FedOpt):
    name = "fedadam"
    summary = "FedAdam (Reddi et al. 2021): FedAvg clients, Adam on the server's pseudo-gradient"
    Options = FedAdamOptions

    def second_moment(self, v, delta_sq):
        return self.cfg.beta2 * v + (1 - self.cfg.beta2) * delta_sq

    def step_size(self, t: int) -> float:
        if not self.cfg.bias_correction:
            return self.cfg.server_lr
        return self.cfg.server_lr * (1 - self.cfg.beta2 ** t) ** 0.5 / (1 - self.cfg.beta1 ** t)


@register_method
class FedYogi(FedOpt):
    name = "fedyogi"
    summary = "FedYogi (Reddi et al. 2021): FedAvg clients, Yogi on the server's pseudo-gradient"
    Options = FedYogiDefaults

    def second_moment(self, v, delta_sq):
        return v - (1 - self.cfg.beta2) * delta_sq * torch.sign(v - delta_sq)


@register_method
class FedAdagrad(FedOpt):
    name = "fedadagrad"
    summary = "FedAdagrad (Reddi et al. 2021): FedAvg clients, Adagrad on the server's pseudo-gradient"
    Options = FedAdagradOptions

    def second_moment(self, v, delta_sq):
        return v + delta_sq
