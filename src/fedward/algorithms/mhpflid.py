"""MH-pFLID (Xie et al., ICML 2024): model-heterogeneous personalised FL through a shared
messenger, with injection and distillation.

A round, for each client (``reference/mhpflid.md`` section 5):
1. load the global messenger (M_b, M_h);
2. injection, ``injection_epochs``: messenger frozen; the local model (L_b, L_h) and the receiver R
   learn with  lambda_inj_local * CE(L_h(L_b x), y) + lambda_inj_messenger * CE(M_h(R(M_b x, L_b x)), y);
3. distillation, ``distillation_epochs``: local model frozen; M_b, M_h and the transmitter T learn
   with  lambda_dis_messenger * CE(M_h(T(L_b x, M_b x)), y) + lambda_dis_kl * KL(p_local || p_messenger);
4. upload M_b and M_h (BatchNorm buffers included); the server averages them weighted by n_k.
R, T and the local model stay on the client. The local model L_h(L_b x) is what is evaluated.

Choices where the paper (whose body we could not read) is silent, and departures from the only
public reproduction, whose bugs fedward does not inherit:
- attention within each image over spatial tokens (the reproduction attends over the batch);
- R is trained in injection and T in distillation (the reproduction's R never learns);
- the distillation term is a real KL with the local model as detached teacher, at
  ``kd_temperature`` (the reproduction's "KL" is a difference of entropies);
- the messenger is really averaged (the reproduction's server aggregates nothing);
- no clamp of the messenger CE at 100 (a reproduction detail with no effect at these losses);
- Adam everywhere with the reproduction's rates (local model, R, T: 1e-4; messenger: 1e-5) and its
  gradient-norm clip of 1.0 (``--grad_clip`` overrides it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedward.algorithms.base import ClientReply, ServerMessage, Workspace, to_cpu
from fedward.algorithms.heterogeneous import SharedModelMethod, SharedModelOptions, train_stage
from fedward.algorithms.registry import register_method
from fedward.data.types import ClientData
from fedward.losses import distillation_kl
from fedward.models.messenger import FUSIONS, build_fusion
from fedward.options import NON_NEGATIVE, POSITIVE, option


def pooled_logits(model, feature_map: torch.Tensor) -> torch.Tensor:
    """L_h on a feature map: global average pool, then the local model's head."""
    return model.fc(torch.flatten(F.adaptive_avg_pool2d(feature_map, 1), 1))


class MessengerPath(nn.Module):
    """Diagnostic predictor M_h(R(M_b x, L_b x)): the client's messenger reading its local features."""

    def __init__(self, messenger: nn.Module, local: nn.Module, receiver: nn.Module):
        super().__init__()
        self.messenger, self.local, self.receiver = messenger, local, receiver

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.messenger.classify_tokens(self.receiver(self.messenger.feature_map(x), self.local.feature_map(x)))


@dataclass
class MHpFLIDOptions(SharedModelOptions):
    injection_epochs: int = option(4, "injection epochs per round (messenger frozen; local model and R learn)",
                                   check=NON_NEGATIVE)
    distillation_epochs: int = option(1, "distillation epochs per round (local model frozen; messenger and T learn)",
                                      check=NON_NEGATIVE)
    messenger_lr: float = option(1e-5, "Adam lr of the messenger during distillation", check=POSITIVE)
    lambda_inj_local: float = option(0.9, "weight of the local model's CE in the injection loss", check=NON_NEGATIVE)
    lambda_inj_messenger: float = option(0.1, "weight of the messenger-path CE (through R) in the injection loss",
                                         check=NON_NEGATIVE)
    lambda_dis_messenger: float = option(0.9, "weight of the messenger CE (through T) in the distillation loss",
                                         check=NON_NEGATIVE)
    lambda_dis_kl: float = option(0.1, "weight of KL(local || messenger) in the distillation loss", check=NON_NEGATIVE)
    kd_temperature: float = option(1.0, "distillation temperature", check=POSITIVE)
    mhpflid_fusion: str = option("attention", "R/T: attention (the paper), add (ablation: 1x1-conv feature addition), "
                                              "none (ablation: R is W_d alone, T passes the messenger's tokens)",
                                 choices=FUSIONS, lower=True)


@register_method
class MHpFLID(SharedModelMethod):
    name = "mhpflid"
    summary = "MH-pFLID (Xie et al. 2024): per-client models, a shared messenger, injection and distillation"
    Options = MHpFLIDOptions

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.injection_epochs + cfg.distillation_epochs < 1:
            from fedward.errors import ConfigError

            raise ConfigError("--injection_epochs and --distillation_epochs are both 0: an mhpflid round would train nothing")
    default_grad_clip = 1.0  # the reproduction's clip_grad_norm_(..., 1.0)

    def fusion(self, ws: Workspace, client: ClientData, state: dict[str, Any], role: str):
        local_channels = self.local_model(ws, client.client_id).num_features
        return self.load_client_module(
            ws, client, state, role,
            lambda generator: build_fusion(self.cfg.mhpflid_fusion, role, local_channels, self.cfg.messenger_dim,
                                           generator))

    def diagnostic_models(self, ws: Workspace, client: ClientData, state: dict[str, Any]) -> dict[str, nn.Module]:
        """The messenger path, with the messenger the client just trained (still in ``ws.model``
        right after its update) and its own R and local model."""
        if "local" not in state:
            return {}
        local = self.load_local(ws, client, state)
        return {"messenger-path": MessengerPath(ws.model, local, self.fusion(ws, client, state, "receiver"))}

    def client_update(self, ws: Workspace, client: ClientData, message: ServerMessage, state: dict[str, Any],
                      generator: torch.Generator) -> ClientReply:
        cfg = self.cfg
        messenger = self.load_shared(ws, message)
        local = self.load_local(ws, client, state)
        receiver = self.fusion(ws, client, state, "receiver")
        transmitter = self.fusion(ws, client, state, "transmitter")
        loss_fn = self.task_loss(client, message.round)
        stage = dict(batch_size=cfg.batch_size, generator=generator, clip=self.grad_clip)

        # -- injection: messenger frozen (eval mode: its head's BatchNorm statistics stay as sent)
        def injection_loss(inputs, labels):
            local_map = local.feature_map(inputs)
            loss = cfg.lambda_inj_local * loss_fn(pooled_logits(local, local_map), labels)
            if cfg.lambda_inj_messenger > 0:
                with torch.no_grad():
                    messenger_map = messenger.feature_map(inputs)
                routed = messenger.classify_tokens(receiver(messenger_map, local_map))
                loss = loss + cfg.lambda_inj_messenger * loss_fn(routed, labels)
            return loss, loss

        messenger.eval().requires_grad_(False)
        local.train()
        receiver.train()
        trainable = [*local.parameters(), *receiver.parameters()]
        optimizer = self.optimizer(state, "injection", [{"params": trainable, "lr": cfg.local_lr}])
        injection_steps, injection_loss_mean = train_stage(
            ws, client.train, epochs=cfg.injection_epochs, optimizer=optimizer, clip_groups=[trainable],
            batch_loss=injection_loss, **stage)
        self.keep_optimizer(state, "injection", optimizer)
        messenger.requires_grad_(True)

        # -- distillation: local model frozen (eval mode), messenger and T learn
        def distillation_loss(inputs, labels):
            with torch.no_grad():
                local_map = local.feature_map(inputs)
                teacher = pooled_logits(local, local_map)
            logits = messenger.classify_tokens(transmitter(messenger.feature_map(inputs), local_map))
            loss = (cfg.lambda_dis_messenger * loss_fn(logits, labels)
                    + cfg.lambda_dis_kl * distillation_kl(logits, teacher, cfg.kd_temperature))
            return loss, loss

        local.eval()
        messenger.train()
        transmitter.train()
        optimizer = self.optimizer(state, "distillation", [
            {"params": list(messenger.parameters()), "lr": cfg.messenger_lr},
            {"params": list(transmitter.parameters()), "lr": cfg.local_lr}])
        distillation_steps, distillation_loss_mean = train_stage(
            ws, client.train, epochs=cfg.distillation_epochs, optimizer=optimizer,
            clip_groups=[[*messenger.parameters(), *transmitter.parameters()]], batch_loss=distillation_loss, **stage)
        self.keep_optimizer(state, "distillation", optimizer)

        state["local"] = to_cpu(local.state_dict())
        state["receiver"] = to_cpu(receiver.state_dict())
        state["transmitter"] = to_cpu(transmitter.state_dict())
        return self.reply(client, messenger, {
            "injection-loss": injection_loss_mean,
            "distillation-loss": distillation_loss_mean,
            "steps": float(injection_steps + distillation_steps)})
