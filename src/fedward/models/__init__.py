"""Models: a registry of backbones sharing one interface, classifier heads and ImageNet weights.

Importing this package registers every model (resnet18/34/50, resnet5/8/11/17, smallcnn, messenger).
"""

from __future__ import annotations

from fedward.models import bottleneck, messenger, resnet, small_cnn  # noqa: F401  (import registers the models)
from fedward.models.bottleneck import BLOCKS_PER_STAGE, NarrowBottleneck
from fedward.models.messenger import FUSIONS, CrossAttention, Messenger, build_fusion
from fedward.models.heads import CosineClassifier, ProjectionModel, use_cosine_classifier
from fedward.models.pretrained import TORCHVISION_FILES, default_weights_path, load_pretrained_backbone
from fedward.models.registry import (
    FeatureClassifier,
    get_model,
    init_weights,
    list_models,
    model_options,
    register_model,
)
from fedward.models.resnet import BasicBlock, Bottleneck, ResNet, resolve_stem
from fedward.models.small_cnn import SmallCNN

__all__ = [
    "BLOCKS_PER_STAGE",
    "BasicBlock",
    "Bottleneck",
    "CosineClassifier",
    "CrossAttention",
    "FUSIONS",
    "FeatureClassifier",
    "Messenger",
    "NarrowBottleneck",
    "ProjectionModel",
    "ResNet",
    "SmallCNN",
    "TORCHVISION_FILES",
    "build_fusion",
    "default_weights_path",
    "get_model",
    "init_weights",
    "list_models",
    "load_pretrained_backbone",
    "model_options",
    "register_model",
    "resolve_stem",
    "use_cosine_classifier",
]
