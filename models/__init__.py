"""Model zoo, drop-in compatible with RepDistiller's (names, state-dict keys, feature lists).

Every model is built as ``model_dict[name](num_classes=...)`` and has
``forward(x, is_feat=False, preact=False)`` returning the logits, or ``(feats, logits)`` where
``feats[-1]`` is the pooled vector that feeds the classifier and ``feats[-2]`` the last spatial map.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from models.facts import (IMAGENET_FACTS, MODEL_FACTS, ModelFacts, feature_channels, model_facts, model_names,
                          stage_bns_before_relu)
from models.sites import Site, SiteRecorder, attach, site_shapes, tap

__all__ = ['model_dict', 'create_model', 'model_facts', 'ModelFacts', 'MODEL_FACTS', 'IMAGENET_FACTS',
           'model_names', 'feature_channels', 'stage_bns_before_relu',
           'Site', 'SiteRecorder', 'attach', 'tap', 'site_shapes']

# RepDistiller's name -> constructor map (the records in models/facts.py hold the other facts)
model_dict: dict[str, Callable[..., nn.Module]] = {name: facts.build for name, facts in MODEL_FACTS.items()}


def create_model(name: str, num_classes: int, dataset: str | None = None) -> nn.Module:
    """Build the registered model ``name`` with a ``num_classes``-way classifier.

    ``dataset='imagenet'``: ResNet18/34/50 and MobileNetV1 are the ImageNet architectures (models/imagenet.py);
    on other data sets RepDistiller's names keep their CIFAR meaning (ResNet50 is the CIFAR ResNet50).
    Raises UserError (one line listing the valid names) for an unknown name.
    """
    return model_facts(name, dataset).build(num_classes=num_classes)
