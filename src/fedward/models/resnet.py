"""ResNet-18/34/50 with torchvision's exact state-dict keys and shapes, and an input-size-aware stem.

Key names (``conv1``, ``bn1``, ``layerN.M.convK``/``bnK``, ``layerN.M.downsample.0/1``, ``fc``) and
shapes match torchvision, so a torchvision or MoCo checkpoint loads as is (see ``pretrained.py``).
The stem adapts to small images; its keys stay ``conv1``/``bn1`` whatever its shape.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from fedward.errors import ConfigError
from fedward.models.registry import FeatureClassifier, init_weights, register_model

STEMS = ("auto", "imagenet", "medium", "small")
STAGE_WIDTHS = (64, 128, 256, 512)


def resolve_stem(stem: str, image_size: int) -> str:
    """The concrete stem for ``stem`` ("auto" picks by image size: >=96 imagenet, 41..95 medium, <=40 small)."""
    if stem not in STEMS:
        raise ConfigError(f"unknown stem {stem!r}; expected one of: {', '.join(STEMS)}")
    if stem != "auto":
        return stem
    if image_size >= 96:
        return "imagenet"
    return "medium" if image_size > 40 else "small"


def make_stem(stem: str, in_channels: int, width: int = 64) -> tuple[nn.Conv2d, nn.BatchNorm2d, nn.Module]:
    """(conv1, bn1, maxpool) for a resolved stem.

    imagenet: 7x7 stride-2 conv + 3x3 stride-2 max pool (torchvision; /4 overall);
    medium: 3x3 stride-1 conv + max pool (/2); small: 3x3 stride-1 conv, no pool (CIFAR style).
    """
    if stem == "imagenet":
        conv = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
    elif stem in ("medium", "small"):
        conv = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
    else:
        raise ConfigError(f"unknown stem {stem!r}; expected one of: imagenet, medium, small")
    pool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem != "small" else nn.Identity()
    return conv, nn.BatchNorm2d(width), pool


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (stride on the first) plus identity or ``downsample`` shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, ResNet v1.5 like torchvision) -> 1x1 up to ``planes * expansion``."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_planes)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Union[type[BasicBlock], type[Bottleneck]]


class ResNet(FeatureClassifier):
    """A ResNet body of up to four stages (widths 64/128/256/512 times ``block.expansion``).

    A stage with 0 blocks is left out (the MH-pFLID family); only trailing stages may be empty.
    ``num_features`` is the output width of the last stage present.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        *,
        num_classes: int,
        in_channels: int = 3,
        stem: str = "imagenet",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        counts = list(layers)
        if len(counts) != 4 or counts[0] < 1 or any(n < 0 for n in counts) or _has_gap(counts):
            raise ValueError(f"layers must be 4 block counts, the first >= 1 and zeros only at the end; got {counts}")
        self.stem = stem
        self.conv1, self.bn1, self.maxpool = make_stem(stem, in_channels, STAGE_WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)
        self.stage_names: list[str] = []
        inplanes = STAGE_WIDTHS[0]
        for index, (width, blocks) in enumerate(zip(STAGE_WIDTHS, counts)):
            if blocks == 0:
                break
            stride = 1 if index == 0 else 2
            name = f"layer{index + 1}"
            setattr(self, name, _make_stage(block, inplanes, width, blocks, stride))
            self.stage_names.append(name)
            inplanes = width * block.expansion
        self.num_features = inplanes
        self.fc = nn.Linear(inplanes, num_classes)
        init_weights(self, generator)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x


def _has_gap(counts: list[int]) -> bool:
    """True when a non-empty stage follows an empty one."""
    return any(counts[i] == 0 and counts[i + 1] > 0 for i in range(len(counts) - 1))


def _make_stage(block: Block, inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` blocks; the first strides and gets a 1x1 conv + BN projection when the shape changes."""
    out_planes = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out_planes:
        downsample = nn.Sequential(conv1x1(inplanes, out_planes, stride), nn.BatchNorm2d(out_planes))
    stage = [block(inplanes, planes, stride, downsample)]
    stage += [block(out_planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*stage)


@register_model("resnet18")
def resnet18(
    *,
    num_classes: int,
    image_size: int = 224,
    in_channels: int = 3,
    generator: torch.Generator | None = None,
    stem: str = "auto",
) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]); 11,689,512 parameters with 1000 classes and the ImageNet stem."""
    return ResNet(
        BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels,
        stem=resolve_stem(stem, image_size), generator=generator,
    )


@register_model("resnet34")
def resnet34(
    *,
    num_classes: int,
    image_size: int = 224,
    in_channels: int = 3,
    generator: torch.Generator | None = None,
    stem: str = "auto",
) -> ResNet:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3])."""
    return ResNet(
        BasicBlock, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels,
        stem=resolve_stem(stem, image_size), generator=generator,
    )


@register_model("resnet50")
def resnet50(
    *,
    num_classes: int,
    image_size: int = 224,
    in_channels: int = 3,
    generator: torch.Generator | None = None,
    stem: str = "auto",
) -> ResNet:
    """ResNet-50 (Bottleneck x4 expansion, [3, 4, 6, 3]); 25,557,032 parameters with 1000 classes."""
    return ResNet(
        Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels,
        stem=resolve_stem(stem, image_size), generator=generator,
    )
