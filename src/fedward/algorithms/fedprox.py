"""FedProx (Li et al. 2020): FedAvg plus the proximal term (mu/2) * ||theta - theta_global||^2."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedward.algorithms.base import GlobalTraining, ServerMessage, Workspace
from fedward.algorithms.fedavg import ExtraLossFn, FedAvg
from fedward.algorithms.registry import register_method
from fedward.options import NON_NEGATIVE, option


def proximal_term(model: torch.nn.Module, anchor: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """(mu/2) * sum over trainable parameters of ||p - anchor_p||^2 (buffers excluded, as the reference)."""
    total = torch.zeros((), device=next(model.parameters()).device)
    for name, param in model.named_parameters():
        total = total + (param - anchor[name]).pow(2).sum()
    return 0.5 * mu * total


@dataclass
class FedProxOptions(GlobalTraining):
    mu: float = option(0.45, "proximal coefficient (reference default 0.45)", check=NON_NEGATIVE)


@register_method
class FedProx(FedAvg):
    name = "fedprox"
    summary = "FedProx (Li et al. 2020): FedAvg + (mu/2)||theta - theta_global||^2"
    Options = FedProxOptions
    per_sample_dp_refusal = "its proximal term's gradient is not a per-image gradient, and DP-SGD's step keeps only those"

    def extra_loss_fn(self, ws: Workspace, message: ServerMessage, state: dict[str, Any]) -> ExtraLossFn | None:
        if self.cfg.mu == 0:
            return None
        params = dict(ws.model.named_parameters())
        anchor = {name: message.arrays[name].to(ws.device) for name in params}
        return lambda _extras, _inputs: proximal_term(ws.model, anchor, self.cfg.mu)
