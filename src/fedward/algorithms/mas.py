"""The arithmetic of Fed-MAS (Elbatel et al., MICCAI 2023), as the reference code computes it
(xmed-lab/Fed-MAS, methods/free.py; fedward reference notes fedmas.md section 2).

Pure functions on tensors, so each piece can be checked by hand:

- ``alignment_loss``: per-sample 2 - 2 cos(p(x), f(x)) between the client's projector output and
  the frozen prior's feature (the squared distance of the two L2-normalised vectors, in [0, 4]);
- ``ClassDivergence``: the class-wise divergence w_c = (1/N_c) * sum_{i: y_i = c} l_i, where N_c
  is the client's full class count (so with drop_last a class can be under-counted, and a very
  rare class can come out as 0, exactly as in the reference);
- ``robust_factor``: RF = sum over present classes of (w_c / sum w)(w_hat_c / sum w_hat), w_hat's
  sum over every class as in the reference (or over the present ones);
- the server weights of ``--aggregate_method`` mas, mas_inv and mas_DRW.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from fedward.errors import FedwardError


def alignment_loss(projection: torch.Tensor, prior_feature: torch.Tensor) -> torch.Tensor:
    """Per-sample 2 - 2 <p/|p|, f/|f|> for (B, D) inputs; shape (B,)."""
    if projection.shape != prior_feature.shape or projection.dim() != 2:
        raise ValueError(f"alignment_loss needs two (B, D) tensors of one shape, got {tuple(projection.shape)} "
                         f"and {tuple(prior_feature.shape)}")
    return 2.0 - 2.0 * (F.normalize(projection, dim=1) * F.normalize(prior_feature, dim=1)).sum(dim=1)


class ClassDivergence:
    """Accumulates w_c = sum over seen samples of class c of l_i / N_c, batch by batch.

    ``class_counts`` are the client's full train counts N_c. Across several epochs the sums add
    up (the reference's w_hat is a sum over epochs).
    """

    def __init__(self, class_counts: Sequence[int] | torch.Tensor):
        self.class_counts = torch.as_tensor(class_counts, dtype=torch.float64)
        self.totals = torch.zeros_like(self.class_counts)

    def add(self, per_sample: torch.Tensor, labels: torch.Tensor) -> None:
        sums = torch.zeros_like(self.totals)
        sums.index_add_(0, labels.to(torch.long).cpu(), per_sample.detach().to(torch.float64).cpu())
        self.totals += sums

    def value(self) -> torch.Tensor:
        """(C,) divergence per class; 0 for classes the client does not have."""
        counts = self.class_counts
        return torch.where(counts > 0, self.totals / counts.clamp(min=1), torch.zeros_like(self.totals))


RF_NORMALISATIONS = ("all", "present")


def robust_factor(before: torch.Tensor, during: torch.Tensor, *, inverse: bool = False,
                  normalise_over: str = "all") -> float:
    """RF = sum_{c in P} (w_c / sum_c' w_c')(w_hat_c / sum_c' w_hat_c'), P = {c : w_c != 0}.

    ``before`` is w (the received global model, before local training), ``during`` is w_hat
    (accumulated while training). With ``inverse`` (mas_inv) w_hat_c is replaced by 1 / w_hat_c
    over P before normalising.

    ``normalise_over`` is where w_hat's sum runs. ``all`` (the reference, and the paper's formula
    read literally): every class, so a class the pre-pass missed (w_c = 0: drop_last skipped every
    sample of a rare class) but training saw still counts in the sum, though not in P. ``present``:
    over P only, so the q_c of P sum to 1. The two agree whenever w and w_hat are zero for the
    same classes.
    """
    if normalise_over not in RF_NORMALISATIONS:
        raise ValueError(f"normalise_over must be one of {RF_NORMALISATIONS}, got {normalise_over!r}")
    before = before.to(torch.float64)
    during = during.to(torch.float64).clone()
    present = before != 0
    if inverse:
        # A rare class can be skipped by every drop_last batch of training (w_hat_c = 0) though the
        # pre-pass saw it; the reference then divides by zero (RF is NaN). fedward leaves such a
        # class out of P and of the sums.
        skipped = present & (during == 0)
        present &= ~skipped
        before = torch.where(skipped, torch.zeros_like(before), before)
    if not bool(present.any()):
        raise FedwardError("robust factor: the client's divergence is 0 for every class (no class present)")
    if inverse:
        during[present] = 1.0 / during[present]
    w_hat_total = during.sum() if normalise_over == "all" else during[present].sum()
    if float(w_hat_total) == 0.0:
        raise FedwardError("robust factor: the divergence during training is 0 for every present class")
    return float(((before[present] / before.sum()) * (during[present] / w_hat_total)).sum())


def mas_weights(robust_factors: Sequence[float]) -> list[float]:
    """Fed-MAS aggregation weights RF_k / sum_j RF_j (sample counts do not enter)."""
    total = float(sum(robust_factors))
    if total <= 0 or any(rf < 0 or math.isnan(rf) for rf in robust_factors):
        raise FedwardError(f"MAS weights need non-negative robust factors with a positive sum, got {list(robust_factors)}")
    return [float(rf) / total for rf in robust_factors]


def mas_drw_weights(robust_factors: Sequence[float], num_examples: Sequence[float], *, round_index: int,
                    total_rounds: int, beta: float = 0.9999) -> list[float]:
    """mas_DRW: FedAvg weights before round floor(0.8 R) (0-based ``round_index``); from then on
    v_k = (1/RF_k) / sum_j (1/RF_j), u_k = (1 - beta) / (1 - beta^v_k) normalised to sum to K,
    and alpha_k proportional to n_k * u_k."""
    if len(robust_factors) != len(num_examples):
        raise FedwardError(f"mas_DRW: {len(robust_factors)} robust factors but {len(num_examples)} example counts")
    counts = [float(n) for n in num_examples]
    if round_index < (4 * total_rounds) // 5:
        total = sum(counts)
        return [n / total for n in counts]
    if any(rf <= 0 for rf in robust_factors):
        raise FedwardError(f"mas_DRW needs positive robust factors, got {list(robust_factors)}")
    inverse = [1.0 / rf for rf in robust_factors]
    v = [x / sum(inverse) for x in inverse]
    u = [(1.0 - beta) / (1.0 - beta ** vk) for vk in v]
    u = [uk * len(u) / sum(u) for uk in u]
    raw = [n * uk for n, uk in zip(counts, u)]
    return [x / sum(raw) for x in raw]
