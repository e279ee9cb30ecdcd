"""Distillation criteria (RepDistiller's class names) and the Distiller registry."""
from distiller_zoo.KD import DistillKL
from distiller_zoo.base import Distiller
from distiller_zoo.registry import ALIASES, DISTILLERS, build_distiller, canonical_name
from distiller_zoo.deploy import build_deployable, load_deployed, register_deployable

__all__ = ['DistillKL', 'Distiller', 'DISTILLERS', 'ALIASES', 'build_distiller', 'canonical_name',
           'build_deployable', 'load_deployed', 'register_deployable']
