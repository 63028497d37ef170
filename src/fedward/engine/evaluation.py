"""Evaluation of a model on a split: predictions, then metrics rows for metrics.jsonl."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedward.data.augment import normalize
from fedward.data.types import Split
from fedward.metrics import classification_metrics, confusion_matrix


class Predictions:
    """Labels, argmax predictions and summed cross-entropy of a model on one split."""

    def __init__(self, labels: np.ndarray, preds: np.ndarray, loss_sum: float):
        self.labels, self.preds, self.loss_sum = labels, preds, loss_sum

    @staticmethod
    def concat(parts: list["Predictions"]) -> "Predictions":
        return Predictions(np.concatenate([p.labels for p in parts]), np.concatenate([p.preds for p in parts]),
                           sum(p.loss_sum for p in parts))

    @staticmethod
    def from_confusion(matrix, loss_sum: float) -> "Predictions":
        """Predictions with the counts of a confusion matrix (entry [i, j]: true i predicted j). Every
        metric here is invariant to the order of samples, so this gives exactly the rows of the
        predictions the matrix was counted from, without the labels themselves."""
        matrix = np.asarray(matrix, dtype=np.int64)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or (matrix < 0).any():
            raise ValueError(f"a confusion matrix must be a square table of counts >= 0, got shape {matrix.shape}")
        true, pred = np.nonzero(matrix)
        counts = matrix[true, pred]
        return Predictions(np.repeat(true, counts), np.repeat(pred, counts), float(loss_sum))

    def confusion(self, num_classes: int) -> np.ndarray:
        return confusion_matrix(self.labels, self.preds, num_classes)

    def row(self, num_classes: int, *, with_confusion: bool = False, **fields: Any) -> dict[str, Any]:
        """A metrics.jsonl row: the given fields, then BA, accuracy, macro-F1, loss, n, per-class recall."""
        metrics = classification_metrics(self.labels, self.preds, num_classes)
        row = dict(fields)
        row.update(balanced_accuracy=metrics["balanced_accuracy"], accuracy=metrics["accuracy"],
                   macro_f1=metrics["macro_f1"], loss=self.loss_sum / len(self.labels), n=int(len(self.labels)),
                   per_class_recall=metrics["per_class_recall"])
        if with_confusion:
            row["confusion_matrix"] = confusion_matrix(self.labels, self.preds, num_classes).tolist()
        return row


@torch.no_grad()
def predict(model: nn.Module, split: Split, *, device: torch.device, mean, std, batch_size: int) -> Predictions:
    """Eval-mode predictions from the raw logits (BSM's prior is a training-time adjustment only)."""
    model.eval()
    preds, loss_sum = [], 0.0
    for start in range(0, len(split), batch_size):
        images = split.images[start:start + batch_size].to(device)
        labels = split.labels[start:start + batch_size].to(device)
        logits = model(normalize(images, mean, std))
        loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        preds.append(logits.argmax(1).cpu())
    labels_np = split.labels.numpy()
    preds_np = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
    return Predictions(labels_np, preds_np, loss_sum)
