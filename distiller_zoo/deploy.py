"""Rebuild a saved student from its checkpoint alone.

Every checkpoint's ``model`` holds the state_dict of ``Distiller.deployable()`` and ``deploy`` holds
``Distiller.deploy_spec()``: a small dict (strings and numbers) saying how to rebuild that module.
Methods whose deployed student is more than the plain model (letKD: KD layers inside; SimKD:
projector + teacher classifier) register a builder for their ``kind`` here.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.nn as nn

from helper.errors import UserError
from helper.util import load_checkpoint, state_dict_from_checkpoint
from models import create_model

DeployBuilder = Callable[[dict[str, Any]], nn.Module]
DEPLOY_BUILDERS: dict[str, DeployBuilder] = {}


def register_deployable(kind: str) -> Callable[[DeployBuilder], DeployBuilder]:
    """Decorator: ``@register_deployable('simkd') def build(spec) -> nn.Module``."""
    def wrap(fn: DeployBuilder) -> DeployBuilder:
        DEPLOY_BUILDERS[kind] = fn
        return fn
    return wrap


@register_deployable('plain')
def _build_plain(spec: dict[str, Any]) -> nn.Module:
    return create_model(spec['model'], num_classes=spec['num_classes'], dataset=spec.get('dataset'))


def build_deployable(spec: dict[str, Any]) -> nn.Module:
    """An untrained module of the architecture ``spec`` describes."""
    if spec.get('kind') not in DEPLOY_BUILDERS:
        raise UserError(f"unknown deployable kind {spec.get('kind')!r}; known: {', '.join(sorted(DEPLOY_BUILDERS))}")
    return DEPLOY_BUILDERS[spec['kind']](spec)


def load_deployed(path: str | os.PathLike, map_location: str | torch.device = 'cpu',
                  spec: dict[str, Any] | None = None, fold_bn: bool = False) -> nn.Module:
    """The student saved in ``path`` (any of our checkpoints), rebuilt and loaded strictly, in eval mode.

    ``spec`` is needed only for files without a ``deploy`` entry (e.g. RepDistiller's own checkpoints:
    ``{'kind': 'plain', 'model': 'resnet20', 'num_classes': 100}``). ``fold_bn=True`` then folds, for
    inference, what the module knows how to fold (letKD's KD layers: ``LetKDStudent.fold_bn``; other
    modules are returned unchanged); the checkpoint's keys are those of the unfolded module.
    """
    return deployed_from_checkpoint(load_checkpoint(path, map_location=map_location), path, spec, fold_bn)


def deployed_from_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike, spec: dict[str, Any] | None = None,
                             fold_bn: bool = False) -> nn.Module:
    """``load_deployed`` for a checkpoint dictionary already read from ``path``."""
    spec = spec or ckpt.get('deploy')
    if spec is None:
        raise UserError(f"{path} does not say which architecture it holds; pass spec=")
    model = build_deployable(spec)
    model.load_state_dict(state_dict_from_checkpoint(ckpt, path), strict=True)
    if fold_bn and callable(getattr(model, 'fold_bn', None)):
        model.fold_bn()
    return model.eval()
