"""Cyclic weight transfer (Chang et al. 2018), FLamby's ``Cyclic`` strategy: one client per round.

The model visits the clients in turn: in each round one client trains the global model for
``--epochs`` local epochs and its model becomes the global model. The order is a permutation of
the clients drawn anew for every cycle of K rounds from ``--seed`` (FLamby's default), or 0, 1,
..., K-1 every cycle with ``--deterministic_cycle``. A round is one client visit, as FLamby's
``nrounds``.

Departure from FLamby's current code, which keeps one model per client so that no weights pass
between clients (its commit 700be02 replaced the shared model): here the model is handed on, as
in Chang et al. and FLamby before that commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedward.algorithms.base import Arrays, ClientReply, GlobalTraining
from fedward.algorithms.fedavg import FedAvg
from fedward.algorithms.registry import register_method
from fedward.options import option
from fedward.seeding import numpy_generator


@dataclass
class CyclicOptions(GlobalTraining):
    deterministic_cycle: bool = option(False, "visit the clients in id order every cycle instead of a seeded "
                                              "permutation per cycle")


@register_method
class Cyclic(FedAvg):
    name = "cyclic"
    summary = "cyclic weight transfer (FLamby's Cyclic): one client trains the model per round, in turn"
    Options = CyclicOptions
    client_dp_refusal = "one client's model is the next round's start, so nothing is averaged for the noise to hide in"
    secure_aggregation_refusal = "one client trains per round, so there is no sum to hide its model in"
    partial_participation = False

    def cycle_order(self, cycle: int, client_ids: list[int]) -> list[int]:
        if self.cfg.deterministic_cycle:
            return list(client_ids)
        order = numpy_generator(self.cfg.seed, "cyclic-order", cycle).permutation(len(client_ids))
        return [client_ids[i] for i in order]

    def select_clients(self, round_index: int, client_ids: list[int], server_state: dict[str, Any]) -> list[int]:
        cycle, position = divmod(round_index - 1, len(client_ids))
        return [self.cycle_order(cycle, client_ids)[position]]

    def aggregate(self, round_index: int, global_state: Arrays, replies: list[ClientReply],
                  server_state: dict[str, Any]) -> tuple[Arrays, dict[str, Any]]:
        (reply,) = replies
        return dict(reply.arrays), {"weights": [1.0]}
