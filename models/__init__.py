"""Model zoo, drop-in compatible with RepDistiller's (names, state-dict keys, feature lists).

Every model is built as ``model_dict[name](num_classes=...)`` and has
``forward(x, is_feat=False, preact=False)`` returning the logits, or ``(feats, logits)`` where
``feats[-1]`` is the pooled vector that feeds the classifier and ``feats[-2]`` the last spatial map.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from helper.errors import UserError
from models.mobilenetv2 import mobile_half
from models.resnet import (resnet8, resnet8x4, resnet14, resnet20, resnet32, resnet32x4, resnet44,
                           resnet56, resnet110)
from models.resnetv2 import ResNet50
from models.ShuffleNetv1 import ShuffleV1
from models.ShuffleNetv2 import ShuffleV2
from models.vgg import vgg8_bn, vgg11_bn, vgg13_bn, vgg16_bn, vgg19_bn
from models.wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

__all__ = ['model_dict', 'create_model']

model_dict: dict[str, Callable[..., nn.Module]] = {
    'resnet8': resnet8,
    'resnet14': resnet14,
    'resnet20': resnet20,
    'resnet32': resnet32,
    'resnet44': resnet44,
    'resnet56': resnet56,
    'resnet110': resnet110,
    'resnet8x4': resnet8x4,
    'resnet32x4': resnet32x4,
    'ResNet50': ResNet50,
    'wrn_16_1': wrn_16_1,
    'wrn_16_2': wrn_16_2,
    'wrn_40_1': wrn_40_1,
    'wrn_40_2': wrn_40_2,
    'vgg8': vgg8_bn,
    'vgg11': vgg11_bn,
    'vgg13': vgg13_bn,
    'vgg16': vgg16_bn,
    'vgg19': vgg19_bn,
    'MobileNetV2': mobile_half,
    'ShuffleV1': ShuffleV1,
    'ShuffleV2': ShuffleV2,
}


def create_model(name: str, num_classes: int) -> nn.Module:
    """Build the registered model ``name`` with a ``num_classes``-way classifier.

    Raises UserError (one line listing the valid names) for an unknown name.
    """
    if name not in model_dict:
        raise UserError(f"unknown model '{name}'; valid names: {', '.join(model_dict)}")
    return model_dict[name](num_classes=num_classes)
