"""Secure aggregation in the round loop (:mod:`fedward.secure_aggregation`): the clients' side as
the in-process simulation runs it, and the server's model from the secure mean, for both engines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from fedward.algorithms.aggregate import weighted_average
from fedward.algorithms.base import Arrays, ClientReply
from fedward.errors import FedwardError
from fedward.secure_aggregation import (
    CLIPPED_METRIC, ClientUpdate, SecureSettings, client_update, modular_sum, quantised, rounding_seed, weighted_mean,
)

MIN_CLIENTS = 2  # Flower's SecAgg+ refuses a round of fewer: one client's "sum" is its update


@dataclass
class SecureMean:
    """What the server learns of a round's updates: their weighted mean (float arrays, in ``names``
    order) over the ``num_clients`` clients in the sum."""

    names: list[str]
    mean: list[np.ndarray]
    num_clients: int


def numpy_arrays(arrays: Arrays) -> dict[str, np.ndarray]:
    return {name: tensor.detach().cpu().numpy() for name, tensor in arrays.items()}


def clear_reply(reply: ClientReply, update: ClientUpdate) -> ClientReply:
    """The reply as the server sees it: metrics (and the count of clipped entries) and integer buffers."""
    return ClientReply(reply.client_id, {name: reply.arrays[name] for name in update.clear},
                       {**reply.metrics, CLIPPED_METRIC: float(update.clipped)})


def secure_in_process(outcomes: list, start: Arrays, settings: SecureSettings, seed: int,
                      round_index: int) -> tuple[list, SecureMean | None]:
    """The simulation's secure round: each client's update quantised as its node would (same seed,
    same functions), summed without the masks (they cancel exactly), and the weighted mean taken as
    Flower's server does. A client whose update cannot be summed is dropped, as its node's error
    reply would be. Outcomes are updated in place to what the server sees."""
    start_np = numpy_arrays(start)
    client_settings = json.loads(settings.client_json())
    vectors, names = [], None
    for outcome in sorted(outcomes, key=lambda o: o.client_id):
        if outcome.status != "ok":
            continue
        try:
            update = client_update(start_np, numpy_arrays(outcome.reply.arrays), outcome.reply.metrics, client_settings)
        except ValueError as err:
            outcome.status, outcome.reply, outcome.reason = "dropped", None, f"error on the client: {err}"
            continue
        names = update.names if names is None else names
        if update.names != names:
            raise FedwardError(f"secure aggregation: client {outcome.client_id} updates other arrays than the others")
        vectors.append(quantised(update, settings.max_weight, settings.clipping_range,
                                 rounding_seed(seed, round_index, outcome.client_id)))
        outcome.reply = clear_reply(outcome.reply, update)
    if len(vectors) < MIN_CLIENTS:
        return outcomes, None
    return outcomes, SecureMean(names, weighted_mean(modular_sum(vectors), len(vectors), settings.clipping_range),
                                len(vectors))


def secure_average(global_state: Arrays, mean: SecureMean, replies: list[ClientReply], weights: list[float]) -> Arrays:
    """The replies' weighted average as the server can form it: the global model plus the secure mean
    update for the floating-point arrays, the clear integer buffers averaged as in the clear."""
    if mean.num_clients != len(replies):
        raise FedwardError(f"the secure sum holds {mean.num_clients} clients' updates but {len(replies)} replies are usable")
    updates = dict(zip(mean.names, mean.mean))
    integers = weighted_average([r.arrays for r in replies], weights) if replies[0].arrays else {}
    average: Arrays = {}
    for name, value in global_state.items():
        if name in updates:
            average[name] = (value.double() + torch.from_numpy(np.asarray(updates[name], dtype=np.float64))).to(value.dtype)
        elif name in integers:
            average[name] = integers[name]
    return average
