"""Secure aggregation: SecAgg+ (Bell et al. 2020) as Flower implements it, for methods whose server
step is a weighted average of the clients' models (the FedAvg family, Fed-MAS).

What each client sends: its update (trained minus received, for every floating-point array, in
name order) times its weight ratio ``w / max_weight``, clipped to +-``clipping_range``,
stochastically rounded to 2^22 levels and hidden under pairwise and private masks (Flower's
``secaggplus_mod``); ``w`` is the reply metric the method weights by (``num-examples``, Fed-MAS's
``robust-factor``) or 1 (equal weights, under ``--dp_clip``). What the server learns: the weighted
mean of the updates (Flower's ``SecAggPlusWorkflow`` removes the masks only from the sum), each
reply's scalar metrics and integer buffers (BatchNorm's ``num_batches_tracked``) in the clear, and
who took part. Not any one client's update.

The stochastic rounding is drawn from a stream seeded by (seed, round, client), so a run is
reproducible and resumes to the same numbers. The in-process simulation sums the same quantised
vectors without the masks, which cancel exactly in the modular sum: both engines give the same
aggregate bit for bit.

This module needs NumPy and Flower only (the ClientApp imports it without torch); Flower is
imported when a function needs it.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

# Flower's SecAgg+ defaults: 2^22 quantisation levels, masks modulo 2^32. Each client's weight
# factor is at most 2^22, so the summed factor stays below 2^32 for at most 1023 clients a round.
QUANTIZATION_RANGE = 1 << 22
MODULUS_RANGE = 1 << 32
MAX_CLIENTS = MODULUS_RANGE // QUANTIZATION_RANGE - 1
SECURE_CONFIG = "secure-aggregation"  # key of the train message's config: the client's side of the settings
CLEAR_RECORD = "secure-clear"  # reply record: what travels in the clear (array names, integer buffers)
CLIPPED_METRIC = "secure-clipped"  # reply metric: entries the clipping range cut


@dataclass(frozen=True)
class SecureSettings:
    """One round's SecAgg+ settings. ``weight_metric``: the reply metric each client weights its
    update by (None: equal weights); ``max_weight``: a bound on it over the federation (Flower's
    ``max_weight``: each client's weight ratio ``w / max_weight`` must be at most 1)."""

    weight_metric: str | None
    max_weight: float
    clipping_range: float = 8.0
    shares: float = 1.0
    threshold: float = 0.5

    def client_json(self) -> str:
        """What a client needs to prepare its update (the masks' settings come with the protocol)."""
        return json.dumps({"weight_metric": self.weight_metric, "max_weight": self.max_weight,
                           "clipping_range": self.clipping_range})


@dataclass
class ClientUpdate:
    """A client's part, before quantisation: its float arrays' names and updates, its weight, its
    integer arrays (sent in the clear) and how many weighted entries the clipping range cuts."""

    names: list[str]
    update: list[np.ndarray]
    weight: float
    clear: dict[str, np.ndarray]
    clipped: int

    def clear_json(self) -> str:
        return json.dumps({"names": self.names,
                           "clear": {k: {"shape": list(v.shape), "values": v.reshape(-1).tolist()}
                                     for k, v in self.clear.items()}})


def client_update(start: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray], metrics: Mapping[str, float],
                  settings: Mapping[str, Any]) -> ClientUpdate:
    """A client's update ``trained - start`` for every floating-point array (name order), in float64
    (float32 would hold an entry plus the clipping range to a quarter of a quantisation level, so
    small entries would not be rounded at random), with the integer arrays as they are.
    ``settings``: :meth:`SecureSettings.client_json`, decoded. Raises ValueError for an update that
    cannot be summed (an array the server did not send, a NaN, a weight outside [0, max_weight])."""
    names, update, clear = [], [], {}
    for name in sorted(trained):
        value = np.asarray(trained[name])
        if not np.issubdtype(value.dtype, np.floating):
            clear[name] = value
            continue
        if name not in start or np.shape(start[name]) != value.shape:
            raise ValueError(f"secure aggregation sums updates of the arrays the server sent; '{name}' is not one")
        delta = value.astype(np.float64) - np.asarray(start[name], dtype=np.float64)
        if not np.isfinite(delta).all():
            raise ValueError(f"the update of '{name}' holds NaN or Inf: it cannot enter the secure sum")
        names.append(name)
        update.append(delta)
    metric = settings["weight_metric"]
    weight = 1.0 if metric is None else float(metrics[metric])
    if not 0 <= weight <= float(settings["max_weight"]):
        raise ValueError(f"the weight {metric} = {weight:g} is outside [0, {settings['max_weight']:g}]: its ratio "
                         "would overflow the secure sum")
    bound = float(settings["clipping_range"]) * float(settings["max_weight"]) / weight if weight > 0 else np.inf
    clipped = int(sum(int((np.abs(d) > bound).sum()) for d in update))
    return ClientUpdate(names, update, weight, clear, clipped)


def rounding_seed(seed: int, round_index: int, client_id: int) -> int:
    """The seed of the stochastic rounding of one client's update in one round."""
    return int(np.random.SeedSequence([int(seed), 0x5EC, int(round_index), int(client_id)]).generate_state(1)[0])


@contextlib.contextmanager
def numpy_seeded(seed: int) -> Iterator[None]:
    """NumPy's global generator seeded for Flower's ``quantize`` (which draws from it), and restored after."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


def quantised(update: ClientUpdate, max_weight: float, clipping_range: float, seed: int) -> list[np.ndarray]:
    """The integer vector ``secaggplus_mod`` masks: the weight ratio quantised, then the update times
    it, clipped and stochastically rounded (Flower's own functions, in its order), without the masks."""
    from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, parameters_multiply
    from flwr.common.secure_aggregation.quantization import quantize

    q_ratio = round(update.weight / max_weight * QUANTIZATION_RANGE)
    weighted = parameters_multiply(update.update, q_ratio / QUANTIZATION_RANGE)
    with numpy_seeded(seed):
        return factor_combine(q_ratio, quantize(weighted, clipping_range, QUANTIZATION_RANGE))


def modular_sum(vectors: Sequence[list[np.ndarray]]) -> list[np.ndarray]:
    """The clients' vectors summed modulo 2^32: what the server holds once the masks are removed."""
    from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_addition, parameters_mod

    total = [np.asarray(a, dtype=np.int64) for a in vectors[0]]
    for vector in vectors[1:]:
        total = parameters_addition(total, vector)
    return parameters_mod(total, MODULUS_RANGE)


def weighted_mean(total: list[np.ndarray], num_clients: int, clipping_range: float) -> list[np.ndarray]:
    """The weighted mean update from the modular sum of ``num_clients`` vectors, as Flower's
    unmask stage computes it: dequantise, remove the K - 1 extra offsets, divide by the summed
    weight ratios."""
    from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_extract
    from flwr.common.secure_aggregation.quantization import dequantize

    q_total, vectors = factor_extract(total)
    mean = dequantize(vectors, clipping_range, QUANTIZATION_RANGE)
    offset, scale = -(num_clients - 1) * clipping_range, QUANTIZATION_RANGE / q_total
    for vector in mean:
        vector += offset
        vector *= scale
    return mean


def error_bound(num_clients: int, summed_ratio: float, clipping_range: float, largest_update: float) -> float:
    """The largest difference between the secure mean and the exact weighted mean of updates no
    larger than ``largest_update`` (and not clipped): each client's stochastic rounding is off by
    less than one level, 2c / 2^22, and each weight ratio by half of one of 2^22 levels; the sum is
    divided by the summed weight ratios."""
    return num_clients * (2 * clipping_range + largest_update) / QUANTIZATION_RANGE / summed_ratio
