"""Classification metrics (scikit-learn based) and the mean/std used to report across seeds."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np

# sklearn warns when a predicted class has no true sample; balanced accuracy then simply averages over the
# classes present in y_true, which is the intended Fed-ISIC2019 metric, so the warning is noise here.
_ABSENT_CLASS_WARNING = "y_pred contains classes not in y_true"


def _as_label_arrays(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Check labels: 1-D, same non-zero length, integers in [0, num_classes)."""
    true = np.asarray(y_true)
    pred = np.asarray(y_pred)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if true.ndim != 1 or pred.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D label arrays, got shapes {true.shape} and {pred.shape}")
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {true.size} and {pred.size}")
    if true.size == 0:
        raise ValueError("y_true and y_pred are empty; metrics need at least one sample")
    for what, labels in (("y_true", true), ("y_pred", pred)):
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{what} must hold integer class labels, got dtype {labels.dtype}")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"{what} labels must be in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]"
            )
    return true, pred


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) count matrix; entry [i, j] counts samples of true class i predicted as j."""
    import sklearn.metrics as skm  # imported on first use: it adds ~1 s to every Flower ClientApp start

    true, pred = _as_label_arrays(y_true, y_pred, num_classes)
    return skm.confusion_matrix(true, pred, labels=np.arange(num_classes))


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict:
    """Balanced accuracy, accuracy, macro-F1 and per-class recall of integer predictions.

    - ``balanced_accuracy``: sklearn's balanced_accuracy_score, the mean recall over the classes present in
      y_true (the Fed-ISIC2019 / Fed-MAS metric).
    - ``accuracy``: fraction correct.
    - ``macro_f1``: sklearn's f1_score(average='macro', zero_division=0), averaged over the classes present in
      y_true *or* y_pred (sklearn's default label set); a class only predicted counts with F1 = 0.
    - ``per_class_recall``: list of length num_classes, None for classes absent from y_true.
    - ``n``: number of samples.
    """
    import sklearn.metrics as skm

    true, pred = _as_label_arrays(y_true, y_pred, num_classes)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ABSENT_CLASS_WARNING)
        # A client split with a single class (e.g. a tiny test set) is legitimate here.
        warnings.filterwarnings("ignore", message="A single label was found")
        balanced_accuracy = skm.balanced_accuracy_score(true, pred)
    matrix = skm.confusion_matrix(true, pred, labels=np.arange(num_classes))
    support = matrix.sum(axis=1)
    per_class_recall = [
        float(matrix[c, c] / support[c]) if support[c] > 0 else None for c in range(num_classes)
    ]
    return {
        "balanced_accuracy": float(balanced_accuracy),
        "accuracy": float(skm.accuracy_score(true, pred)),
        "macro_f1": float(skm.f1_score(true, pred, average="macro", zero_division=0)),
        "per_class_recall": per_class_recall,
        "n": int(true.size),
    }


def mean_and_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of values; std is 0.0 for a single value."""
    array = np.asarray(list(values), dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"mean_and_std needs a non-empty 1-D list of numbers, got shape {array.shape}")
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return float(array.mean()), std


def mean_interval(values: Iterable[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two ends of its Student-t confidence interval (ddof=1; the mean itself for one value)."""
    from scipy import stats

    array = np.asarray(list(values), dtype=np.float64)
    mean, std = mean_and_std(array)
    if array.size < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.5 + confidence / 2, array.size - 1)) * std / np.sqrt(array.size)
    return mean, float(mean - half), float(mean + half)


__all__ = ["classification_metrics", "confusion_matrix", "mean_and_std", "mean_interval"]
