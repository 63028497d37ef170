"""MH-pFLID's messenger model and the modules that link it to a client's local model.

Messenger (shared, small): body M_b -> spatial map (B, D_mes, h, w); head M_h = mean over the
spatial tokens -> Linear(D_mes, 256) -> BatchNorm1d -> ReLU -> Linear(256, K). At 128 px and above
the body is the only public reproduction's (3x3/2 conv, 3x3/2 max pool, 5x5/2 conv, 3x3/2 max
pool, 7x7/2 conv, ReLU after each conv; 5x5 tokens at 224 px). The paper does not give the
messenger, so this is the reproduction's choice, not the paper's. Below 128 px that body would
shrink the map to nothing, so fedward uses the same three convs with 3x3 kernels and stride 1,
each followed by a 2x2 max pool except the last (8x8 tokens at 32 px, 16x16 at 64 px).

Receiver R and transmitter T (per client, never shared): single-head cross-attention over spatial
tokens, equations (6)-(9) of the paper as restated in the reproduction report:
``W_d`` maps every local token from C_loc to D_mes channels (a 1x1 conv), Q/K/V are linear maps of
width D_mes, and ``softmax(Q K^T / sqrt(D_mes)) V`` runs over the key tokens of the same image.
R takes its queries from the messenger tokens and keys/values from the local tokens; T the other
way round. The reproduction flattens each feature map to one vector and attends over the batch,
so its predictions depend on the other images in a batch; fedward attends within an image only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedward.models.registry import FeatureClassifier, init_weights, register_model

# Below this size the reproduction's strided body would leave no spatial map.
REPRODUCTION_BODY_MIN_SIZE = 128


def tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C): one token per spatial position."""
    return feature_map.flatten(2).transpose(1, 2)


class Messenger(FeatureClassifier):
    """The shared messenger: ``feature_map`` is M_b, ``classify_tokens`` is M_h."""

    def __init__(self, *, num_classes: int, image_size: int, in_channels: int = 3, width: int = 512,
                 hidden: int = 256, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if image_size >= REPRODUCTION_BODY_MIN_SIZE:
            self.body = nn.Sequential(
                nn.Conv2d(in_channels, 64, 3, stride=2, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
                nn.Conv2d(64, 64, 5, stride=2, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
                nn.Conv2d(64, width, 7, stride=2, padding=1), nn.ReLU(inplace=True))
        else:
            self.body = nn.Sequential(
                nn.Conv2d(in_channels, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                nn.Conv2d(64, width, 3, padding=1), nn.ReLU(inplace=True))
        self.num_features = width
        self.fc = nn.Sequential(nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, num_classes))
        init_weights(self, generator)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def classify_tokens(self, token_features: torch.Tensor) -> torch.Tensor:
        """M_h on (B, N, D_mes) tokens: their mean, then the head (equal to ``forward`` on M_b's own map)."""
        return self.fc(token_features.mean(1))


@register_model("messenger")
def messenger(*, num_classes: int, image_size: int = 224, in_channels: int = 3,
              generator: torch.Generator | None = None, width: int = 512) -> Messenger:
    """MH-pFLID's messenger (reproduction layout at >= 128 px); ``width`` is D_mes."""
    return Messenger(num_classes=num_classes, image_size=image_size, in_channels=in_channels, width=width,
                     generator=generator)


class CrossAttention(nn.Module):
    """R (``queries="messenger"``) or T (``queries="local"``): returns (B, N_queries, D_mes) tokens."""

    def __init__(self, local_channels: int, width: int, queries: str, generator: torch.Generator | None = None):
        super().__init__()
        if queries not in ("messenger", "local"):
            raise ValueError(f"queries must be 'messenger' (receiver) or 'local' (transmitter), got {queries!r}")
        self.queries = queries
        self.project_local = nn.Linear(local_channels, width)  # W_d
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        init_weights(self, generator)

    def forward(self, messenger_map: torch.Tensor, local_map: torch.Tensor) -> torch.Tensor:
        messenger_tokens = tokens(messenger_map)
        local_tokens = self.project_local(tokens(local_map))
        if self.queries == "messenger":
            source_q, source_kv = messenger_tokens, local_tokens
        else:
            source_q, source_kv = local_tokens, messenger_tokens
        # torch's fused attention: softmax over the keys of each image, scaled by 1/sqrt(D_mes).
        return F.scaled_dot_product_attention(self.query(source_q), self.key(source_kv), self.value(source_kv))


class FeatureAddition(nn.Module):
    """Ablation (the reproduction's ``isAddFeature``): messenger tokens + a 1x1 conv of the local
    map, pooled to the messenger's grid. The same form serves as R and as T."""

    def __init__(self, local_channels: int, width: int, generator: torch.Generator | None = None):
        super().__init__()
        self.project_local = nn.Conv2d(local_channels, width, 1)
        init_weights(self, generator)

    def forward(self, messenger_map: torch.Tensor, local_map: torch.Tensor) -> torch.Tensor:
        local = F.adaptive_avg_pool2d(local_map, messenger_map.shape[-2:])
        return tokens(messenger_map + self.project_local(local))


class LocalProjection(nn.Module):
    """Ablation ``none`` as R: no attention, only W_d (a per-token linear map C_loc -> D_mes) on the
    local tokens. The injection term M_h(W_d L_b x) then still lets the frozen messenger head shape
    the local model, so ``attention`` vs ``none`` isolates what the attention adds."""

    def __init__(self, local_channels: int, width: int, generator: torch.Generator | None = None):
        super().__init__()
        self.project_local = nn.Linear(local_channels, width)  # W_d
        init_weights(self, generator)

    def forward(self, messenger_map: torch.Tensor, local_map: torch.Tensor) -> torch.Tensor:
        return self.project_local(tokens(local_map))


class MessengerOnly(nn.Module):
    """Ablation ``none`` as T: the messenger's own tokens (the local model reaches the messenger
    through the distillation KL only)."""

    def forward(self, messenger_map: torch.Tensor, local_map: torch.Tensor) -> torch.Tensor:
        return tokens(messenger_map)


FUSIONS = ("attention", "add", "none")


def build_fusion(kind: str, role: str, local_channels: int, width: int,
                 generator: torch.Generator | None = None) -> nn.Module:
    """R (``role="receiver"``) or T (``role="transmitter"``) of the given kind."""
    if role not in ("receiver", "transmitter"):
        raise ValueError(f"role must be 'receiver' or 'transmitter', got {role!r}")
    if kind == "attention":
        return CrossAttention(local_channels, width, "messenger" if role == "receiver" else "local", generator)
    if kind == "add":
        return FeatureAddition(local_channels, width, generator)
    if kind == "none":
        return LocalProjection(local_channels, width, generator) if role == "receiver" else MessengerOnly()
    raise ValueError(f"unknown fusion {kind!r}; expected one of: {', '.join(FUSIONS)}")
