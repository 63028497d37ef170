"""Centralized training on the pooled data of every client: the upper bound (not possible in
practice, since hospitals cannot pool their data). The engine gives this method one
pseudo-client holding the union of the clients' train splits; a round is ``epochs`` epochs."""

from __future__ import annotations

from fedward.algorithms.base import LocalTraining
from fedward.algorithms.fedavg import FedAvg
from fedward.algorithms.registry import register_method


@register_method
class Centralized(FedAvg):
    name = "centralized"
    summary = "pooled training on every client's data (the upper bound; no deployment)"
    Options = LocalTraining
    centralized = True
    partial_participation = False

    def aggregate(self, round_index, global_state, replies, server_state):
        (reply,) = replies
        return reply.arrays, {}
