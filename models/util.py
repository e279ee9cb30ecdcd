"""Helper modules of the distillation methods, with RepDistiller's (and SimKD's) names and signatures.

State-dict keys match those projects so trained auxiliary modules move between the codebases.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pool_to_smaller(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Spatially align two (B, C, H, W) maps by adaptive-average-pooling the larger one to the smaller size.

    RepDistiller's rule for AT, NST, VID, FT, FSP and SimKD (square maps assumed there; here any H, W).
    """
    ha, hb = a.shape[2:], b.shape[2:]
    if ha == hb:
        return a, b
    if ha[0] > hb[0]:
        return F.adaptive_avg_pool2d(a, hb), b
    return a, F.adaptive_avg_pool2d(b, ha)


# ---- FitNet / AB / FT / CC / CRD helper modules (ConvReg, Connector, Paraphraser, Translator, Embed, LinearEmbed)

# ---- SimKD projector
