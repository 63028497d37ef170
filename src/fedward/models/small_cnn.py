"""A tiny, fast CNN for tests and smoke runs, with the common model interface."""

from __future__ import annotations

import torch
from torch import nn

from fedward.models.registry import FeatureClassifier, init_weights, register_model


class SmallCNN(FeatureClassifier):
    """Two 3x3 stride-2 conv + BN + ReLU blocks (16 and 32 channels), global pool, ``fc``."""

    def __init__(self, *, num_classes: int, in_channels: int = 3, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU(inplace=True)
        self.num_features = 32
        self.fc = nn.Linear(self.num_features, num_classes)
        init_weights(self, generator)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)))


@register_model("smallcnn")
def smallcnn(*, num_classes: int, image_size: int = 224, in_channels: int = 3,
             generator: torch.Generator | None = None) -> SmallCNN:
    """SmallCNN; works at any image size (``image_size`` is accepted for the common signature)."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, generator=generator)
