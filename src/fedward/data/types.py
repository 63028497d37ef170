"""The in-memory form of a federated data set: uint8 image tensors per client and split.

Images are decoded once into fixed-size uint8 tensors (N, 3, H, W); batches are augmented and
normalised as tensors on the training device (see ``fedward.data.augment``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Split:
    """One split of one client: ``images`` uint8 (N, 3, H, W), ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"Split.images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(f"Split.labels must be int64 (N,), got {self.labels.dtype} {tuple(self.labels.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"Split has {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return int(self.labels.numel())

    def class_counts(self, num_classes: int) -> torch.Tensor:
        """Number of samples per class, int64 (num_classes,)."""
        return torch.bincount(self.labels, minlength=num_classes)[:num_classes]

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.images[index], self.labels[index])

    @staticmethod
    def concat(splits: list["Split"]) -> "Split":
        return Split(torch.cat([s.images for s in splits]), torch.cat([s.labels for s in splits]))


@dataclass
class ClientData:
    """One hospital: its id, a display name and its train / val / test splits.

    ``val`` is carved from the client's own training data (never from test), so model selection
    never looks at a test set.
    """

    client_id: int
    name: str
    train: Split
    val: Split
    test: Split


@dataclass
class FederatedData:
    """A federated data set: per-client splits plus the facts every method needs."""

    name: str
    num_classes: int
    class_names: list[str]
    image_size: int
    clients: list[ClientData]
    # Normalisation applied after augmentation (per channel, on [0, 1] images).
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    info: dict = field(default_factory=dict)

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def pooled(self, split: str) -> Split:
        """The union of every client's ``split`` ('train', 'val' or 'test')."""
        return Split.concat([getattr(c, split) for c in self.clients])

    def class_counts(self, split: str = "train") -> torch.Tensor:
        """(num_clients, num_classes) int64 table of class counts."""
        return torch.stack([getattr(c, split).class_counts(self.num_classes) for c in self.clients])
