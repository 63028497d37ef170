"""Metrics against hand-computed values on tiny label arrays."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from fedward.metrics import (bootstrap_intervals, classification_metrics, confusion_matrix, macro_auroc, mean_and_std,
                             metrics_from_confusion)


def test_balanced_accuracy_differs_from_accuracy() -> None:
    # class 0: 4/4 right, class 1: 1/2 right -> BA = (1 + 0.5) / 2, accuracy = 5/6
    metrics = classification_metrics(np.array([0, 0, 0, 0, 1, 1]), np.array([0, 0, 0, 0, 0, 1]), num_classes=2)
    assert metrics["balanced_accuracy"] == pytest.approx(0.75)
    assert metrics["accuracy"] == pytest.approx(5 / 6)
    assert metrics["per_class_recall"] == pytest.approx([1.0, 0.5])
    assert metrics["n"] == 6
    # F1: class 0 P = 4/5, R = 1 -> 8/9; class 1 P = 1, R = 1/2 -> 2/3
    assert metrics["macro_f1"] == pytest.approx((8 / 9 + 2 / 3) / 2)


def test_class_absent_from_y_true_is_left_out_of_ba_without_warning() -> None:
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 2, 1, 1])  # class 2 is only predicted; class 3 appears nowhere
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = classification_metrics(y_true, y_pred, num_classes=4)
    assert metrics["per_class_recall"][:2] == pytest.approx([0.5, 1.0])
    assert metrics["per_class_recall"][2:] == [None, None]
    assert metrics["balanced_accuracy"] == pytest.approx(0.75)
    assert metrics["accuracy"] == pytest.approx(0.75)
    # macro-F1 over classes in y_true or y_pred {0, 1, 2}: class 0 P = 1, R = 1/2 -> 2/3; class 1 -> 1;
    # class 2 has no true sample and one false positive -> 0. Class 3 is not averaged in.
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_confusion_matrix_rows_are_true_labels() -> None:
    y_true = np.array([0, 0, 1, 2, 2, 2])
    y_pred = np.array([0, 1, 1, 2, 0, 2])
    expected = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred, num_classes=4), expected)


def test_empty_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        classification_metrics(np.array([], dtype=np.int64), np.array([], dtype=np.int64), num_classes=3)


@pytest.mark.parametrize(
    ("y_true", "y_pred", "fragment"),
    [
        ([0, 1], [0], "same length"),
        ([0, 3], [0, 1], r"y_true labels must be in \[0, 3\)"),
        ([0, 1], [0, -1], r"y_pred labels must be in \[0, 3\)"),
        ([0.0, 1.0], [0, 1], "integer class labels"),
    ],
)
def test_bad_labels_are_rejected(y_true: list, y_pred: list, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        classification_metrics(np.array(y_true), np.array(y_pred), num_classes=3)


def test_mean_and_std_uses_sample_std() -> None:
    mean, std = mean_and_std([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5)
    assert std == pytest.approx(math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3))
    assert mean_and_std([0.7]) == (pytest.approx(0.7), 0.0)
    with pytest.raises(ValueError, match="non-empty"):
        mean_and_std([])


def test_metrics_from_confusion_equal_sklearns_on_the_same_predictions() -> None:
    rng = np.random.default_rng(3)
    matrices, expected = [], []
    for size in (1, 5, 40):
        for _ in range(10):
            true = rng.integers(0, 4, size)
            pred = rng.integers(0, 5, size) % 4  # some classes only predicted, some only true
            matrices.append(confusion_matrix(true, pred, 4))
            expected.append(classification_metrics(true, pred, 4))
    got = metrics_from_confusion(np.stack(matrices))  # one call over the whole stack
    for key in ("balanced_accuracy", "accuracy", "macro_f1"):
        assert got[key] == pytest.approx([e[key] for e in expected], abs=1e-12)


def test_metrics_from_confusion_by_hand() -> None:
    # true 0: 3 right, 1 as class 1; true 1: 1 right; class 2 only predicted (once, for a true 1)
    got = metrics_from_confusion(np.array([[3, 1, 0], [0, 1, 1], [0, 0, 0]]))
    assert float(got["balanced_accuracy"]) == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert float(got["accuracy"]) == pytest.approx(4 / 6)
    # F1: class 0 = 6/7, class 1 = 2/4, class 2 = 0 (predicted, never true): sklearn's average over 3
    assert float(got["macro_f1"]) == pytest.approx((6 / 7 + 0.5 + 0.0) / 3)


def test_bootstrap_interval_of_accuracy_matches_the_binomial_one() -> None:
    # 70 of 100 right: the normal interval 0.70 +- 1.96 * sqrt(0.21 / 100) = [0.610, 0.790]
    low, high = bootstrap_intervals([np.array([[35, 15], [15, 35]])], resamples=4000)["accuracy"]
    assert low == pytest.approx(0.610, abs=0.015) and high == pytest.approx(0.790, abs=0.015)
    perfect = bootstrap_intervals([np.array([[5, 0], [0, 3]])])
    assert perfect["balanced_accuracy"] == (1.0, 1.0) and perfect["macro_f1"] == (1.0, 1.0)
    again = bootstrap_intervals([np.array([[35, 15], [15, 35]])], resamples=4000)
    assert again["accuracy"] == (low, high)  # seeded: a report gives the same interval every time


def test_bootstrap_over_clients_is_the_interval_of_their_mean() -> None:
    # one client always right, one always wrong: every resample's mean accuracy is exactly 0.5
    found = bootstrap_intervals([np.array([[4, 0], [0, 4]]), np.array([[0, 2], [2, 0]])])
    assert found["accuracy"] == (0.5, 0.5)
    with pytest.raises(ValueError, match="non-empty square table"):
        bootstrap_intervals([np.zeros((2, 2), dtype=int)])


def test_macro_auroc_by_hand() -> None:
    # class 1 scores 0.1, 0.6 (true 0) and 0.4, 0.9 (true 1): 3 of the 4 (positive, negative) pairs ordered
    scores = np.array([[0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.1, 0.9]])
    assert macro_auroc(np.array([0, 0, 1, 1]), scores) == pytest.approx(0.75)
    # three classes, class 2 absent from the labels: the mean over classes 0 and 1 only
    three = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]])
    assert macro_auroc(np.array([0, 1, 1]), three) == pytest.approx((1.0 + 1.0) / 2)
    assert macro_auroc(np.array([1, 1, 1]), three) is None
