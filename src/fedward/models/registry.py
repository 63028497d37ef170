"""Model registry (torchvision style) and the interface every registered model implements.

Every model built by :func:`get_model` is a :class:`FeatureClassifier`: it has ``num_features``,
``feature_map(x) -> (B, C, h, w)``, ``embed(x) -> (B, num_features)``, a head ``fc`` and
``forward(x) = fc(embed(x))``. Algorithms rely on this (MOON's projection head, attention over
spatial tokens, cosine classifiers, feature-space losses).
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from fedward.errors import ConfigError

Builder = Callable[..., "FeatureClassifier"]
B = TypeVar("B", bound=Builder)

_REGISTRY: dict[str, Builder] = {}

# Arguments get_model passes to every builder itself; anything else is a model-specific option.
_COMMON_ARGS = ("num_classes", "image_size", "in_channels", "generator")


class FeatureClassifier(nn.Module):
    """Base of every registered model: a body giving a feature map, global average pooling, ``fc``."""

    num_features: int
    fc: nn.Module

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The body's output before global pooling, (B, C, h, w)."""
        raise NotImplementedError

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled, flattened feature, (B, num_features)."""
        return torch.flatten(F.adaptive_avg_pool2d(self.feature_map(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))


def init_weights(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """torchvision's ResNet initialisation, drawn from ``generator`` (the global stream if None).

    Conv: Kaiming normal (fan_out, ReLU); BatchNorm/GroupNorm: weight 1, bias 0; Linear: PyTorch's
    default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.in_features)
            nn.init.uniform_(m.weight, -bound, bound, generator=generator)
            if m.bias is not None:
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)


def register_model(name: str) -> Callable[[B], B]:
    """Decorator registering a builder ``fn(*, num_classes, image_size, in_channels, generator, **options)``."""

    def decorate(builder: B) -> B:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = builder
        return builder

    return decorate


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def _check_positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def model_options(name: str) -> list[str]:
    """The options a registered model's builder takes beyond the common arguments (e.g. ``stem``)."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; expected one of: {', '.join(list_models())}")
    return [p for p in inspect.signature(_REGISTRY[name]).parameters if p not in _COMMON_ARGS]


def _check_options(name: str, builder: Builder, options: dict[str, object]) -> None:
    """Unknown model options become a ConfigError instead of a TypeError deep inside the builder."""
    accepted = [p for p in inspect.signature(builder).parameters if p not in _COMMON_ARGS]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        expected = ", ".join(accepted) if accepted else "none"
        raise ConfigError(f"model {name!r} takes no option {unknown[0]!r}; its options: {expected}")


def get_model(
    name: str,
    *,
    num_classes: int,
    image_size: int = 224,
    in_channels: int = 3,
    generator: torch.Generator | None = None,
    **kwargs: object,
) -> FeatureClassifier:
    """Build the registered model ``name``.

    With ``generator`` the weights are drawn from it alone (the global stream is left untouched);
    without it they come from the global stream, like torchvision.
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; expected one of: {', '.join(list_models())}")
    _check_positive_int(num_classes, "num_classes")
    _check_positive_int(image_size, "image_size")
    _check_positive_int(in_channels, "in_channels")
    builder = _REGISTRY[name]
    _check_options(name, builder, kwargs)
    # Module constructors draw their default init from the global stream; with our own generator
    # we re-initialise afterwards, so fork the global stream to leave it as it was.
    with torch.random.fork_rng(devices=[], enabled=generator is not None):
        return builder(
            num_classes=num_classes, image_size=image_size, in_channels=in_channels, generator=generator, **kwargs
        )
