"""Distillation criteria (RepDistiller's class names) and the Distiller registry."""
from distiller_zoo.KD import DistillKL
from distiller_zoo.AB import ABLoss
from distiller_zoo.AT import Attention
from distiller_zoo.CC import Correlation
from distiller_zoo.FitNet import HintLoss
from distiller_zoo.FSP import FSP
from distiller_zoo.FT import FactorTransfer
from distiller_zoo.KDSVD import KDSVD
from distiller_zoo.NST import NSTLoss
from distiller_zoo.PKT import PKT
from distiller_zoo.RKD import RKDLoss
from distiller_zoo.SP import Similarity
from distiller_zoo.VID import VIDLoss
from distiller_zoo.base import Distiller
from distiller_zoo.registry import ALIASES, DISTILLERS, build_distiller, canonical_name
from distiller_zoo.deploy import build_deployable, load_deployed, register_deployable

__all__ = ['DistillKL', 'ABLoss', 'Attention', 'Correlation', 'HintLoss', 'FSP', 'FactorTransfer', 'KDSVD',
           'NSTLoss', 'PKT', 'RKDLoss', 'Similarity', 'VIDLoss',
           'Distiller', 'DISTILLERS', 'ALIASES', 'build_distiller', 'canonical_name',
           'build_deployable', 'load_deployed', 'register_deployable']
