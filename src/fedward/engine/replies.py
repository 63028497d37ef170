"""Server-side checks on a client's reply before it may enter an aggregate.

A reply is rejected (and the reason logged) when it carries an array the method does not declare,
a NaN or Inf, an array whose shape or dtype differs from the global model's, or a metric that is
not a finite number. A rejected reply is left out of that round's aggregate; the run goes on.
"""

from __future__ import annotations

import math

import torch

from fedward.algorithms.base import Algorithm, Arrays, ClientReply


def reply_problem(algorithm: Algorithm, reply: ClientReply, global_state: Arrays,
                  reference: Arrays | None = None) -> str | None:
    """Why ``reply`` must not be aggregated, or None when it is sound. ``reference``: the arrays its
    shapes and dtypes are checked against (default: the global model's)."""
    reference = global_state if reference is None else reference
    declared = algorithm.declared_reply_keys(global_state)
    undeclared = sorted(set(reply.arrays) - declared)
    if undeclared:
        return f"undeclared array(s) {undeclared[:5]}: {algorithm.name} replies may only carry its declared arrays"
    for name, value in reply.metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"metric '{name}' is {value!r}, not a finite number"
    if "num-examples" in reply.metrics and reply.metrics["num-examples"] <= 0:
        return f"metric 'num-examples' is {reply.metrics['num-examples']}, expected > 0"
    for name, tensor in reply.arrays.items():
        if not isinstance(tensor, torch.Tensor):
            return f"array '{name}' is a {type(tensor).__name__}, not a tensor"
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            return f"array '{name}' holds {bad} non-finite value(s) (NaN or Inf)"
    try:
        as_state = algorithm.reply_as_state(reply.arrays, reference)
    except (KeyError, RuntimeError, ValueError) as err:
        return f"arrays do not form the global model: {err}"
    for name, tensor in as_state.items():
        expected = reference.get(name)
        if expected is None:
            continue
        if tuple(tensor.shape) != tuple(expected.shape):
            return f"array '{name}' has shape {tuple(tensor.shape)}, expected {tuple(expected.shape)}"
        if tensor.dtype != expected.dtype:
            return f"array '{name}' has dtype {tensor.dtype}, expected {expected.dtype}"
    return None
