"""SCAFFOLD (Karimireddy et al. 2020), option II control variates.

The server keeps a control variate c (server state) and sends it with the global model x; client
i keeps its own c_i (client state, 0 at first). Each local SGD step uses the corrected gradient
g + c - c_i. After K steps at learning rate eta_l, ending at y_i, the client sets

    c_i+ = c_i - c + (x - y_i) / (K eta_l)                       (option II)

and sends y_i and Delta c_i = c_i+ - c_i. The server updates

    x <- x + eta_g * sum_i w_i (y_i - x),    c <- c + (|S| / N) mean_i Delta c_i

with w_i FedAvg's example weights (FLamby's choice; the paper averages uniformly), |S| the
clients that replied and N all clients. Control variates cover the trainable parameters;
BatchNorm running statistics take the plain average. Defaults follow FLamby: plain SGD (momentum 0;
option II assumes it, so ``--adam`` is refused) and eta_g = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedward.algorithms.aggregate import example_weights, weighted_average
from fedward.algorithms.base import (
    Arrays, ClientReply, GlobalTraining, LocalTraining, ServerMessage, Workspace, round_lr,
)
from fedward.algorithms.fedavg import FedAvg
from fedward.algorithms.registry import register_method
from fedward.errors import ConfigError
from fedward.options import POSITIVE, new_default, option

CONTROL = "control/"  # prefix of the control-variate arrays in messages and replies


@dataclass
class ScaffoldOptions(GlobalTraining):
    # Option II's control variates assume SGD steps: plain SGD at FedAvg's best SGD lr on the
    # built-in data (`bench/bench_results.py --grid sgd_lr`).
    adam: bool = new_default(LocalTraining, "adam", False)
    lr: float = new_default(LocalTraining, "lr", 0.05)
    momentum: float = new_default(LocalTraining, "momentum", 0.0)
    nesterov: bool = new_default(LocalTraining, "nesterov", False)
    server_lr: float = option(1.0, "server learning rate eta_g", check=POSITIVE)


@register_method
class Scaffold(FedAvg):
    name = "scaffold"
    summary = "SCAFFOLD (Karimireddy et al. 2020): control variates correct each client's drift (option II)"
    Options = ScaffoldOptions
    per_sample_dp_refusal = "its control-variate correction changes the gradient after the backward pass, which DP-SGD's step replaces"
    client_dp_refusal = "its replies carry control variates, which DP-FedAvg's clipping and noise do not cover"
    secure_aggregation_refusal = "its server also averages the control-variate updates with equal weights, a second sum the secure path does not carry"

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.adam or cfg.adamw:
            raise ConfigError("--method scaffold: option II's control variates (x - y) / (K lr) assume SGD steps; "
                              f"drop --{'adam' if cfg.adam else 'adamw'}")

    def declared_reply_keys(self, global_state: Arrays) -> set[str]:
        return set(global_state) | {CONTROL + k for k in self.parameter_names}

    # -- server ---------------------------------------------------------------------------------
    def initial_server_state(self, global_state: Arrays) -> dict[str, Any]:
        return {"control": {k: torch.zeros_like(global_state[k], dtype=torch.float32) for k in self.parameter_names}}

    def server_message(self, round_index: int, global_state: Arrays, server_state: dict[str, Any]) -> ServerMessage:
        arrays = {**global_state, **{CONTROL + k: v for k, v in server_state["control"].items()}}
        return ServerMessage(round=round_index, arrays=arrays, config={"total-rounds": self.cfg.comm_round})

    def reply_reference(self, global_state: Arrays, server_state: dict[str, Any]) -> Arrays:
        return self.server_message(0, global_state, server_state).arrays

    def aggregate(self, round_index: int, global_state: Arrays, replies: list[ClientReply],
                  server_state: dict[str, Any]) -> tuple[Arrays, dict[str, Any]]:
        weights = example_weights([r.metrics["num-examples"] for r in replies])
        models = [{k: v for k, v in r.arrays.items() if not k.startswith(CONTROL)} for r in replies]
        average = weighted_average(models, weights)
        new_state = dict(average)
        for name in self.parameter_names:
            x = global_state[name]
            new_state[name] = (x.float() + self.cfg.server_lr * (average[name].float() - x.float())).to(x.dtype)
        share = len(replies) / len(self.spec.train_class_counts)
        uniform = [1.0 / len(replies)] * len(replies)
        mean_delta = weighted_average([{k: r.arrays[CONTROL + k] for k in self.parameter_names} for r in replies], uniform)
        server_state["control"] = {k: c + share * mean_delta[k] for k, c in server_state["control"].items()}
        return new_state, {"weights": weights}

    # -- client ---------------------------------------------------------------------------------
    def model_arrays(self, message: ServerMessage) -> Arrays:
        return {k: v for k, v in message.arrays.items() if not k.startswith(CONTROL)}

    def local_model_state(self, reply: ClientReply, state: dict[str, Any]) -> Arrays | None:
        return {k: v for k, v in reply.arrays.items() if not k.startswith(CONTROL)}

    def client_control(self, message: ServerMessage, state: dict[str, Any]) -> Arrays:
        return state.get("control") or {k: torch.zeros_like(message.arrays[CONTROL + k]) for k in self.parameter_names}

    def gradient_hook(self, ws: Workspace, message: ServerMessage, state: dict[str, Any]):
        own = self.client_control(message, state)
        correction = {k: (message.arrays[CONTROL + k] - own[k]).to(ws.device) for k in self.parameter_names}

        def correct(model: torch.nn.Module) -> None:
            for name, param in model.named_parameters():
                if param.grad is not None:
                    param.grad.add_(correction[name])
        return correct

    def reply_arrays(self, trained: Arrays, message: ServerMessage, state: dict[str, Any], steps: int) -> Arrays:
        own = self.client_control(message, state)
        scale = 1.0 / (max(steps, 1) * round_lr(self.cfg, message.round))
        updated = {k: own[k] - message.arrays[CONTROL + k] + scale * (message.arrays[k].float() - trained[k].float())
                   for k in self.parameter_names}
        state["control"] = updated
        return {**trained, **{CONTROL + k: updated[k] - own[k] for k in self.parameter_names}}
