"""Evaluation of a model on a split: predictions, then metrics rows for metrics.jsonl."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedward.data.augment import normalize
from fedward.data.types import Split
from fedward.metrics import classification_metrics, confusion_matrix, macro_auroc
from fedward.tracking.rundir import atomic_write_text


class Predictions:
    """Labels, argmax predictions, summed cross-entropy and (where the model's scores were at hand)
    the macro one-vs-rest AUROC of a model on one split."""

    def __init__(self, labels: np.ndarray, preds: np.ndarray, loss_sum: float, *, scores: np.ndarray | None = None,
                 auroc: float | None = None):
        self.labels, self.preds, self.loss_sum, self.scores = labels, preds, loss_sum, scores
        self.auroc = macro_auroc(labels, scores) if scores is not None and len(labels) else auroc

    def block(self, **fields: Any) -> "PredictionBlock | None":
        """The per-image predictions for predictions.csv (None where the scores are not here)."""
        return None if self.scores is None else PredictionBlock(fields, self.labels, self.preds, self.scores)

    @staticmethod
    def concat(parts: list["Predictions"]) -> "Predictions":
        """The union of several clients' predictions. Its AUROC is left unknown: the pooled AUROC
        ranks every hospital's images against each other, so it needs their per-image scores in one
        place, which a Flower deployment never has (each hospital reports its own AUROC instead)."""
        return Predictions(np.concatenate([p.labels for p in parts]), np.concatenate([p.preds for p in parts]),
                           sum(p.loss_sum for p in parts))

    @staticmethod
    def from_confusion(matrix, loss_sum: float, auroc: float | None = None) -> "Predictions":
        """Predictions with the counts of a confusion matrix (entry [i, j]: true i predicted j). Every
        metric here but the AUROC (passed on as computed where the scores were) is invariant to the
        order of samples, so this gives exactly the rows of the predictions the matrix was counted
        from, without the labels themselves."""
        matrix = np.asarray(matrix, dtype=np.int64)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or (matrix < 0).any():
            raise ValueError(f"a confusion matrix must be a square table of counts >= 0, got shape {matrix.shape}")
        true, pred = np.nonzero(matrix)
        counts = matrix[true, pred]
        return Predictions(np.repeat(true, counts), np.repeat(pred, counts), float(loss_sum),
                           auroc=None if auroc is None else float(auroc))

    def confusion(self, num_classes: int) -> np.ndarray:
        return confusion_matrix(self.labels, self.preds, num_classes)

    def row(self, num_classes: int, **fields: Any) -> dict[str, Any]:
        """A metrics.jsonl row: the given fields, then BA, accuracy, macro-F1, AUROC (None where
        unknown), loss, n, per-class recall and the confusion matrix (from which the report draws
        its bootstrap intervals)."""
        metrics = classification_metrics(self.labels, self.preds, num_classes)
        row = dict(fields)
        row.update(balanced_accuracy=metrics["balanced_accuracy"], accuracy=metrics["accuracy"],
                   macro_f1=metrics["macro_f1"], auroc=self.auroc, loss=self.loss_sum / len(self.labels),
                   n=int(len(self.labels)), per_class_recall=metrics["per_class_recall"],
                   confusion_matrix=self.confusion(num_classes).tolist())
        return row


@dataclass
class PredictionBlock:
    """One model's per-image predictions on one split: the row fields that say which (round, model,
    client, split), then labels, argmax predictions and softmax scores in the split's order."""

    fields: dict[str, Any]
    labels: np.ndarray
    preds: np.ndarray
    scores: np.ndarray


PREDICTION_FIELDS = ("round", "model", "client", "split")


def predictions_file(folder: Path, model: str, *, selected: bool = False) -> Path:
    return folder / f"predictions_{model}{'_selected' if selected else ''}.csv"


def write_predictions(folder: Path, blocks: list[PredictionBlock], class_names: list[str], *,
                      selected: bool = False) -> list[Path]:
    """predictions_<model>.csv, one file per model (global, finetuned, local, ...): one line per image
    (round, model, client, split, index in the split, label, prediction, then the softmax score of
    each class as p_<class name>). One file per model, so that a Flower node, which evaluates its
    local and the global model in separate messages, writes the same files as the simulation; each
    is written whole and atomically, so a re-run of the final round replaces it."""
    by_model: dict[str, list[PredictionBlock]] = {}
    for block in blocks:
        by_model.setdefault(str(block.fields["model"]), []).append(block)
    return [_write_block_csv(predictions_file(folder, model, selected=selected), group, class_names)
            for model, group in by_model.items()]


def _write_block_csv(path: Path, blocks: list[PredictionBlock], class_names: list[str]) -> Path:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*PREDICTION_FIELDS, "index", "label", "prediction", *(f"p_{name}" for name in class_names)])
    for block in blocks:
        head = [block.fields.get(key) for key in PREDICTION_FIELDS]
        for index, (label, pred, scores) in enumerate(zip(block.labels, block.preds, block.scores)):
            writer.writerow([*head, index, int(label), int(pred), *(f"{float(v):.6g}" for v in scores)])
    return atomic_write_text(path, out.getvalue())


@torch.no_grad()
def predict(model: nn.Module, split: Split, *, device: torch.device, mean, std, batch_size: int) -> Predictions:
    """Eval-mode predictions from the raw logits (BSM's prior is a training-time adjustment only)."""
    model.eval()
    preds, scores, loss_sum = [], [], 0.0
    for start in range(0, len(split), batch_size):
        images = split.images[start:start + batch_size].to(device)
        labels = split.labels[start:start + batch_size].to(device)
        logits = model(normalize(images, mean, std)).float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        preds.append(logits.argmax(1).cpu())
        scores.append(torch.softmax(logits, 1).cpu())
    labels_np = split.labels.numpy()
    if not preds:
        return Predictions(labels_np, np.zeros(0, dtype=np.int64), loss_sum)
    return Predictions(labels_np, torch.cat(preds).numpy(), loss_sum, scores=torch.cat(scores).numpy())
