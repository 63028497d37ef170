"""Local losses against values computed by hand with math.log / math.exp on 2-3 samples."""

from __future__ import annotations

import math

import pytest
import torch

from fedward.errors import ConfigError
from fedward.losses import (
    LOSS_NAMES,
    LDAM,
    BalancedSoftmax,
    FlambyFocal,
    build_loss,
    class_balanced_weights,
    drw_start_round,
    inverse_frequency_weights,
    ldam_margins,
)

BETA = 0.9999


def ce_by_hand(row: list[float], target: int) -> float:
    """-log softmax(row)[target], written out."""
    return -row[target] + math.log(sum(math.exp(v) for v in row))


def softmax_by_hand(row: list[float], target: int) -> float:
    return math.exp(row[target]) / sum(math.exp(v) for v in row)


def cb_weight(n: int) -> float:
    return (1 - BETA) / (1 - BETA**n)


LOGITS3 = [[1.0, 0.5, -1.0], [0.0, 2.0, 1.0], [0.3, -0.2, 0.4]]
TARGETS3 = [0, 1, 1]


def as_inputs(rows: list[list[float]], targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(rows, dtype=torch.float64), torch.tensor(targets, dtype=torch.int64)


def test_ce_matches_hand_value() -> None:
    logits, targets = as_inputs(LOGITS3, TARGETS3)
    expected = sum(ce_by_hand(r, t) for r, t in zip(LOGITS3, TARGETS3)) / 3
    assert build_loss("CE", [2, 1, 0])(logits, targets).item() == pytest.approx(expected, rel=1e-12)


def test_bsm_adds_log_prior_and_absent_class_gets_log_1e_12() -> None:
    counts = [2, 1, 0]
    adjustments = [math.log(2 / 3 + 1e-12), math.log(1 / 3 + 1e-12), math.log(1e-12)]
    expected = sum(
        ce_by_hand([z + a for z, a in zip(row, adjustments)], t) for row, t in zip(LOGITS3, TARGETS3)
    ) / 3
    logits, targets = as_inputs(LOGITS3, TARGETS3)
    loss = build_loss("BSM", counts)
    assert loss(logits, targets).item() == pytest.approx(expected, rel=1e-12)
    assert loss.adjustments[2].item() == pytest.approx(-27.631021, abs=1e-5)


def test_focal_matches_hand_value() -> None:
    logits, targets = as_inputs(LOGITS3, TARGETS3)
    per_sample = []
    for row, t in zip(LOGITS3, TARGETS3):
        p = softmax_by_hand(row, t)
        per_sample.append(-((1 - p) ** 2) * math.log(p))
    assert build_loss("focal", [1, 1, 1])(logits, targets).item() == pytest.approx(sum(per_sample) / 3, rel=1e-12)


def test_focal_modulating_factor_is_detached_as_in_fed_mas() -> None:
    # With (1 - p_t)^2 treated as a constant, d loss / d z = (1 - p_t)^2 * (softmax(z) - onehot(y)).
    row, t = [2.0, 0.0, -1.0], 0
    logits = torch.tensor([row], dtype=torch.float64, requires_grad=True)
    build_loss("focal", [1, 1, 1])(logits, torch.tensor([t])).backward()
    probs = [softmax_by_hand(row, j) for j in range(3)]
    factor = (1 - probs[t]) ** 2
    expected = [factor * (probs[j] - (1.0 if j == t else 0.0)) for j in range(3)]
    assert logits.grad[0].tolist() == pytest.approx(expected, rel=1e-10)


def test_ldam_margins_for_counts_16_and_1() -> None:
    margins = ldam_margins(torch.tensor([16.0, 1.0], dtype=torch.float64))
    assert margins.tolist() == pytest.approx([0.25, 0.5])


def test_ldam_absent_class_gets_max_margin() -> None:
    margins = ldam_margins(torch.tensor([81.0, 0.0, 1.0], dtype=torch.float64))
    assert margins.tolist() == pytest.approx([0.5 / 3, 0.5, 0.5])


LDAM_COS = [[0.8, 0.1], [0.3, 0.6]]
LDAM_TARGETS = [0, 1]
# s * (z - m_y onehot): sample 0 -> [30 * (0.8 - 0.25), 30 * 0.1] = [16.5, 3]; sample 1 -> [9, 30 * 0.1] = [9, 3]
LDAM_PER_SAMPLE = [ce_by_hand([16.5, 3.0], 0), ce_by_hand([9.0, 3.0], 1)]


def test_ldam_loss_value_before_drw() -> None:
    loss = build_loss("LDAM", [16, 1])
    assert loss.needs_cosine_classifier is True
    logits, targets = as_inputs(LDAM_COS, LDAM_TARGETS)
    assert LDAM_PER_SAMPLE[1] == pytest.approx(math.log(math.exp(6) + 1))
    assert loss(logits, targets).item() == pytest.approx(sum(LDAM_PER_SAMPLE) / 2, rel=1e-12)


def test_ldam_drw_switches_on_at_floor_08_r() -> None:
    assert [drw_start_round(r) for r in (1, 5, 10, 12, 100)] == [0, 4, 8, 9, 80]
    loss = build_loss("LDAM", [16, 1])
    assert isinstance(loss, LDAM)
    logits, targets = as_inputs(LDAM_COS, LDAM_TARGETS)
    unweighted = sum(LDAM_PER_SAMPLE) / 2
    w0, w1 = cb_weight(16), cb_weight(1)
    w0, w1 = 2 * w0 / (w0 + w1), 2 * w1 / (w0 + w1)
    weighted = (w0 * LDAM_PER_SAMPLE[0] + w1 * LDAM_PER_SAMPLE[1]) / (w0 + w1)

    loss.start_round(7, 10)
    assert not loss.drw_active
    assert loss(logits, targets).item() == pytest.approx(unweighted, rel=1e-12)
    loss.start_round(8, 10)
    assert loss.drw_active
    assert loss.drw_weights.tolist() == pytest.approx([w0, w1], rel=1e-12)
    assert loss(logits, targets).item() == pytest.approx(weighted, rel=1e-12)
    assert weighted != pytest.approx(unweighted, rel=1e-3)
    loss.start_round(0, 10)  # going back (e.g. a fresh run) switches it off again
    assert not loss.drw_active


def test_ldam_drw_on_from_round_zero_when_one_round() -> None:
    loss = build_loss("LDAM", [16, 1])
    loss.start_round(0, 1)
    assert loss.drw_active


def test_start_round_rejects_bad_round() -> None:
    loss = build_loss("LDAM", [16, 1])
    with pytest.raises(ConfigError, match=r"round_index must be in \[0, 10\), got 10"):
        loss.start_round(10, 10)
    with pytest.raises(ConfigError, match="total_rounds must be >= 1"):
        build_loss("CE", [1, 1]).start_round(0, 0)


def test_cb_weights_by_hand_and_absent_class_zero() -> None:
    w0, w1 = cb_weight(3), cb_weight(1)
    expected = [2 * w0 / (w0 + w1), 2 * w1 / (w0 + w1), 0.0]
    weights = class_balanced_weights(torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64))
    assert weights.tolist() == pytest.approx(expected, rel=1e-12)
    assert weights.sum().item() == pytest.approx(2.0)  # number of present classes


def test_cb_loss_is_torch_weighted_mean() -> None:
    w0, w1 = cb_weight(3), cb_weight(1)
    w = [2 * w0 / (w0 + w1), 2 * w1 / (w0 + w1), 0.0]
    per_sample = [ce_by_hand(r, t) for r, t in zip(LOGITS3, TARGETS3)]
    sample_w = [w[t] for t in TARGETS3]
    expected = sum(a * b for a, b in zip(sample_w, per_sample)) / sum(sample_w)
    logits, targets = as_inputs(LOGITS3, TARGETS3)
    assert build_loss("CB", [3, 1, 0])(logits, targets).item() == pytest.approx(expected, rel=1e-12)
    none = build_loss("CB", [3, 1, 0], reduction="none")(logits, targets)
    assert none.tolist() == pytest.approx([a * b for a, b in zip(sample_w, per_sample)], rel=1e-12)
    assert none.mean().item() != pytest.approx(expected, rel=1e-3)  # weighted mean, not mean of 'none'


def test_rw_weights_and_loss_by_hand() -> None:
    # n = 4, C = 3: n / (C n_j) = [4/9, 4/3, 0]
    weights = inverse_frequency_weights(torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64))
    assert weights.tolist() == pytest.approx([4 / 9, 4 / 3, 0.0], rel=1e-12)
    per_sample = [ce_by_hand(r, t) for r, t in zip(LOGITS3, TARGETS3)]
    sample_w = [4 / 9, 4 / 3, 4 / 3]
    expected = sum(a * b for a, b in zip(sample_w, per_sample)) / sum(sample_w)
    logits, targets = as_inputs(LOGITS3, TARGETS3)
    assert build_loss("RW", [3, 1, 0])(logits, targets).item() == pytest.approx(expected, rel=1e-12)
    total = build_loss("RW", [3, 1, 0], reduction="sum")(logits, targets).item()
    assert total == pytest.approx(sum(a * b for a, b in zip(sample_w, per_sample)), rel=1e-12)


def test_lcc_by_hand() -> None:
    # offsets T * n_j^(-1/4) with T = 0.5 and n_j clipped at 1e-8: [0.5 / sqrt(2), 0.5, 0.5 * 100]
    offsets = [0.5 / math.sqrt(2), 0.5, 50.0]
    expected = sum(ce_by_hand([z - o for z, o in zip(r, offsets)], t) for r, t in zip(LOGITS3, TARGETS3)) / 3
    logits, targets = as_inputs(LOGITS3, TARGETS3)
    assert build_loss("LCC", [4, 1, 0])(logits, targets).item() == pytest.approx(expected, rel=1e-10)


def test_lcc_is_finite_for_large_logits() -> None:
    # The reference's exp/log form overflows here; the value is still -log softmax.
    logits = torch.tensor([[1000.0, 0.0]], dtype=torch.float32)
    value = build_loss("LCC", [1, 1])(logits, torch.tensor([1])).item()
    assert value == pytest.approx(1000.0, rel=1e-6)


def test_flamby_focal_uses_pooled_counts_for_alpha() -> None:
    # pooled counts [6, 3, 1] -> alpha = N / N_j = [10/6, 10/3, 10]; class 2 is absent on this client
    alpha = [10 / 6, 10 / 3, 10.0]
    targets_list = [0, 1, 2]
    expected = 0.0
    for row, t in zip(LOGITS3, targets_list):
        p = softmax_by_hand(row, t)
        expected += -((1 - p) ** 2) * alpha[t] * math.log(p)
    expected /= 3
    logits, targets = as_inputs(LOGITS3, targets_list)
    loss = build_loss("FLAMBY_FOCAL", [5, 1, 0], global_class_counts=[6, 3, 1])
    assert isinstance(loss, FlambyFocal)
    assert loss.alpha.tolist() == pytest.approx(alpha, rel=1e-12)
    assert loss(logits, targets).item() == pytest.approx(expected, rel=1e-12)


def test_flamby_focal_falls_back_to_client_counts() -> None:
    loss = build_loss("flamby_focal", [5, 1, 0])
    assert loss.alpha.tolist() == pytest.approx([6 / 5, 6.0, 0.0], rel=1e-12)


def test_flamby_focal_rejects_wrong_length_global_counts() -> None:
    with pytest.raises(ConfigError, match="global_class_counts must have 3 entries"):
        build_loss("FLAMBY_FOCAL", [5, 1, 0], global_class_counts=[6, 3])


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_reduction_none_gives_per_sample_losses_and_sum_matches(name: str) -> None:
    logits, targets = as_inputs(LOGITS3, TARGETS3)
    if name == "LDAM":
        logits = logits / 3  # cosine similarities live in [-1, 1]
    counts = [3, 2, 1]
    per_sample = build_loss(name, counts, reduction="none")(logits, targets)
    assert per_sample.shape == (3,)
    total = build_loss(name, counts, reduction="sum")(logits, targets)
    assert total.item() == pytest.approx(per_sample.sum().item(), rel=1e-12)


@pytest.mark.parametrize("name", ["CE", "BSM", "focal", "LDAM", "LCC", "FLAMBY_FOCAL"])
def test_mean_equals_mean_of_none_for_unweighted_losses(name: str) -> None:
    logits, targets = as_inputs(LOGITS3, TARGETS3)
    if name == "LDAM":
        logits = logits / 3
    per_sample = build_loss(name, [3, 2, 1], reduction="none")(logits, targets)
    mean = build_loss(name, [3, 2, 1])(logits, targets)
    assert mean.item() == pytest.approx(per_sample.mean().item(), rel=1e-12)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_backpropagates_in_float32(name: str) -> None:
    logits = torch.tensor(LOGITS3, dtype=torch.float32, requires_grad=True)
    loss = build_loss(name, [3, 2, 1])(logits / 3, torch.tensor(TARGETS3))
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_names_are_case_insensitive_and_only_ldam_needs_cosine() -> None:
    assert isinstance(build_loss("bsm", [1, 1]), BalancedSoftmax)
    for name in LOSS_NAMES:
        loss = build_loss(name.upper(), [1, 1])
        assert loss.needs_cosine_classifier is (name == "LDAM")


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        build_loss("hinge", [1, 1])
    message = str(info.value)
    assert "'hinge'" in message
    for name in LOSS_NAMES:
        assert name in message


@pytest.mark.parametrize(
    ("counts", "fragment"),
    [
        ([[1, 2], [3, 4]], "1-D list of at least 2"),
        ([5], "1-D list of at least 2"),
        ([3, -1], "non-negative whole numbers"),
        ([1.5, 2], "non-negative whole numbers"),
        ([0, 0], "positive total"),
    ],
)
def test_bad_class_counts_are_rejected(counts: list, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        build_loss("CE", counts)


def test_bad_reduction_and_shape_mismatch_are_rejected() -> None:
    with pytest.raises(ConfigError, match="reduction must be one of mean, none, sum, got 'avg'"):
        build_loss("CE", [1, 1], reduction="avg")
    loss = build_loss("BSM", [1, 1, 1])
    with pytest.raises(ConfigError, match=r"built for 3 classes.*got \(2, 4\)"):
        loss(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match=r"targets of shape \(2,\)"):
        loss(torch.zeros(2, 3), torch.tensor([0, 1, 2]))


def test_counts_may_be_a_tensor() -> None:
    loss = build_loss("RW", torch.tensor([3, 1, 0]))
    assert loss.class_weights.tolist() == pytest.approx([4 / 9, 4 / 3, 0.0])
