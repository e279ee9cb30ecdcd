"""The one map from ``--distill`` names to Distiller classes, and the method flags built from it.

Adding a method = one file in distiller_zoo/ (its Distiller, flags and option resolution) + one line here.
"""
from __future__ import annotations

from argparse import ArgumentParser, Namespace

import torch.nn as nn

from dataset import DataInfo
from distiller_zoo.base import Distiller, OptionGroup
from distiller_zoo.AB import ABDistiller
from distiller_zoo.AT import ATDistiller
from distiller_zoo.CC import CCDistiller
from distiller_zoo.FitNet import FitNetDistiller
from distiller_zoo.FSP import FSPDistiller
from distiller_zoo.FT import FTDistiller
from distiller_zoo.KDSVD import KDSVDDistiller
from distiller_zoo.NST import NSTDistiller
from distiller_zoo.PKT import PKTDistiller
from distiller_zoo.RKD import RKDDistiller
from distiller_zoo.SP import SPDistiller
from distiller_zoo.VID import VIDDistiller
from distiller_zoo.DKD import DKD
from distiller_zoo.crd import CRD
from distiller_zoo.ctkd import CTKD
from distiller_zoo.dist import DIST
from distiller_zoo.letkd import FitNetKDLayer, LetKD1, LetKD2, LetKDInter
from distiller_zoo.logit_kd import KD, Vanilla
from distiller_zoo.mlkd import MLKD
from distiller_zoo.ofd import OFD
from distiller_zoo.quest import QUEST
from distiller_zoo.reviewkd import ReviewKD
from distiller_zoo.simkd import SimKDDistiller
from distiller_zoo.tdd import TDD, TDDCRD
from helper.errors import UserError

DISTILLERS: dict[str, type[Distiller]] = {
    'ce': Vanilla,
    'kd': KD,
    # RepDistiller's feature methods
    'hint': FitNetDistiller,
    'attention': ATDistiller,
    'similarity': SPDistiller,
    'correlation': CCDistiller,
    'vid': VIDDistiller,
    'rkd': RKDDistiller,
    'pkt': PKTDistiller,
    'abound': ABDistiller,
    'factor': FTDistiller,
    'fsp': FSPDistiller,
    'nst': NSTDistiller,
    'kdsvd': KDSVDDistiller,
    # CRD, DKD, SimKD
    'crd': CRD,
    'dkd': DKD,
    'simkd': SimKDDistiller,
    # ReviewKD, OFD
    'reviewkd': ReviewKD,
    'ofd': OFD,
    # TDD
    'tdd': TDD,
    'tdd_crd': TDDCRD,
    # letKD, QUEST
    'letkd1': LetKD1,
    'letkd2': LetKD2,
    'quest': QUEST,
    # letKD ablation variants (supplementary Tables 5 and 6)
    'letkd_inter': LetKDInter,
    'fitnet_kdlayer': FitNetKDLayer,
    # logit methods (issue 20); --logit_stand switches logit standardization on for kd, dkd, mlkd and ctkd
    'dist': DIST,
    'ctkd': CTKD,
    'mlkd': MLKD,
}

# other accepted spellings -> canonical name
ALIASES: dict[str, str] = {'letkd': 'letkd2'}


def canonical_name(name: str) -> str:
    """Resolve aliases; raises UserError for an unknown method."""
    name = ALIASES.get(name, name)
    if name not in DISTILLERS:
        raise UserError(f"unknown --distill {name!r}; choose one of: {', '.join(sorted(DISTILLERS) + sorted(ALIASES))}")
    return name


def method_option_groups() -> list[OptionGroup]:
    """Every registered method's flag declarations, each once, in registry order."""
    groups: list[OptionGroup] = []
    for method in DISTILLERS.values():
        groups.extend(group for group in method.option_groups if group not in groups)
    return groups


def add_method_arguments(parser: ArgumentParser) -> None:
    """Add the flags of every registered method to ``parser`` (train_student.py's parser)."""
    for group in method_option_groups():
        group(parser)


def build_distiller(name: str, student: nn.Module, teacher: nn.Module | None, opt: Namespace,
                    info: DataInfo) -> Distiller:
    """Instantiate the Distiller registered under ``name`` for data described by ``info``."""
    return DISTILLERS[canonical_name(name)](student, teacher, opt, info)
