"""Low-rank (truncated SVD) compression of model arrays, as FedKD sends its shared model.

A floating-point tensor with at least two dimensions is viewed as a matrix (first dimension x the
rest, so a conv kernel (O, I, kh, kw) becomes O x I*kh*kw), factored as U S V^T, and cut to the
smallest rank r whose singular values keep ``energy`` of the total sum of squares. It travels as
two arrays, ``<name>::svd_u`` = U_r S_r and ``<name>::svd_v`` = V_r^T, when that is smaller than
the tensor; everything else travels as it is. FedKD (Wu et al. 2022) and HtFLlib factor tensors
the same way with an energy threshold; HtFLlib runs a batched SVD over a conv kernel's last two
dimensions instead, which is not a low-rank view of the layer.
"""

from __future__ import annotations

import torch

Arrays = dict[str, torch.Tensor]
U_SUFFIX, V_SUFFIX = "::svd_u", "::svd_v"


def kept_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r with sum_{i<r} s_i^2 >= energy * sum s_i^2 (at least 1)."""
    squares = singular_values.double() ** 2
    total = squares.sum()
    if total == 0:
        return 1
    cumulative = torch.cumsum(squares, 0)
    return int(torch.searchsorted(cumulative, energy * total * (1 - 1e-12)).item()) + 1


def compress(arrays: Arrays, energy: float) -> Arrays:
    """The arrays to send: low-rank factors where they are smaller, the tensors themselves otherwise."""
    if energy >= 1:
        return dict(arrays)
    out: Arrays = {}
    for name, tensor in arrays.items():
        if not tensor.is_floating_point() or tensor.dim() < 2 or min(tensor.shape[0], tensor[0].numel()) < 2:
            out[name] = tensor
            continue
        matrix = tensor.reshape(tensor.shape[0], -1).double()
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        rank = min(kept_rank(s, energy), len(s))
        rows, cols = matrix.shape
        if rank * (rows + cols) >= rows * cols:
            out[name] = tensor
            continue
        out[name + U_SUFFIX] = (u[:, :rank] * s[:rank]).to(tensor.dtype)
        out[name + V_SUFFIX] = vh[:rank].to(tensor.dtype).contiguous()
    return out


def decompress(arrays: Arrays, template: Arrays) -> Arrays:
    """Full tensors, in ``template``'s key order and shapes, from what :func:`compress` sent."""
    out: Arrays = {}
    for name, like in template.items():
        if name in arrays:
            out[name] = arrays[name]
        elif name + U_SUFFIX in arrays and name + V_SUFFIX in arrays:
            out[name] = (arrays[name + U_SUFFIX] @ arrays[name + V_SUFFIX]).reshape(like.shape).to(like.dtype)
        else:
            raise KeyError(f"compressed arrays hold neither '{name}' nor its factors '{name}{U_SUFFIX}', '{name}{V_SUFFIX}'")
    return out


def compressed_names(name: str) -> set[str]:
    """Every array name under which ``name`` may travel."""
    return {name, name + U_SUFFIX, name + V_SUFFIX}
