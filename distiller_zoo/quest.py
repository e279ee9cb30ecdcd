"""QUEST (Jain, Gidaris, Komodakis, Perez & Cord, ECCV 2020): Quantized Embedding Space for Transferring knowledge.

The teacher's penultimate map is quantized by the offline k-means codebook that letKD also uses
(helper/letkd_offline.py); its per-position soft assignment ``softmax(-tau * ||t - rho_k||^2)``
(``--quest_tau``, default 5 as in the QuEST configs) is the target of a cosine 1x1 "word predictor"
on the student's penultimate map. Unlike letKD there is no value layer: the student's features are
not modified and the predictor is dropped at test time (the deployed student is the plain model).
Loss: ``-r`` CE + ``-b`` KL (both 1 by default), the KL averaged over all B*H*W positions.
"""
from __future__ import annotations

from argparse import ArgumentParser, Namespace
from typing import Any

import torch.nn as nn
from torch import Tensor

from dataset import DataInfo
from distiller_zoo.letkd import PREDICTOR_SCALE, CosineConv1x1, QuantizedKD
from helper.letkd_offline import add_quantizer_arguments, kd_sites, pair_shapes
from models import SiteRecorder


def add_quest_arguments(parser: ArgumentParser) -> None:
    """QUEST's flag."""
    g = parser.add_argument_group('QUEST')
    g.add_argument('--quest_tau', type=float, default=5.0, help="QUEST: the codebook targets' tau, QuEST's default")


class QUEST(QuantizedKD):
    """``--distill quest``: CE + KL(codebook assignment of the teacher || softmax(predictor(student map)))."""

    name = 'quest'
    roles = ('penult',)
    tau_flag = 'quest_tau'
    option_groups = (add_quantizer_arguments, add_quest_arguments)

    def __init__(self, student: nn.Module, teacher: nn.Module, opt: Namespace,
                 info: DataInfo) -> None:
        shapes_s, shapes_t = pair_shapes(student, teacher, opt.model_s, opt.model_t, self.roles, info.image_size,
                                         opt.dataset)
        super().__init__(student, teacher, opt, info, shapes_s, shapes_t)
        self.student_recorder = SiteRecorder(student, kd_sites(opt.model_s, self.roles, opt.dataset))
        self.predictor = CosineConv1x1(shapes_s['penult'][0], opt.k_penult, scale=PREDICTOR_SCALE)

    def forward_train(self, image: Tensor, target: Tensor, **extras: Any) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(image)
        scores = {'penult': self.predictor(self.student_recorder.take()['penult'])}
        return logits, self.kd_losses(logits, scores, image, target)
