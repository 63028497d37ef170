"""Metrics against hand-computed values on tiny label arrays."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from fedward.metrics import classification_metrics, confusion_matrix, mean_and_std


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
