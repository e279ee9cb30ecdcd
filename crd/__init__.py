"""CRD (contrastive representation distillation): ``CRDLoss``, ``ContrastMemory``, ``ContrastLoss``, ``Embed``."""
from crd.criterion import ContrastLoss, CRDLoss
from crd.memory import ContrastMemory
from models.util import Embed

__all__ = ['CRDLoss', 'ContrastLoss', 'ContrastMemory', 'Embed']
