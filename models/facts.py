"""One record per architecture of the zoo: how to build it and the facts methods need about it.

Methods ask the record instead of keeping their own tables of model names:

    facts = model_facts('wrn_40_2')
    facts.pooled_map          # Site('relu'): the map the classifier pools (after WRN's final BN + ReLU)
    facts.kd_sites            # letKD's places: {'inter': Site('block3.layer.0'), 'penult': Site('relu')}
    facts.low_lr              # RepDistiller trains this student at lr 0.01 (MobileNet/ShuffleNet)

Fields:
- ``family``: 'resnet' (CIFAR ResNets, incl. x4), 'wrn', 'vgg', 'resnetv2' (the CIFAR ResNet50),
  'shufflenet', 'mobilenet'.
- ``classifier``: module name of the final ``nn.Linear``.
- ``pooled_map``: the spatial map that global pooling turns into the classifier's input, so
  ``classifier(flatten(avgpool(map))) == logits`` exactly (tests/test_models.py checks it for every model).
  SimKD's target and letKD's penultimate KD-layer place.
- ``last_stage_first_block``: the output of the first block of the last stage: letKD's intermediate
  place. When the last stage has one block (resnet8, resnet8x4, vgg8) it is the same tensor as the
  pooled map; letKD then runs its intermediate KD layer first.
- ``low_lr``: RepDistiller (and the letKD paper) train these students with lr 0.01 instead of 0.05.
- ``no_bn_before_relu``: empty where ``get_bn_before_relu()`` gives, for each stage map of
  ``forward(is_feat=True, preact=True)[1:-1]``, the BN whose output (plus the shortcut, in a residual stage)
  a ReLU reads next (OFD's teacher margins come from these BNs: ``stage_bns_before_relu``); otherwise why
  not: ShuffleV1/V2 (RepDistiller defines none, as mdistiller) and MobileNetV2 (its stages end in a
  linear-bottleneck BN that no ReLU follows).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torch.nn as nn

from helper.errors import UserError
from models.imagenet import IMAGENET_MODELS
from models.mobilenetv2 import mobile_half
from models.resnet import (resnet8, resnet8x4, resnet14, resnet20, resnet32, resnet32x4, resnet44,
                           resnet56, resnet110)
from models.resnetv2 import ResNet50
from models.ShuffleNetv1 import ShuffleV1
from models.ShuffleNetv2 import ShuffleV2
from models.sites import Site
from models.vgg import vgg8_bn, vgg11_bn, vgg13_bn, vgg16_bn, vgg19_bn
from models.wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

FAMILIES = ('resnet', 'wrn', 'vgg', 'resnetv2', 'shufflenet', 'mobilenet', 'imagenet_resnet', 'imagenet_mobilenet')
# the data set whose names resolve to the ImageNet architectures (models/imagenet.py)
IMAGENET = 'imagenet'


@dataclass(frozen=True)
class ModelFacts:
    """Facts about one architecture of the zoo (see the module docstring for each field)."""

    name: str
    build: Callable[..., nn.Module]
    family: str
    classifier: str
    pooled_map: Site
    last_stage_first_block: Site
    low_lr: bool = False
    no_bn_before_relu: str = ''

    @property
    def kd_sites(self) -> dict[str, Site]:
        """letKD's KD-layer places, in forward order: 'inter' then 'penult'."""
        return {'inter': self.last_stage_first_block, 'penult': self.pooled_map}


# VGG applies the ReLU after block4 functionally: the pooled map is the input of pool4
_VGG_POOLED = Site('pool4', on_input=True)


def _records() -> list[ModelFacts]:
    records = []
    for name, build in (('resnet8', resnet8), ('resnet14', resnet14), ('resnet20', resnet20),
                        ('resnet32', resnet32), ('resnet44', resnet44), ('resnet56', resnet56),
                        ('resnet110', resnet110), ('resnet8x4', resnet8x4), ('resnet32x4', resnet32x4)):
        records.append(ModelFacts(name, build, 'resnet', 'fc', Site('layer3'), Site('layer3.0')))
    records.append(ModelFacts('ResNet50', ResNet50, 'resnetv2', 'linear', Site('layer4'), Site('layer4.0')))
    for name, build in (('wrn_16_1', wrn_16_1), ('wrn_16_2', wrn_16_2), ('wrn_40_1', wrn_40_1),
                        ('wrn_40_2', wrn_40_2)):
        # block outputs are raw residual sums; the classifier reads the final bn1 + ReLU ('relu')
        records.append(ModelFacts(name, build, 'wrn', 'fc', Site('relu'), Site('block3.layer.0')))
    # VGG's last stage is block4 (conv-BN-ReLU units); vgg8's block4 has one unit
    records.append(ModelFacts('vgg8', vgg8_bn, 'vgg', 'classifier', _VGG_POOLED, _VGG_POOLED))
    for name, build in (('vgg11', vgg11_bn), ('vgg13', vgg13_bn), ('vgg16', vgg16_bn), ('vgg19', vgg19_bn)):
        records.append(ModelFacts(name, build, 'vgg', 'classifier', _VGG_POOLED, Site('block4.2')))
    # MobileNetV2: conv2 is the 1x1 conv-BN-ReLU head; ShuffleV2: relu2 follows its conv2-bn2 head
    records.append(ModelFacts('MobileNetV2', mobile_half, 'mobilenet', 'classifier.0', Site('conv2'),
                              Site('blocks.5.0'), low_lr=True,
                              no_bn_before_relu='its stages end in a linear-bottleneck BN that no ReLU follows'))
    shuffle_bns = 'RepDistiller and mdistiller define no BN before the ReLU of its stages'
    records.append(ModelFacts('ShuffleV1', ShuffleV1, 'shufflenet', 'linear', Site('layer3'), Site('layer3.0'),
                              low_lr=True, no_bn_before_relu=shuffle_bns))
    records.append(ModelFacts('ShuffleV2', ShuffleV2, 'shufflenet', 'linear', Site('relu2'), Site('layer3.0'),
                              low_lr=True, no_bn_before_relu=shuffle_bns))
    return records


def _imagenet_records() -> list[ModelFacts]:
    """mdistiller's ImageNet names (Table 2): torchvision-keyed ResNets and MobileNetV1."""
    records = [ModelFacts(name, IMAGENET_MODELS[name], 'imagenet_resnet', 'fc', Site('layer4'), Site('layer4.0'))
               for name in ('ResNet18', 'ResNet34', 'ResNet50')]
    # model.13 is the last separable unit (1024 ch, stride 32); model.12 the first unit of the stride-32 stage
    records.append(ModelFacts('MobileNetV1', IMAGENET_MODELS['MobileNetV1'], 'imagenet_mobilenet', 'fc',
                              Site('model.13'), Site('model.12')))
    return records


MODEL_FACTS: dict[str, ModelFacts] = {record.name: record for record in _records()}
# ImageNet architectures; with dataset 'imagenet' their names win over MODEL_FACTS' (ResNet50 is a CIFAR model
# there), on other data sets only names MODEL_FACTS lacks (ResNet18, ResNet34, MobileNetV1) resolve to them
IMAGENET_FACTS: dict[str, ModelFacts] = {record.name: record for record in _imagenet_records()}


def model_names() -> list[str]:
    """Every model name of the zoo (what a name means may depend on the data set: see ``model_facts``)."""
    return list(dict.fromkeys([*MODEL_FACTS, *IMAGENET_FACTS]))


def model_facts(name: str, dataset: str | None = None) -> ModelFacts:
    """The record of a model of the zoo; UserError (listing the valid names) for an unknown name.

    With ``dataset='imagenet'`` the ImageNet architectures' names (ResNet18/34/50, MobileNetV1) resolve to
    models/imagenet.py; otherwise RepDistiller's names keep their CIFAR meaning.
    """
    if name in IMAGENET_FACTS and (dataset == IMAGENET or name not in MODEL_FACTS):
        return IMAGENET_FACTS[name]
    if name not in MODEL_FACTS:
        raise UserError(f"unknown model '{name}'; valid names: {', '.join(model_names())}")
    return MODEL_FACTS[name]


@lru_cache(maxsize=None)
def feature_channels(name: str, image_size: int = 32, dataset: str | None = None) -> tuple[int, ...]:
    """Channel counts of the spatial maps of ``forward(is_feat=True)`` (feats[:-1]), read from a dummy batch."""
    model = model_facts(name, dataset).build(num_classes=10).eval()
    with torch.no_grad():
        feats, _ = model(torch.zeros(2, 3, image_size, image_size), is_feat=True)
    return tuple(int(f.shape[1]) for f in feats[:-1])


def stage_bns_before_relu(model: nn.Module, name: str, dataset: str | None = None) -> list[nn.BatchNorm2d]:
    """``model.get_bn_before_relu()``: one BN per stage map of ``forward(is_feat=True, preact=True)[1:-1]``, whose
    output (plus the shortcut, in a residual stage) a ReLU reads next. UserError (saying why) for the models whose
    record has ``no_bn_before_relu``."""
    facts = model_facts(name, dataset)
    if facts.no_bn_before_relu:
        raise UserError(f"{name} has no BN before a ReLU per stage: {facts.no_bn_before_relu}")
    bns = list(model.get_bn_before_relu())
    if not all(isinstance(bn, nn.BatchNorm2d) for bn in bns):
        raise UserError(f"{name}'s get_bn_before_relu() returns modules that are not BatchNorm2d: "
                        f"{[type(bn).__name__ for bn in bns]}")
    return bns
