"""FedKD (Wu et al., Nature Communications 2022), as HtFLlib runs it for heterogeneous models.

Each client keeps a private mentor (its local model) and trains it together with the shared
mentee (the messenger architecture) on every batch, with adaptive distillation: the distillation
terms are divided by the sum of the two task losses, so they weigh more once both models fit:
  L = CE_local + CE_mentee + (KL(p_mentee || p_local) + KL(p_local || p_mentee) + MSE(h_local, W_h h_mentee)) / (CE_local + CE_mentee)
W_h (a per-client linear map from the mentee's to the mentor's feature width) stays on the
client. The mentee travels SVD-compressed both ways, keeping ``fedkd_energy_start`` of the
energy in round 1 rising linearly to ``fedkd_energy_end`` (HtFLlib's schedule; 1 turns
compression off); the server averages the reconstructed mentees with weights n_k.

Departures from HtFLlib's ``clientkd``: the teachers in each KL and the loss denominator are
detached (HtFLlib differentiates through both), the hidden-feature MSE is counted once (HtFLlib
adds the identical term to both losses, doubling its gradient), KL is the batch mean, Adam at
``--local_lr`` for both models and W_h, and the server weights by n_k (HtFLlib: uniform).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedward.algorithms.aggregate import example_weights, weighted_average
from fedward.algorithms.base import Arrays, ClientReply, Epochs, ServerMessage, Workspace, to_cpu
from fedward.algorithms.compression import compress, compressed_names, decompress
from fedward.algorithms.heterogeneous import SharedModelMethod, SharedModelOptions, train_stage
from fedward.algorithms.registry import register_method
from fedward.data.types import ClientData
from fedward.losses import distillation_kl
from fedward.models.registry import init_weights
from fedward.options import OPEN_UNIT, option


@dataclass
class FedKDOptions(SharedModelOptions, Epochs):
    fedkd_energy_start: float = option(0.95, "fraction of SVD energy kept in round 1 (1: no compression)",
                                       check=OPEN_UNIT)
    fedkd_energy_end: float = option(0.98, "fraction of SVD energy kept in the last round", check=OPEN_UNIT)


@register_method
class FedKD(SharedModelMethod):
    name = "fedkd"
    summary = "FedKD: mentor (local) and mentee (shared) with adaptive distillation, SVD-compressed messages"
    Options = FedKDOptions
    default_grad_clip = 10.0  # HtFLlib's clip_grad_norm_(..., 10)

    def energy(self, round_index: int) -> float:
        """SVD energy kept in ``round_index`` (1-based): linear from start (round 1) towards end."""
        start, end = self.cfg.fedkd_energy_start, self.cfg.fedkd_energy_end
        return start + (round_index - 1) / self.cfg.comm_round * (end - start)

    # -- server -------------------------------------------------------------------------------
    def server_message(self, round_index: int, global_state: Arrays, server_state: dict[str, Any]) -> ServerMessage:
        return ServerMessage(round=round_index, arrays=compress(global_state, self.energy(round_index)),
                             config={"total-rounds": self.cfg.comm_round})

    def aggregate(self, round_index: int, global_state: Arrays, replies: list[ClientReply],
                  server_state: dict[str, Any]) -> tuple[Arrays, dict[str, Any]]:
        weights = example_weights([r.metrics["num-examples"] for r in replies])
        states = [decompress(r.arrays, global_state) for r in replies]
        return weighted_average(states, weights), {"weights": weights}

    def declared_reply_keys(self, global_state: Arrays) -> set[str]:
        return set().union(*(compressed_names(name) for name in global_state))

    def reply_as_state(self, arrays: Arrays, global_state: Arrays) -> Arrays:
        return decompress(arrays, global_state)

    # -- client -------------------------------------------------------------------------------
    def client_update(self, ws: Workspace, client: ClientData, message: ServerMessage, state: dict[str, Any],
                      generator: torch.Generator) -> ClientReply:
        cfg = self.cfg
        mentee = ws.model
        mentee.load_state_dict(decompress(message.arrays, mentee.state_dict()))
        mentee.train()
        mentor = self.load_local(ws, client, state).train()
        mentor_width, mentee_width = mentor.num_features, mentee.num_features

        def build_projection(generator: torch.Generator | None) -> nn.Module:
            projection = nn.Linear(mentee_width, mentor_width, bias=False)
            init_weights(projection, generator)
            return projection

        projection = self.load_client_module(ws, client, state, "hidden-projection", build_projection).train()
        loss_fn = self.task_loss(client, message.round)
        modules = (mentor, mentee, projection)
        optimizer = self.optimizer(state, "mutual", [{"params": list(m.parameters()), "lr": cfg.local_lr}
                                                     for m in modules])

        def adaptive_loss(inputs, labels):
            mentor_hidden, mentee_hidden = mentor.embed(inputs), mentee.embed(inputs)
            mentor_logits, mentee_logits = mentor.fc(mentor_hidden), mentee.fc(mentee_hidden)
            mentor_ce, mentee_ce = loss_fn(mentor_logits, labels), loss_fn(mentee_logits, labels)
            distillation = (distillation_kl(mentor_logits, mentee_logits) + distillation_kl(mentee_logits, mentor_logits)
                            + F.mse_loss(mentor_hidden, projection(mentee_hidden)))
            loss = mentor_ce + mentee_ce + distillation / (mentor_ce + mentee_ce).detach()
            return loss, loss

        steps, mean_loss = train_stage(
            ws, client.train, epochs=cfg.epochs, batch_size=cfg.batch_size, generator=generator, optimizer=optimizer,
            clip=self.grad_clip, clip_groups=[list(m.parameters()) for m in modules], batch_loss=adaptive_loss)
        self.keep_optimizer(state, "mutual", optimizer)
        state["local"] = to_cpu(mentor.state_dict())
        state["hidden-projection"] = to_cpu(projection.state_dict())
        reply = self.reply(client, mentee, {"train-loss": mean_loss, "steps": float(steps)})
        reply.arrays = compress(reply.arrays, self.energy(message.round))
        return reply
