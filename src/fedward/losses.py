"""Local (per-client) classification losses for imbalanced data.

Each loss is built from one client's own class counts n_j (j = 0..C-1), with the formulas of the
Fed-MAS reference code (xmed-lab/Fed-MAS, ``methods/utils.py::get_criterion``), plus FLamby's
weighted focal loss for Fed-ISIC2019. Build them with :func:`build_loss`.

Class-weighted cross-entropies (CB, RW, LDAM after DRW) reduce like ``nn.CrossEntropyLoss(weight=w)``,
as the reference does: ``'none'`` gives ``w[y_i] * l_i``, ``'sum'`` gives ``sum_i w[y_i] l_i`` and
``'mean'`` gives the weighted mean ``sum_i w[y_i] l_i / sum_i w[y_i]`` (so it is *not* the mean of
``'none'``). All other losses reduce with a plain mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedward.errors import ConfigError

REDUCTIONS = ("mean", "none", "sum")
CB_BETA = 0.9999
LDAM_MAX_MARGIN = 0.5
LDAM_SCALE = 30.0
DRW_START_FRACTION = (4, 5)  # DRW starts at round floor(0.8 * R), computed in integers as 4R // 5
FOCAL_GAMMA = 2.0
BSM_EPS = 1e-12
LCC_TAU = 0.5
LCC_MIN_COUNT = 1e-8

CountsLike = Sequence[int] | Tensor | np.ndarray


def as_class_counts(counts: CountsLike, what: str = "class_counts") -> Tensor:
    """Check class counts (1-D, >= 2 entries, non-negative integers, positive total); return float64."""
    array = np.asarray(counts.detach().cpu() if isinstance(counts, Tensor) else counts)
    if array.ndim != 1 or array.size < 2:
        raise ConfigError(f"{what} must be a 1-D list of at least 2 per-class counts, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ConfigError(f"{what} must hold numbers, got dtype {array.dtype}")
    values = array.astype(np.float64)
    if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values != np.round(values)):
        raise ConfigError(f"{what} must be non-negative whole numbers, got {array.tolist()}")
    if values.sum() <= 0:
        raise ConfigError(f"{what} must have a positive total, got {array.tolist()}")
    return torch.from_numpy(values)


def balanced_softmax_adjustments(counts: Tensor) -> Tensor:
    """log(pi_j + 1e-12) with pi_j = n_j / sum(n); an absent class gets log(1e-12) ~ -27.6."""
    prior = counts / counts.sum()
    return torch.log(prior + BSM_EPS)


def class_balanced_weights(counts: Tensor, beta: float = CB_BETA) -> Tensor:
    """Effective-number weights (1 - beta) / (1 - beta^n_j), normalised to sum to the present-class count.

    Absent classes (n_j = 0) get weight 0, as in the reference: the formula would divide by zero, and such a
    class never appears as a target on this client, so its weight is never used.
    """
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=counts.dtype), counts[present]))
    return weights / weights.sum() * present.sum()


def inverse_frequency_weights(counts: Tensor) -> Tensor:
    """RW weights n / (C * n_j); absent classes get 0 (never a target here, and 1/0 is undefined)."""
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts.sum() / (counts.numel() * counts[present])
    return weights


def ldam_margins(counts: Tensor, max_margin: float = LDAM_MAX_MARGIN) -> Tensor:
    """Margins m_j proportional to n_j^(-1/4), scaled so the largest (rarest present class) is max_margin.

    Departure from the reference: it gives absent classes margin 0; we give them max_margin, the margin the
    formula tends to as n_j -> 0. Either way it is never used, since a margin only applies to the target
    logit and an absent class is never a target on this client.
    """
    present = counts > 0
    margins = torch.full_like(counts, max_margin)
    raw = counts[present].pow(-0.25)
    margins[present] = raw * (max_margin / raw.max())
    return margins


def drw_start_round(total_rounds: int) -> int:
    """First 0-based round with DRW on: floor(0.8 * total_rounds)."""
    numerator, denominator = DRW_START_FRACTION
    return (numerator * total_rounds) // denominator


class LocalLoss(nn.Module):
    """A classification loss built from one client's class counts.

    ``forward(logits, targets)`` takes logits of shape (B, C) and int64 targets of shape (B,) and
    returns a scalar, or per-sample losses of shape (B,) when ``reduction == 'none'``.
    """

    name: str = ""
    needs_cosine_classifier: bool = False

    def __init__(self, class_counts: Tensor, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ConfigError(f"loss reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
        self.reduction = reduction
        self.num_classes = int(class_counts.numel())
        self.register_buffer("class_counts", class_counts.clone(), persistent=False)

    def start_round(self, round_index: int, total_rounds: int) -> None:
        """Called once at the start of each federated round (0-based); a no-op unless overridden."""
        check_round(round_index, total_rounds)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        self._check_inputs(logits, targets)
        return self._loss(logits, targets)

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def _check_inputs(self, logits: Tensor, targets: Tensor) -> None:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ConfigError(
                f"loss {self.name} was built for {self.num_classes} classes; "
                f"expected logits of shape (batch, {self.num_classes}), got {tuple(logits.shape)}"
            )
        if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
            raise ConfigError(
                f"loss {self.name} expected targets of shape ({logits.shape[0]},), got {tuple(targets.shape)}"
            )

    def _reduce_plain(self, per_sample: Tensor) -> Tensor:
        if self.reduction == "mean":
            return per_sample.mean()
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, reduction={self.reduction!r}"


def check_round(round_index: int, total_rounds: int) -> None:
    """Reject a round index outside [0, total_rounds)."""
    if total_rounds < 1:
        raise ConfigError(f"total_rounds must be >= 1, got {total_rounds}")
    if not 0 <= round_index < total_rounds:
        raise ConfigError(f"round_index must be in [0, {total_rounds}), got {round_index}")


class CrossEntropy(LocalLoss):
    """Plain cross-entropy."""

    name = "CE"

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits, targets, reduction=self.reduction)


class BalancedSoftmax(LocalLoss):
    """Balanced softmax: cross_entropy(z + log(pi + 1e-12), y), pi = this client's label prior.

    Training only: at test time the model's raw logits z are used, without the adjustment (as in Fed-MAS).
    """

    name = "BSM"

    def __init__(self, class_counts: Tensor, reduction: str = "mean") -> None:
        super().__init__(class_counts, reduction)
        self.register_buffer("adjustments", balanced_softmax_adjustments(class_counts), persistent=False)

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        adjusted = logits + self.adjustments.to(logits.dtype)
        return F.cross_entropy(adjusted, targets, reduction=self.reduction)


class Focal(LocalLoss):
    """Focal loss without alpha: -(1 - p_t)^2 log p_t.

    As in the Fed-MAS reference, p_t in the modulating factor (1 - p_t)^gamma is detached, so gradients
    flow only through log p_t (the original focal loss also differentiates the factor).
    """

    name = "focal"

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        log_pt = F.log_softmax(logits, dim=1).gather(1, targets.view(-1, 1)).view(-1)
        pt = log_pt.detach().exp()
        return self._reduce_plain(-((1.0 - pt) ** FOCAL_GAMMA) * log_pt)


class LDAM(LocalLoss):
    """LDAM with deferred re-weighting (DRW): CE(s * (z - m_y * onehot(y)), y), s = 30.

    The logits must be cosine similarities, so the model needs a cosine classifier. Before round
    floor(0.8 R) the loss is unweighted; from then on it is weighted by class-balanced weights (beta 0.9999).
    """

    name = "LDAM"
    needs_cosine_classifier = True

    def __init__(self, class_counts: Tensor, reduction: str = "mean") -> None:
        super().__init__(class_counts, reduction)
        self.register_buffer("margins", ldam_margins(class_counts), persistent=False)
        self.register_buffer("drw_weights", class_balanced_weights(class_counts), persistent=False)
        self.drw_active = False

    def start_round(self, round_index: int, total_rounds: int) -> None:
        """Switch DRW on from round floor(0.8 * total_rounds) (0-based) onwards."""
        check_round(round_index, total_rounds)
        # The reference indexes betas[r // int(0.8 R)], which breaks for R = 1 and for r >= 1.6 R;
        # a comparison gives the intended on/off switch.
        self.drw_active = round_index >= drw_start_round(total_rounds)

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        target_margin = self.margins.to(logits.dtype)[targets]
        onehot = F.one_hot(targets, self.num_classes).to(logits.dtype)
        scaled = LDAM_SCALE * (logits - target_margin.view(-1, 1) * onehot)
        # Before DRW the reference passes weights of 1 for present classes (beta = 0); an unweighted CE is
        # the same value, since an absent class is never a target.
        weight = self.drw_weights.to(logits.dtype) if self.drw_active else None
        return F.cross_entropy(scaled, targets, weight=weight, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, drw_active={self.drw_active}"


class ClassBalancedCE(LocalLoss):
    """CE weighted by class-balanced effective-number weights (beta 0.9999), torch's weighted mean."""

    name = "CB"

    def __init__(self, class_counts: Tensor, reduction: str = "mean") -> None:
        super().__init__(class_counts, reduction)
        self.register_buffer("class_weights", class_balanced_weights(class_counts), persistent=False)

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        weight = self.class_weights.to(logits.dtype)
        return F.cross_entropy(logits, targets, weight=weight, reduction=self.reduction)


class ReweightedCE(LocalLoss):
    """CE weighted by n / (C * n_j), torch's weighted mean."""

    name = "RW"

    def __init__(self, class_counts: Tensor, reduction: str = "mean") -> None:
        super().__init__(class_counts, reduction)
        self.register_buffer("class_weights", inverse_frequency_weights(class_counts), persistent=False)

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        weight = self.class_weights.to(logits.dtype)
        return F.cross_entropy(logits, targets, weight=weight, reduction=self.reduction)


class LogitCalibratedCE(LocalLoss):
    """FedLC-style calibration: -log softmax(z - T * n_j^(-1/4))_y, T = 0.5, n_j clipped below at 1e-8."""

    name = "LCC"

    def __init__(self, class_counts: Tensor, reduction: str = "mean") -> None:
        super().__init__(class_counts, reduction)
        offsets = LCC_TAU * class_counts.clamp(min=LCC_MIN_COUNT).pow(-0.25)
        self.register_buffer("offsets", offsets, persistent=False)

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        # The reference takes log(exp(.) / sum exp(.)), which overflows for large logits; log_softmax is the
        # same value computed stably.
        calibrated = logits - self.offsets.to(logits.dtype)
        return F.cross_entropy(calibrated, targets, reduction=self.reduction)


class FlambyFocal(LocalLoss):
    """FLamby's Fed-ISIC2019 BaselineLoss: mean(-(1 - p_t)^2 * alpha_t * log p_t), alpha_j = N / N_j.

    alpha comes from ``global_class_counts``, the pooled train counts of all clients (a global statistic,
    as in FLamby). Without it this client's own counts are used instead. Classes with a zero count get
    alpha 0 (FLamby never has one; they cannot be a target). Unlike :class:`Focal`, p_t is not detached,
    as in FLamby, and the mean is a plain mean over samples, not an alpha-weighted mean.
    """

    name = "FLAMBY_FOCAL"

    def __init__(self, class_counts: Tensor, reduction: str = "mean", alpha_counts: Tensor | None = None) -> None:
        super().__init__(class_counts, reduction)
        counts = class_counts if alpha_counts is None else alpha_counts
        present = counts > 0
        alpha = torch.zeros_like(counts)
        alpha[present] = counts.sum() / counts[present]
        self.register_buffer("alpha", alpha, persistent=False)

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        log_pt = F.log_softmax(logits, dim=1).gather(1, targets.view(-1, 1)).view(-1)
        pt = log_pt.exp()
        alpha_t = self.alpha.to(logits.dtype)[targets]
        return self._reduce_plain(-((1.0 - pt) ** FOCAL_GAMMA) * alpha_t * log_pt)


_LOSSES: dict[str, type[LocalLoss]] = {
    cls.name: cls
    for cls in (
        CrossEntropy, BalancedSoftmax, Focal, LDAM, ClassBalancedCE, ReweightedCE, LogitCalibratedCE, FlambyFocal
    )
}
LOSS_NAMES: tuple[str, ...] = tuple(_LOSSES)


def build_loss(
    name: str,
    class_counts: CountsLike,
    *,
    reduction: str = "mean",
    global_class_counts: CountsLike | None = None,
) -> LocalLoss:
    """Build loss ``name`` (case-insensitive, one of LOSS_NAMES) for a client with these class counts.

    ``len(class_counts)`` is the number of classes C. ``global_class_counts`` (pooled train counts, length C)
    is used only by FLAMBY_FOCAL and ignored by the others.
    """
    by_lower = {key.lower(): cls for key, cls in _LOSSES.items()}
    loss_class = by_lower.get(str(name).lower())
    if loss_class is None:
        raise ConfigError(f"unknown loss {name!r}; expected one of {', '.join(LOSS_NAMES)}")
    counts = as_class_counts(class_counts)
    if loss_class is FlambyFocal:
        pooled = None
        if global_class_counts is not None:
            pooled = as_class_counts(global_class_counts, "global_class_counts")
            if pooled.numel() != counts.numel():
                raise ConfigError(
                    f"global_class_counts must have {counts.numel()} entries like class_counts, got {pooled.numel()}"
                )
        return FlambyFocal(counts, reduction, alpha_counts=pooled)
    return loss_class(counts, reduction)


__all__ = [
    "LOSS_NAMES",
    "LocalLoss",
    "build_loss",
    "balanced_softmax_adjustments",
    "class_balanced_weights",
    "inverse_frequency_weights",
    "ldam_margins",
    "drw_start_round",
    "CrossEntropy",
    "BalancedSoftmax",
    "Focal",
    "LDAM",
    "ClassBalancedCE",
    "ReweightedCE",
    "LogitCalibratedCE",
    "FlambyFocal",
]


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_teacher || p_student) at ``temperature``, mean over the batch, times T^2 (Hinton et
    al.) so the gradient scale does not shrink with T. The teacher is detached: it only teaches."""
    teacher = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_student, teacher, reduction="batchmean") * temperature**2
