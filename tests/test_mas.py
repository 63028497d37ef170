"""Fed-MAS arithmetic, checked against numbers worked out by hand."""

import math

import pytest
import torch

from fedward.algorithms.mas import ClassDivergence, alignment_loss, mas_drw_weights, mas_weights, robust_factor
from fedward.errors import FedwardError


def test_alignment_loss_by_hand():
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    f = torch.tensor([[3.0, 0.0], [0.0, 1.0], [-2.0, 0.0], [1.0, 0.0]])
    # same direction 0; orthogonal 2; opposite 4; 45 degrees 2 - 2/sqrt(2)
    expected = torch.tensor([0.0, 2.0, 4.0, 2.0 - 2.0 / math.sqrt(2.0)])
    torch.testing.assert_close(alignment_loss(p, f), expected)


def test_class_divergence_divides_by_full_counts_despite_drop_last():
    # N = [3, 2, 0]; the batches saw two class-0 samples and one class-1 sample (drop_last skipped the rest)
    acc = ClassDivergence([3, 2, 0])
    acc.add(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))
    acc.add(torch.tensor([3.0]), torch.tensor([0]))
    torch.testing.assert_close(acc.value(), torch.tensor([4.0 / 3.0, 1.0, 0.0], dtype=torch.float64))


def test_robust_factor_by_hand():
    w = torch.tensor([4.0 / 3.0, 1.0, 0.0])  # class 2: the pre-pass saw none of it, not in P
    w_hat = torch.tensor([1.0, 3.0, 5.0])  # ... but training did
    # The reference: w_hat normalised over every class. p = [4/7, 3/7], q = [1/9, 3/9] -> 4/63 + 9/63
    assert robust_factor(w, w_hat) == pytest.approx(13 / 63)
    # Over the present classes only: q = [1/4, 3/4] -> 4/28 + 9/28
    assert robust_factor(w, w_hat, normalise_over="present") == pytest.approx(13 / 28)
    # mas_inv inverts over P only: [1, 1/3, 5] sums to 19/3, q = [3/19, 1/19] -> 12/133 + 3/133
    assert robust_factor(w, w_hat, inverse=True) == pytest.approx(15 / 133)
    # ... over P only: q from [1, 1/3] = [3/4, 1/4] -> 12/28 + 3/28
    assert robust_factor(w, w_hat, inverse=True, normalise_over="present") == pytest.approx(15 / 28)
    # mas_inv leaves out a present class that training never saw (w_hat = 0; the reference: NaN):
    # P = {0}, p = [1], q = 1/2 / (1/2 + 5) = 1/11 over every class, 1 over P
    assert robust_factor(w, torch.tensor([2.0, 0.0, 5.0]), inverse=True) == pytest.approx(1 / 11)
    assert robust_factor(w, torch.tensor([2.0, 0.0, 5.0]), inverse=True, normalise_over="present") == pytest.approx(1.0)
    # Zero where w is zero: both readings agree; evenly spread divergence gives 1/|P|
    w_hat_present = torch.tensor([1.0, 3.0, 0.0])
    assert robust_factor(w, w_hat_present) == robust_factor(w, w_hat_present, normalise_over="present")
    assert robust_factor(torch.ones(4), torch.ones(4)) == pytest.approx(0.25)
    with pytest.raises(FedwardError, match="every class"):
        robust_factor(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="normalise_over"):
        robust_factor(w, w_hat, normalise_over="some")


def test_mas_weights_ignore_sample_counts():
    assert mas_weights([0.2, 0.6]) == pytest.approx([0.25, 0.75])
    with pytest.raises(FedwardError):
        mas_weights([0.0, 0.0])


def test_mas_drw_is_fedavg_before_80_percent_then_tracks_rf():
    counts, rf = [64, 192], [0.5, 0.25]
    assert mas_drw_weights(rf, counts, round_index=7, total_rounds=10) == pytest.approx([0.25, 0.75])
    late = mas_drw_weights(rf, counts, round_index=8, total_rounds=10)
    # v = [1/3, 2/3]; u_k = (1-b)/(1-b^v_k) ~ 1/v_k = [3, 1.5]; alpha ~ n*u = [192, 288] -> [0.4, 0.6]
    assert late == pytest.approx([0.4, 0.6], abs=1e-3)
    assert sum(late) == pytest.approx(1.0)
