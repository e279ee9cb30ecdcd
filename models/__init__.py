"""Model zoo, drop-in compatible with RepDistiller's (names, state-dict keys, feature lists).

Every model is built as ``model_dict[name](num_classes=...)`` and has
``forward(x, is_feat=False, preact=False)`` returning the logits, or ``(feats, logits)`` where
``feats[-1]`` is the pooled vector that feeds the classifier and ``feats[-2]`` the last spatial map.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from models.facts import MODEL_FACTS, ModelFacts, feature_channels, model_facts
from models.sites import Site, attach, site_shapes, tap

__all__ = ['model_dict', 'create_model', 'model_facts', 'ModelFacts', 'MODEL_FACTS', 'feature_channels',
           'Site', 'attach', 'tap', 'site_shapes']

# RepDistiller's name -> constructor map (the records in models/facts.py hold the other facts)
model_dict: dict[str, Callable[..., nn.Module]] = {name: facts.build for name, facts in MODEL_FACTS.items()}


def create_model(name: str, num_classes: int) -> nn.Module:
    """Build the registered model ``name`` with a ``num_classes``-way classifier.

    Raises UserError (one line listing the valid names) for an unknown name.
    """
    return model_facts(name).build(num_classes=num_classes)
