"""Heads that wrap or replace a model's classifier: MOON's projection head and a cosine classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedward.errors import ConfigError
from fedward.models.registry import FeatureClassifier, init_weights


def _check_positive(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")


class ProjectionModel(FeatureClassifier):
    """MOON's model as in the Fed-MAS reference: pooled feature f -> p1 (F->F) -> ReLU -> p2 (F->proj_dim)
    -> fc (proj_dim->C).

    ``embed`` returns z, the p2 output (what MOON's contrastive loss compares); ``num_features`` is
    ``proj_dim``. The backbone's own ``fc`` is replaced by ``nn.Identity`` (in place) so that it
    leaves no dead parameters.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        proj_dim: int = 256,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not all(hasattr(backbone, a) for a in ("num_features", "embed", "feature_map")):
            raise ConfigError(
                f"ProjectionModel needs a backbone with num_features, embed and feature_map (a model from "
                f"get_model), got {type(backbone).__name__}"
            )
        _check_positive(num_classes, "num_classes")
        _check_positive(proj_dim, "proj_dim")
        backbone.fc = nn.Identity()
        self.backbone = backbone
        width = backbone.num_features
        self.p1 = nn.Linear(width, width)
        self.relu = nn.ReLU(inplace=True)
        self.p2 = nn.Linear(width, proj_dim)
        self.fc = nn.Linear(proj_dim, num_classes)
        self.num_features = proj_dim
        for head in (self.p1, self.p2, self.fc):
            init_weights(head, generator)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.feature_map(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The projection z, (B, proj_dim)."""
        return self.p2(self.relu(self.p1(self.backbone.embed(x))))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, logits) from one pass through the body."""
        z = self.embed(x)
        return z, self.fc(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))


class CosineClassifier(nn.Module):
    """logits[b, c] = cos(x_b, w_c) = normalize(x) @ normalize(W).T, in [-1, 1], no bias.

    ``weight`` is (num_classes, in_features) like ``nn.Linear`` (the LDAM reference stores the
    transpose; the function is the same). Init as in the reference: U(-1, 1), each class vector
    rescaled to unit norm.
    """

    def __init__(self, in_features: int, num_classes: int, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        _check_positive(in_features, "in_features")
        _check_positive(num_classes, "num_classes")
        self.in_features = in_features
        self.out_features = num_classes
        weight = torch.empty(num_classes, in_features).uniform_(-1.0, 1.0, generator=generator)
        self.weight = nn.Parameter(F.normalize(weight, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.out_features}"


def use_cosine_classifier(model: nn.Module, *, head: str = "fc", generator: torch.Generator | None = None) -> nn.Module:
    """Replace ``model.<head>`` (an ``nn.Linear``) by a CosineClassifier of the same shape; returns ``model``."""
    fc = getattr(model, head, None)
    if not isinstance(fc, nn.Linear):
        raise ConfigError(f"use_cosine_classifier needs a model whose {head} is nn.Linear, got {type(fc).__name__}")
    cosine = CosineClassifier(fc.in_features, fc.out_features, generator=generator)
    setattr(model, head, cosine.to(device=fc.weight.device, dtype=fc.weight.dtype))
    return model


class PriorAlignedModel(FeatureClassifier):
    """Fed-MAS's local/global model (reference models/resnet_free.py): the backbone and its ``fc``
    (logits z, used at test time) plus the projector ``p_free`` (F -> F -> BN -> ReLU -> D) that is
    aligned with the frozen prior's D-dim feature, and the auxiliary head ``fc_free`` (D -> C),
    trained with the same task loss and never used at test time."""

    def __init__(self, backbone: nn.Module, num_classes: int, prior_dim: int, *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        _check_positive(num_classes, "num_classes")
        _check_positive(prior_dim, "prior_dim")
        self.backbone = backbone
        width = backbone.num_features
        self.p_free = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                                    nn.Linear(width, prior_dim))
        self.fc_free = nn.Linear(prior_dim, num_classes)
        # The classifier moves out of the backbone, so each parameter has one state-dict key.
        self.fc = backbone.fc
        backbone.fc = nn.Identity()
        self.num_features = width
        for head in (self.p_free[0], self.p_free[3], self.fc_free):
            init_weights(head, generator)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.feature_map(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.embed(x)

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits z, projection p, auxiliary logits z2)."""
        feature = self.embed(x)
        projection = self.p_free(feature)
        return self.fc(feature), projection, self.fc_free(projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))
