"""LG-FedAvg (Liang et al. 2020): local representations, a global head.

The opposite split of FedRep: the body (every state-dict key not starting with ``fc.``, BatchNorm
statistics included) is client i's own local representation, the head (the final classifier
``fc``) is global. Each round client i loads the global head h^t onto its own body (in its first
round: the seeded initial body, the same for every client), trains the whole model for
``--epochs`` epochs, keeps its body and sends its head; the server sets
h^{t+1} = sum_i w_i h_i with FedAvg's weights w_i = n_i / sum_j n_j (n_i = floor(N_i/B) B). The
global state dict keeps the initial body, so it stays a whole model; no body ever leaves its
client. Client i's deliverable is its body with the head it has just trained.

No options of its own: local training is FedAvg's (``--epochs``, ``--lr`` ...). Departures from the
paper: the global part is ``fc`` alone (fedward's models have one classifier layer; the paper's
global model may be several top layers), and there is no FedAvg warm start: local bodies start
from the seeded initial model. Departure from PFLlib, which evaluates the client's body with the
newly averaged head: the deliverable is the body with the head the client has just trained.
"""

from __future__ import annotations

from typing import Any

from fedward.algorithms.base import Arrays, ClientReply, LocalTraining, ServerMessage, TaskSpec, Workspace
from fedward.algorithms.fedavg import FedAvg
from fedward.algorithms.fedrep import average_part, body_of, check_head_split, head_of
from fedward.algorithms.registry import register_method
from fedward.data.types import ClientData


@register_method
class LGFedAvg(FedAvg):
    name = "lgfedavg"
    summary = "LG-FedAvg (Liang et al. 2020): each client's body stays with it, the head fc is averaged"
    Options = LocalTraining
    personalised = True

    @classmethod
    def prepare_run(cls, cfg, spec: TaskSpec, num_clients: int) -> None:
        super().prepare_run(cfg, spec, num_clients)
        check_head_split(cls, cfg, spec)

    def declared_reply_keys(self, global_state: Arrays) -> set[str]:
        return set(head_of(global_state))

    def reply_reference(self, global_state: Arrays, server_state: dict[str, Any]) -> Arrays:
        return head_of(global_state)

    def aggregate(self, round_index: int, global_state: Arrays, replies: list[ClientReply],
                  server_state: dict[str, Any]) -> tuple[Arrays, dict[str, Any]]:
        return average_part(global_state, replies)

    # -- client ---------------------------------------------------------------------------------
    def load_start_model(self, ws: Workspace, message: ServerMessage, state: dict[str, Any], client: ClientData):
        model = super().load_start_model(ws, message, state, client)
        if "body" in state:
            model.load_state_dict(state["body"], strict=False)
        return model

    def reply_arrays(self, trained: Arrays, message: ServerMessage, state: dict[str, Any], steps: int) -> Arrays:
        # The head is kept only as part of the deliverable: next round starts from the global head.
        state["body"], state["head"] = body_of(trained), head_of(trained)
        return state["head"]

    def local_model_state(self, reply: ClientReply, state: dict[str, Any]) -> Arrays | None:
        return {**state["body"], **state["head"]} if "body" in state else None
