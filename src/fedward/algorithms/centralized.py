"""Centralized training on the pooled data of every client: the upper bound (not possible in
practice, since hospitals cannot pool their data). The engine gives this method one
pseudo-client holding the union of the clients' train splits; a round is ``epochs`` epochs."""

from __future__ import annotations

from fedward.algorithms.fedavg import FedAvg


class Centralized(FedAvg):
    name = "centralized"
    centralized = True

    def aggregate(self, round_index, global_state, replies):
        (reply,) = replies
        return reply.arrays, {}
