"""Helper modules of the distillation methods, with RepDistiller's (and SimKD's) names and signatures.

State-dict keys match those projects so trained auxiliary modules move between the codebases.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch.nn.functional as F
from torch import nn
from torch import Tensor

from helper.errors import UserError


def pool_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Average-pool a (B, C, H, W) map to ``size`` = (h, w).

    When h divides H and w divides W this is ``avg_pool2d`` with kernel = stride = the ratio: the same
    values as adaptive pooling, and its backward has a deterministic CUDA kernel (adaptive pooling's
    has none, so ``--deterministic`` on CUDA would stop there). Non-integer ratios fall back to
    ``adaptive_avg_pool2d``, whose CUDA backward is not deterministic.
    """
    (h_in, w_in), (h, w) = x.shape[2:], size
    if h_in % h == 0 and w_in % w == 0:
        ratio = (h_in // h, w_in // w)
        return F.avg_pool2d(x, kernel_size=ratio, stride=ratio)
    return F.adaptive_avg_pool2d(x, (h, w))


def pool_to_smaller(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Spatially align two (B, C, H, W) maps by average-pooling the larger one to the smaller size.

    RepDistiller's rule for AT, NST, VID, FT, FSP and SimKD (square maps assumed there; here any H, W).
    Integer ratios (32 -> 16 -> 8, the usual case) use a deterministic ``avg_pool2d``; see ``pool_to``.
    """
    ha, hb = a.shape[2:], b.shape[2:]
    if ha == hb:
        return a, b
    if ha[0] > hb[0]:
        return pool_to(a, hb), b
    return a, pool_to(b, ha)


# ---- FitNet / AB / FT / CC / CRD helper modules (ConvReg, Connector, Paraphraser, Translator, Embed, LinearEmbed)

class Normalize(nn.Module):
    """Divide each row of a (B, D) tensor by its L_power norm (no epsilon, as RepDistiller)."""

    def __init__(self, power: int = 2) -> None:
        super().__init__()
        self.power = power

    def forward(self, x: Tensor) -> Tensor:
        norm = x.pow(self.power).sum(1, keepdim=True).pow(1.0 / self.power)
        return x.div(norm)


class Embed(nn.Module):
    """CRD embedding: flatten, Linear(dim_in, dim_out), L2-normalize. (B, ...) -> (B, dim_out)."""

    def __init__(self, dim_in: int = 1024, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.l2norm = Normalize(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2norm(self.linear(x.flatten(1)))


class LinearEmbed(nn.Module):
    """CC embedding: flatten, Linear(dim_in, dim_out) (no normalisation). (B, ...) -> (B, dim_out)."""

    def __init__(self, dim_in: int = 1024, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


class ConvReg(nn.Module):
    """FitNet regressor: a student map (N, Cs, Hs, Ws) -> the teacher's (N, Ct, Ht, Wt).

    conv: Hs == 2 Ht: 3x3 stride-2 conv; 2 Hs == Ht: 4x4 stride-2 transposed conv; Hs >= Ht: a
    (1+Hs-Ht, 1+Ws-Wt) conv (1x1 for equal sizes). Then bn (BatchNorm over Ct) and, with use_relu, relu.
    Any other size pair (a student map smaller than the teacher's, but not by exactly 2x) is a UserError.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], use_relu: bool = True) -> None:
        super().__init__()
        self.use_relu = use_relu
        _, s_c, s_h, s_w = s_shape
        _, t_c, t_h, t_w = t_shape
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise UserError(f"cannot regress a student map of size {s_h}x{s_w} onto a teacher map of size "
                            f"{t_h}x{t_w} (the student map must be 2x, equal to or larger than, or half the teacher's)")
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return self.relu(x) if self.use_relu else x


class Connector(nn.Module):
    """AB's per-layer connectors: identity where channels and height already match, else ConvReg without ReLU.

    forward(g_s): list of student maps -> list of maps shaped like the teacher's (zip-truncated).
    """

    def __init__(self, s_shapes: Sequence[Sequence[int]], t_shapes: Sequence[Sequence[int]]) -> None:
        super().__init__()
        self.connectors = nn.ModuleList(
            nn.Sequential() if s[1] == t[1] and s[2] == t[2] else ConvReg(s, t, use_relu=False)
            for s, t in zip(s_shapes, t_shapes))

    def forward(self, g_s: Sequence[Tensor]) -> list[Tensor]:
        return [connector(f) for connector, f in zip(self.connectors, g_s)]


class ConnectorV2(nn.Module):
    """OFD's per-stage connectors (RepDistiller's name and keys): ``connectors.<i>`` = [1x1 conv Cs -> Ct (no bias,
    stride 1), BN(Ct)], conv weights N(0, sqrt(2 / Ct)), BN weight 1 and bias 0.

    forward(g_s): list of student maps -> list of maps with the teacher's channel counts (same spatial size).
    """

    def __init__(self, s_shapes: Sequence[Sequence[int]], t_shapes: Sequence[Sequence[int]]) -> None:
        super().__init__()
        if len(s_shapes) != len(t_shapes):
            raise ValueError(f"ConnectorV2 needs as many student as teacher maps, got {len(s_shapes)} and {len(t_shapes)}")
        self.connectors = nn.ModuleList(self._connector(s[1], t[1]) for s, t in zip(s_shapes, t_shapes))

    @staticmethod
    def _connector(s_channels: int, t_channels: int) -> nn.Sequential:
        conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, stride=1, padding=0, bias=False)
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / t_channels))     # fan-out of a 1x1 kernel = Ct
        bn = nn.BatchNorm2d(t_channels)
        nn.init.ones_(bn.weight)
        nn.init.zeros_(bn.bias)
        return nn.Sequential(conv, bn)

    def forward(self, g_s: Sequence[Tensor]) -> list[Tensor]:
        return [connector(f) for connector, f in zip(self.connectors, g_s)]


def _conv_block(c_in: int, c_out: int, use_bn: bool, transposed: bool = False) -> list[nn.Module]:
    """[3x3 conv (stride 1, pad 1, bias), BN or an empty Sequential, LeakyReLU(0.1)]: FT's building block."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    return [conv(c_in, c_out, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(c_out) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True)]


class Paraphraser(nn.Module):
    """FT's paraphraser, an auto-encoder of the teacher's map (N, C, H, W) with a factor of C' = int(C * k) channels.

    encoder: conv C->C, C->C', C'->C'; decoder: transposed conv C'->C', C'->C, C->C (3x3, each followed by a BN
    slot and LeakyReLU(0.1); the BN slots are empty when use_bn is False, so the convs sit at indices 0, 3, 6).
    forward(f_s, is_factor=False) -> (factor, reconstruction), or only the factor when is_factor.
    """

    def __init__(self, t_shape: Sequence[int], k: float = 0.5, use_bn: bool = False) -> None:
        super().__init__()
        c = t_shape[1]
        c_factor = int(c * k)
        self.encoder = nn.Sequential(*_conv_block(c, c, use_bn), *_conv_block(c, c_factor, use_bn),
                                     *_conv_block(c_factor, c_factor, use_bn))
        self.decoder = nn.Sequential(*_conv_block(c_factor, c_factor, use_bn, transposed=True),
                                     *_conv_block(c_factor, c, use_bn, transposed=True),
                                     *_conv_block(c, c, use_bn, transposed=True))

    def forward(self, f_s: Tensor, is_factor: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        factor = self.encoder(f_s)
        if is_factor:
            return factor
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """FT's translator: the student's map (N, Cs, H, W) -> a factor of int(Ct * k) channels.

    encoder: 3x3 convs Cs->Cs, Cs->C', C'->C', each followed by BN (when use_bn) and LeakyReLU(0.1).
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], k: float = 0.5, use_bn: bool = True) -> None:
        super().__init__()
        c_s, c_factor = s_shape[1], int(t_shape[1] * k)
        self.encoder = nn.Sequential(*_conv_block(c_s, c_s, use_bn), *_conv_block(c_s, c_factor, use_bn),
                                     *_conv_block(c_factor, c_factor, use_bn))

    def forward(self, f_s: Tensor) -> Tensor:
        return self.encoder(f_s)


# ---- SimKD projector

class SimKD(nn.Module):
    """SimKD's projector: the student's last feature map -> the teacher's channel count, for the teacher's classifier.

    ``transfer``: 1x1 conv s_n -> t_n/f, BN, ReLU, 3x3 conv t_n/f -> t_n/f, BN, ReLU, 1x1 conv t_n/f -> t_n,
    BN, ReLU (convs without bias; SimKD's Sequential indices 0..8). ``avg_pool`` pools to 1x1.
    forward(feat_s (B, s_n, Hs, Ws), feat_t (B, t_n, Ht, Wt), cls_t) -> (trans_feat_s, trans_feat_t,
    pred_feat_s): the larger map is pooled to the smaller size first; pred = cls_t(pooled trans_feat_s).
    """

    def __init__(self, *, s_n: int, t_n: int, factor: int = 2) -> None:
        super().__init__()
        mid = t_n // factor
        self.transfer = nn.Sequential(
            nn.Conv2d(s_n, mid, kernel_size=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, t_n, kernel_size=1, bias=False), nn.BatchNorm2d(t_n), nn.ReLU(inplace=True),
        )
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))

    def classify(self, trans_feat_s: Tensor, cls_t: nn.Module) -> Tensor:
        """(B, t_n, H, W) projected map -> (B, classes) through the teacher's classifier."""
        return cls_t(self.avg_pool(trans_feat_s).flatten(1))

    def forward(self, feat_s: Tensor, feat_t: Tensor, cls_t: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        source, target = pool_to_smaller(feat_s, feat_t)
        trans_feat_s = self.transfer(source)
        return trans_feat_s, target, self.classify(trans_feat_s, cls_t)
