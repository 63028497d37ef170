"""Server-side averaging of state dicts."""

from __future__ import annotations

from typing import Sequence

import torch

from fedward.errors import FedwardError

Arrays = dict[str, torch.Tensor]


def example_weights(num_examples: Sequence[float]) -> list[float]:
    """FedAvg weights n_k / sum_j n_j."""
    total = float(sum(num_examples))
    if total <= 0:
        raise FedwardError(f"cannot weight clients by examples: the counts {list(num_examples)} sum to {total}")
    return [float(n) / total for n in num_examples]


def weighted_average(states: Sequence[Arrays], weights: Sequence[float]) -> Arrays:
    """sum_k w_k * state_k for every entry, accumulated in a fixed order (the order given), so the
    result does not depend on which client finished first.

    Floating-point entries are averaged in float32. Integer entries (BatchNorm's
    ``num_batches_tracked``) are averaged in float32 and truncated toward zero, as the reference's
    ``sum(sd[key] * cw[i])`` loaded back into an integer buffer is (a counter that no fedward model
    reads: BatchNorm uses it only without a momentum). The reference sums every entry, BN running
    statistics included.
    """
    if not states:
        raise FedwardError("cannot aggregate: no client replied this round")
    if len(states) != len(weights):
        raise FedwardError(f"cannot aggregate: {len(states)} states but {len(weights)} weights")
    keys = list(states[0])
    for index, state in enumerate(states[1:], start=1):
        if list(state) != keys:
            missing = sorted(set(keys) - set(state))[:5]
            extra = sorted(set(state) - set(keys))[:5]
            raise FedwardError(f"cannot aggregate: reply {index} has different arrays (missing {missing}, unexpected {extra})")
    result: Arrays = {}
    for key in keys:
        first = states[0][key]
        if first.is_floating_point():
            acc = torch.zeros_like(first, dtype=torch.float32)
            for state, weight in zip(states, weights):
                acc.add_(state[key].to(torch.float32), alpha=float(weight))
            result[key] = acc.to(first.dtype)
        else:
            total = torch.zeros_like(first, dtype=torch.float32)
            for state, weight in zip(states, weights):
                total = total + state[key] * float(weight)
            result[key] = total.trunc().to(first.dtype)
    return result
