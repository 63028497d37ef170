"""How much label signal images hold at each resolution: a linear probe on fixed random features.

Used to check that the built-in multi-resolution set does what it is for (its label lives in fine
detail, so the probe's accuracy falls with the downsampling factor) and to measure a real data
set the same way. The features are a seeded random 3x3 convolution, ReLU, and the mean and
standard deviation of each channel over the image; a logistic regression (scikit-learn) is
fitted on one split and scored on another. Nothing is learned but the linear layer, so the probe
measures the images, not a training recipe.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import StandardScaler

from fedward.data.types import Split
from fedward.seeding import torch_generator

FEATURE_CHANNELS = 64


def random_features(images: torch.Tensor, *, seed: int = 0, channels: int = FEATURE_CHANNELS) -> np.ndarray:
    """(N, 2 * channels) mean and std over the image of ReLU(random 3x3 conv) of uint8 images."""
    generator = torch_generator(seed, "probe-features")
    weight = torch.randn(channels, images.shape[1], 3, 3, generator=generator)
    weight -= weight.mean(dim=(1, 2, 3), keepdim=True)  # zero-sum filters: they see structure, not brightness
    out = []
    for start in range(0, len(images), 512):
        x = images[start:start + 512].float() / 255
        response = F.relu(F.conv2d(x, weight, padding=1))
        out.append(torch.cat([response.mean(dim=(2, 3)), response.std(dim=(2, 3))], dim=1))
    return torch.cat(out).numpy()


def probe_balanced_accuracy(train: Split, test: Split, *, seed: int = 0) -> float:
    """Balanced accuracy on ``test`` of a logistic regression fitted on ``train``'s random features."""
    scaler = StandardScaler()
    x_train = scaler.fit_transform(random_features(train.images, seed=seed))
    x_test = scaler.transform(random_features(test.images, seed=seed))
    model = LogisticRegression(max_iter=2000).fit(x_train, train.labels.numpy())
    return float(balanced_accuracy_score(test.labels.numpy(), model.predict(x_test)))
