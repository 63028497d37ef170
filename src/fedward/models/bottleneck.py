"""The MH-pFLID bottleneck family: ResNet-5, -8, -11 and -17 (heterogeneous client models).

Facts from the only public reproduction: blocks per stage ResNet17 [1, 1, 2, 1], ResNet11
[1, 1, 1, 0], ResNet8 [1, 1, 0, 0], ResNet5 [1, 0, 0, 0]; stage widths 64/128/256/512 with NO x4
expansion; each block is 1x1 -> 3x3 -> 1x1, all at the stage width, stride on the 3x3 in stages
2-4, with a 1x1 conv + BN projection shortcut when the shape changes; global average pool and
Linear(C_last, K), C_last being the width of the last stage present.

Departure: the paper does not give the stem and the reproduction uses a 3x3 stride-1 stem without
max pool even at 224 px (very heavy). We default to ``stem="auto"`` like the torchvision ResNets,
i.e. the stride-2 ImageNet stem at 224 px; ``stem="small"`` gives the reproduction's stem.
"""

from __future__ import annotations

import torch

from fedward.models.registry import register_model
from fedward.models.resnet import Bottleneck, ResNet, resolve_stem

BLOCKS_PER_STAGE: dict[str, list[int]] = {
    "resnet5": [1, 0, 0, 0],
    "resnet8": [1, 1, 0, 0],
    "resnet11": [1, 1, 1, 0],
    "resnet17": [1, 1, 2, 1],
}


class NarrowBottleneck(Bottleneck):
    """Bottleneck whose three convs all run at the stage width (expansion 1)."""

    expansion = 1


def _build(name: str, num_classes: int, image_size: int, in_channels: int,
           generator: torch.Generator | None, stem: str) -> ResNet:
    return ResNet(
        NarrowBottleneck, BLOCKS_PER_STAGE[name], num_classes=num_classes, in_channels=in_channels,
        stem=resolve_stem(stem, image_size), generator=generator,
    )


@register_model("resnet5")
def resnet5(*, num_classes: int, image_size: int = 224, in_channels: int = 3,
            generator: torch.Generator | None = None, stem: str = "auto") -> ResNet:
    """ResNet-5: one narrow bottleneck at width 64; ``num_features`` 64."""
    return _build("resnet5", num_classes, image_size, in_channels, generator, stem)


@register_model("resnet8")
def resnet8(*, num_classes: int, image_size: int = 224, in_channels: int = 3,
            generator: torch.Generator | None = None, stem: str = "auto") -> ResNet:
    """ResNet-8: blocks [1, 1, 0, 0]; ``num_features`` 128."""
    return _build("resnet8", num_classes, image_size, in_channels, generator, stem)


@register_model("resnet11")
def resnet11(*, num_classes: int, image_size: int = 224, in_channels: int = 3,
             generator: torch.Generator | None = None, stem: str = "auto") -> ResNet:
    """ResNet-11: blocks [1, 1, 1, 0]; ``num_features`` 256."""
    return _build("resnet11", num_classes, image_size, in_channels, generator, stem)


@register_model("resnet17")
def resnet17(*, num_classes: int, image_size: int = 224, in_channels: int = 3,
             generator: torch.Generator | None = None, stem: str = "auto") -> ResNet:
    """ResNet-17: blocks [1, 1, 2, 1]; ``num_features`` 512."""
    return _build("resnet17", num_classes, image_size, in_channels, generator, stem)
