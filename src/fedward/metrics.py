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


def metrics_from_confusion(matrices: np.ndarray) -> dict[str, np.ndarray]:
    """Balanced accuracy, accuracy and macro-F1 of a stack of confusion matrices (shape (..., K, K),
    entry [i, j]: true i predicted j), with the definitions of :func:`classification_metrics`
    (sklearn's): BA averages recall over the classes with true samples, macro-F1 averages
    2TP / (2TP + FP + FN) over the classes that are true or predicted. Vectorised over the leading
    axes, so that a bootstrap's thousand resamples cost one call."""
    m = np.asarray(matrices, dtype=np.float64)
    true_positive = np.diagonal(m, axis1=-2, axis2=-1)
    support, predicted = m.sum(axis=-1), m.sum(axis=-2)
    present = support > 0
    labelled = present | (predicted > 0)
    recall = np.divide(true_positive, support, out=np.zeros_like(true_positive), where=present)
    f1 = np.divide(2 * true_positive, support + predicted, out=np.zeros_like(true_positive), where=labelled)
    with np.errstate(invalid="ignore", divide="ignore"):  # an empty matrix gives NaN, as an empty split has no score
        return {"balanced_accuracy": recall.sum(axis=-1) / present.sum(axis=-1),
                "accuracy": true_positive.sum(axis=-1) / support.sum(axis=-1),
                "macro_f1": f1.sum(axis=-1) / labelled.sum(axis=-1)}


BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0  # fixed, so that a report and its engine-independent rows give one interval


def bootstrap_intervals(matrices: list, *, confidence: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = BOOTSTRAP_SEED) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap intervals of BA, accuracy and macro-F1 from confusion matrices.

    Drawing n test images with replacement is a multinomial draw of n over the matrix's cells (every
    metric here depends on the images only through their matrix), so this is the plain bootstrap
    over images without the images themselves. With several matrices (one per client) each is
    resampled on its own and the statistic is the mean of the clients' metrics: the interval of the
    unweighted mean over clients that the local-model summaries report."""
    if not matrices:
        raise ValueError("bootstrap_intervals needs at least one confusion matrix")
    rng = np.random.default_rng(seed)
    per_client = []
    for matrix in matrices:
        counts = np.asarray(matrix, dtype=np.int64)
        if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or (counts < 0).any() or counts.sum() == 0:
            raise ValueError(f"a confusion matrix must be a non-empty square table of counts >= 0, got {counts.tolist()}")
        total = int(counts.sum())
        draws = rng.multinomial(total, counts.ravel() / total, size=resamples).reshape(resamples, *counts.shape)
        per_client.append(metrics_from_confusion(draws))
    tail = (1 - confidence) / 2
    out = {}
    for key in per_client[0]:
        statistic = np.mean([values[key] for values in per_client], axis=0)
        low, high = np.nanquantile(statistic, [tail, 1 - tail])
        out[key] = (float(low), float(high))
    return out


def macro_auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Macro one-vs-rest AUROC: the mean over the classes with both true and other samples of the
    AUROC of that class's score (sklearn's roc_auc_score). For two classes both terms equal the
    binary AUROC. None when fewer than two classes are present (no ranking to score)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores must be (n, num_classes) for n = {labels.shape[0]} labels, got shape {scores.shape}")
    values = [roc_auc_score(labels == c, scores[:, c]) for c in range(scores.shape[1])
              if 0 < int((labels == c).sum()) < labels.shape[0]]
    return float(np.mean(values)) if values else None


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


__all__ = ["bootstrap_intervals", "classification_metrics", "confusion_matrix", "macro_auroc", "mean_and_std",
           "mean_interval", "metrics_from_confusion"]
