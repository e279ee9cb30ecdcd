"""The ImageNet architectures of the letKD paper's Table 2 (224x224 input, 1000 classes by default).

``IMAGENET_MODELS[name](num_classes=...)`` builds one; every model has the zoo's
``forward(x, is_feat=False, preact=False)`` (see models/__init__.py). The ResNets' state_dict keys
equal torchvision's, so its ImageNet weight files load with ``strict=True``.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from models.mobilenetv1 import mobilenet_v1
from models.resnet_imagenet import imagenet_resnet18, imagenet_resnet34, imagenet_resnet50

__all__ = ['IMAGENET_MODELS']

IMAGENET_MODELS: dict[str, Callable[..., nn.Module]] = {
    'ResNet18': imagenet_resnet18,
    'ResNet34': imagenet_resnet34,
    'ResNet50': imagenet_resnet50,
    'MobileNetV1': mobilenet_v1,
}
