"""Local training (every hospital alone): the lower bound. Nothing is exchanged after the
initial weights; each client's model lives in its own state and is the deliverable.

With ``--client_models`` every client has its own architecture (MH-pFLID's lower bound) and
builds its own seeded initial weights, so nothing at all is exchanged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedward.algorithms.base import Arrays, ClientReply, LocalTraining, ServerMessage, Workspace, check_client_models
from fedward.algorithms.fedavg import FedAvg
from fedward.algorithms.registry import register_method
from fedward.options import option
from fedward.data.types import ClientData


@dataclass
class LocalOptions(LocalTraining):
    client_models: list[str] = option(factory=list, help="one local model per client, e.g. resnet17,resnet11,resnet8,"
                                                         "resnet5 (default: --model for every client)")


@register_method
class Local(FedAvg):
    name = "local"
    summary = "every hospital alone (the lower bound); its models are the deliverable"
    Options = LocalOptions
    personalised = True
    partial_participation = False

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        check_client_models(cfg)

    def server_message(self, round_index: int, global_state: Arrays, server_state) -> ServerMessage:
        # Only the first round carries the (data-free) initial weights, so all clients start equal.
        arrays = global_state if round_index == 1 and not self.heterogeneous else {}
        return ServerMessage(round=round_index, arrays=arrays, config={"total-rounds": self.cfg.comm_round})

    def load_start_model(self, ws: Workspace, message: ServerMessage, state: dict[str, Any], client: ClientData):
        model = self.local_model(ws, client.client_id)
        if "model" in state:
            model.load_state_dict(state["model"])
        elif self.heterogeneous:
            model.load_state_dict(self.initial_local_state(client.client_id))
        else:
            model.load_state_dict(message.arrays)
        return model

    def client_update(self, ws: Workspace, client: ClientData, message: ServerMessage, state: dict[str, Any],
                      generator: torch.Generator) -> ClientReply:
        reply = super().client_update(ws, client, message, state, generator)
        state["model"] = reply.arrays
        # The local model never leaves the client: the reply carries metrics only.
        return ClientReply(client_id=reply.client_id, arrays={}, metrics=reply.metrics)

    def local_model_state(self, reply: ClientReply, state: dict[str, Any]) -> Arrays | None:
        return state.get("model")

    def aggregate(self, round_index, global_state, replies, server_state):
        return global_state, {}

    def declared_reply_keys(self, global_state: Arrays) -> set[str]:
        return set()
