"""FML, Federated Mutual Learning (Shen et al. 2020), as HtFLlib runs it for heterogeneous models.

Each client trains its private local model and a shared "meme" model (here the messenger
architecture, so it is the same small model MH-pFLID shares) together on every batch:
  local:  alpha * CE(local) + (1 - alpha) * KL(p_meme || p_local)
  meme:   beta  * CE(meme)  + (1 - beta)  * KL(p_local || p_meme)
and uploads the meme model, which the server averages (weights n_k). No separate stages, no R/T.

Departures from HtFLlib's ``clientfml``: each KL has its teacher detached (HtFLlib's target
probabilities carry gradient, so each model is also pushed towards the other's loss), KL is the
batch mean (HtFLlib's ``nn.KLDivLoss()`` averages over batch x classes, which scales the KL term by
1/K), and Adam at ``--local_lr`` (HtFLlib: SGD), like the other heterogeneous methods here. Its
gradient clip of 10 is kept (``--grad_clip`` overrides it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedward.algorithms.base import ClientReply, ServerMessage, Workspace, to_cpu
from fedward.algorithms.base import Epochs
from fedward.algorithms.heterogeneous import SharedModelMethod, SharedModelOptions, train_stage
from fedward.algorithms.registry import register_method
from fedward.options import UNIT_INTERVAL, option
from fedward.data.types import ClientData
from fedward.losses import distillation_kl


@dataclass
class FMLOptions(SharedModelOptions, Epochs):
    fml_alpha: float = option(0.5, "weight of CE in the local model's loss (1 - alpha on KL)", check=UNIT_INTERVAL)
    fml_beta: float = option(0.5, "weight of CE in the shared model's loss (1 - beta on KL)", check=UNIT_INTERVAL)


@register_method
class FML(SharedModelMethod):
    name = "fml"
    summary = "Federated Mutual Learning: local and shared (meme) model trained together"
    Options = FMLOptions
    default_grad_clip = 10.0  # HtFLlib's clip_grad_norm_(..., 10)

    def client_update(self, ws: Workspace, client: ClientData, message: ServerMessage, state: dict[str, Any],
                      generator: torch.Generator) -> ClientReply:
        cfg = self.cfg
        meme = self.load_shared(ws, message).train()
        local = self.load_local(ws, client, state).train()
        loss_fn = self.task_loss(client, message.round)
        optimizer = self.optimizer(state, "mutual", [{"params": list(local.parameters()), "lr": cfg.local_lr},
                                                     {"params": list(meme.parameters()), "lr": cfg.local_lr}])

        def mutual_loss(inputs, labels):
            local_logits, meme_logits = local(inputs), meme(inputs)
            local_loss = (cfg.fml_alpha * loss_fn(local_logits, labels)
                          + (1 - cfg.fml_alpha) * distillation_kl(local_logits, meme_logits))
            meme_loss = (cfg.fml_beta * loss_fn(meme_logits, labels)
                         + (1 - cfg.fml_beta) * distillation_kl(meme_logits, local_logits))
            # The teachers are detached, so one backward of the sum gives each model its own loss's gradient.
            return local_loss + meme_loss, local_loss

        steps, mean_loss = train_stage(
            ws, client.train, epochs=cfg.epochs, batch_size=cfg.batch_size, generator=generator, optimizer=optimizer,
            clip=self.grad_clip, clip_groups=[list(local.parameters()), list(meme.parameters())], batch_loss=mutual_loss)
        self.keep_optimizer(state, "mutual", optimizer)
        state["local"] = to_cpu(local.state_dict())
        return self.reply(client, meme, {"train-loss": mean_loss, "steps": float(steps)})
