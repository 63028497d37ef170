"""MOON (Li, He and Song 2021) as in the Fed-MAS reference code (adapted from QinbinLi/MOON).

The model is the backbone plus a projection head (p1: F->F, ReLU, p2: F->256) and fc on the
projection. Local loss: task loss + mu * CE([cos(z, z_glob), cos(z, z_prev)] / tau, label 0),
gradients clipped at norm 5.

Departures from the reference, both for privacy and memory: the previous local model stays on the
client (the reference keeps every client's previous weights on the server and sends them back),
and the global and previous models run in eval mode under no_grad (frozen targets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fedward.algorithms.base import GlobalTraining, ServerMessage, Workspace, to_cpu
from fedward.algorithms.fedavg import ExtraLossFn, ForwardFn, FedAvg
from fedward.algorithms.registry import register_method
from fedward.options import NON_NEGATIVE, POSITIVE, at_least, option


def model_contrastive_loss(z: torch.Tensor, z_global: torch.Tensor, z_previous: torch.Tensor,
                           temperature: float) -> torch.Tensor:
    """Mean over samples of -log( e^{cos(z,zg)/t} / (e^{cos(z,zg)/t} + e^{cos(z,zp)/t}) )."""
    positive = F.cosine_similarity(z, z_global, dim=-1) / temperature
    negative = F.cosine_similarity(z, z_previous, dim=-1) / temperature
    logits = torch.stack([positive, negative], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(z), dtype=torch.long, device=z.device))


@dataclass
class MoonOptions(GlobalTraining):
    mu: float = option(0.45, "weight of the model-contrastive loss (the reference's --mu)", check=NON_NEGATIVE)
    temperature: float = option(0.5, "temperature of the model-contrastive loss", check=POSITIVE)
    moon_proj_dim: int = option(256, "projection width", check=at_least(1))


@register_method
class Moon(FedAvg):
    name = "moon"
    summary = "MOON (Li, He and Song 2021): FedAvg + model-contrastive loss on a projection head"
    Options = MoonOptions
    per_sample_dp_refusal = "its contrastive term is added to the task loss, and DP-SGD here clips the task loss's per-image gradients alone"
    default_grad_clip = 5.0

    @classmethod
    def wrap_model(cls, cfg, spec, model):
        from fedward.models.heads import ProjectionModel

        return ProjectionModel(model, spec.num_classes, proj_dim=cfg.moon_proj_dim)

    def forward_fn(self, ws: Workspace, message: ServerMessage, state: dict[str, Any]) -> ForwardFn:
        def forward(model, images):
            z, logits = model.project(images)
            return logits, z
        return forward

    def extra_loss_fn(self, ws: Workspace, message: ServerMessage, state: dict[str, Any]) -> ExtraLossFn | None:
        global_model = ws.spare_model("moon-global")
        global_model.load_state_dict(message.arrays)
        global_model.eval()
        previous_model = ws.spare_model("moon-previous")
        # In the first round there is no previous local model: the global one stands in for it.
        previous_model.load_state_dict(state.get("previous-model", message.arrays))
        previous_model.eval()

        def extra(z, images):
            with torch.no_grad():
                z_global, _ = global_model.project(images)
                z_previous, _ = previous_model.project(images)
            return self.cfg.mu * model_contrastive_loss(z, z_global, z_previous, self.cfg.temperature)
        return extra

    def after_training(self, ws: Workspace, state: dict[str, Any]) -> None:
        state["previous-model"] = to_cpu(ws.model.state_dict())
