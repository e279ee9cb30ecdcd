"""The one map from ``--distill`` names to Distiller classes.

Adding a method = one file in distiller_zoo/ + one line here.
"""
from __future__ import annotations

from argparse import Namespace

import torch.nn as nn

from distiller_zoo.base import Distiller
from distiller_zoo.logit_kd import KD, Vanilla
from helper.errors import UserError

DISTILLERS: dict[str, type[Distiller]] = {
    'ce': Vanilla,
    'kd': KD,
    # RepDistiller's feature methods
    # CRD, DKD, SimKD
    # letKD, QUEST
}

# other accepted spellings -> canonical name
ALIASES: dict[str, str] = {}


def canonical_name(name: str) -> str:
    """Resolve aliases; raises UserError for an unknown method."""
    name = ALIASES.get(name, name)
    if name not in DISTILLERS:
        raise UserError(f"unknown --distill {name!r}; choose one of: {', '.join(sorted(DISTILLERS) + sorted(ALIASES))}")
    return name


def build_distiller(name: str, student: nn.Module, teacher: nn.Module | None, opt: Namespace) -> Distiller:
    """Instantiate the Distiller registered under ``name``."""
    return DISTILLERS[canonical_name(name)](student, teacher, opt)
