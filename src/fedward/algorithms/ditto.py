"""Ditto (Li et al. 2021): FedAvg's global model plus a personal model regularised toward it.

The global model w is trained exactly as FedAvg (the client sends its whole state dict, averaged
with weights n_k / sum_j n_j). Client k also keeps a personal model v_k (in its state; in its
first round it starts from the global model it receives) and trains it, before the global model,
for ``--ditto_personal_epochs`` epochs on

    h_k(v_k; w^t) = f_k(v_k) + (lambda/2) ||v_k - w^t||^2,   grad: grad f_k(v_k) + lambda (v_k - w^t),

w^t being the global model received this round (trainable parameters only; BatchNorm statistics
are v_k's own). v_k never leaves the client and is its deliverable.

Defaults: ``--ditto_lambda 1``, the value of the official code's run scripts (``--lam=1``; its
``main.py`` default is 0 and PFLlib's ``-mu`` default is 0, which make v_k plain local training,
while the paper tunes lambda per data set); ``--ditto_personal_epochs 1``, PFLlib's
``plocal_epochs``. Departure from the official code, which takes one personal and one global step
per batch in turn: the personal epochs run first, then FedAvg's, as PFLlib does (``ptrain`` then
``train``). Both use fedward's local optimizer (``--lr``, ``--adam`` ...), each its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedward.algorithms.base import Arrays, ClientReply, LocalTraining, ServerMessage, Workspace, to_cpu
from fedward.algorithms.fedavg import ExtraLossFn, FedAvg, train_local
from fedward.algorithms.fedprox import proximal_term
from fedward.algorithms.registry import register_method
from fedward.data.types import ClientData
from fedward.options import NON_NEGATIVE, at_least, option


@dataclass
class DittoOptions(LocalTraining):
    ditto_lambda: float = option(1.0, "lambda of the personal objective f(v) + (lambda/2)||v - w||^2 (the official "
                                      "code's run scripts: 1)", check=NON_NEGATIVE)
    ditto_personal_epochs: int = option(1, "epochs of personal training per round, before the global model's "
                                           "--epochs (PFLlib: 1)", check=at_least(1))


@register_method
class Ditto(FedAvg):
    name = "ditto"
    summary = "Ditto (Li et al. 2021): FedAvg + a personal model trained with (lambda/2)||v - w||^2"
    Options = DittoOptions
    personalised = True

    def client_update(self, ws: Workspace, client: ClientData, message: ServerMessage, state: dict[str, Any],
                      generator: torch.Generator) -> ClientReply:
        personal_loss = self.train_personal(ws, client, message, state, generator)
        reply = super().client_update(ws, client, message, state, generator)
        reply.metrics["personal-train-loss"] = personal_loss
        return reply

    def train_personal(self, ws: Workspace, client: ClientData, message: ServerMessage, state: dict[str, Any],
                       generator: torch.Generator) -> float:
        """``--ditto_personal_epochs`` on the personal model, which then goes into ``state``.
        Returns the mean personal objective."""
        cfg = self.cfg
        model = ws.model
        model.load_state_dict(state.get("personal", message.arrays))  # first round: the received global model
        loss_fn = self.task_loss(client, message.round)
        optimizer = self.kept_optimizer(model.parameters(), state, "personal-optimizer", message.round)
        _, mean_loss = train_local(
            ws, model, client, epochs=cfg.ditto_personal_epochs, batch_size=cfg.batch_size, loss_fn=loss_fn,
            optimizer=optimizer, generator=generator, extra_loss=self.personal_penalty(ws, model, message),
            balanced=cfg.instance_sampling,
            grad_clip=cfg.grad_clip if cfg.grad_clip is not None else self.default_grad_clip)
        if cfg.persist_optimizer_state:
            state["personal-optimizer"] = optimizer.state_dict()
        state["personal"] = to_cpu(model.state_dict())
        return mean_loss

    def personal_penalty(self, ws: Workspace, model: torch.nn.Module, message: ServerMessage) -> ExtraLossFn | None:
        """(lambda/2)||v - w^t||^2 over the trainable parameters, w^t the received global model."""
        if self.cfg.ditto_lambda == 0:
            return None
        anchor = {name: message.arrays[name].to(ws.device) for name, _ in model.named_parameters()}
        return lambda _extras, _inputs: proximal_term(model, anchor, self.cfg.ditto_lambda)

    def local_model_state(self, reply: ClientReply, state: dict[str, Any]) -> Arrays | None:
        return state.get("personal")
