"""ReviewKD: Chen et al., "Distilling Knowledge via Knowledge Review" (CVPR 2021), with mdistiller's numbers.

The student's levels, deepest first (the pooled vector as a 1x1 map, then the stage maps feat[-2] ... feat[1]),
each go through an ABF (attention-based fusion): a 1x1 conv-BN to a common width, fused with the fused map of
the level below it in depth (upsampled by nearest neighbour) through two sigmoid attention maps, resized to the
teacher's map size and projected by a 3x3 conv-BN to the teacher's channels. The HCL (hierarchical context
loss) compares each result with the teacher's pre-ReLU map of the same level (``preact=True``; the pooled
vector for the deepest level) by MSE on the maps and on their 4x4, 2x2, 1x1 average-pooled versions (those
smaller than the map), weighted 1, 1/2, 1/4, 1/8 and normalised by the sum of the weights used.

Loss: ``-r`` CE + ``-b`` x min(epoch / ``--reviewkd_warmup``, 1) x sum of the HCL over the levels. The warm-up
factor is a buffer ``start_epoch`` fills (1-indexed epochs, as mdistiller). The ABFs keep the official
module names (``abfs.<i>.conv1/conv2/att_conv``, ``abfs.0`` the deepest level), so their state_dict keys are
mdistiller's. Channel counts and map sizes are read from the two models (``probe_features``); they equal the
official per-architecture lists (tests/test_review_ofd.py checks them pair by pair).
"""
from __future__ import annotations

from argparse import ArgumentParser, Namespace
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dataset import DataInfo
from distiller_zoo.base import Distiller, probe_features
from helper.errors import UserError
from helper.options import updated
from models.util import pool_to

# the ABFs' common width is min(MAX_MID_CHANNEL, channels of the student's deepest level) (official: 512)
MAX_MID_CHANNEL = 512
# HCL's pyramid: average-pooled sizes tried after the full map, each with half the previous weight
HCL_LEVELS = (4, 2, 1)

# Published -b (the official CIFAR-100/script/reviewKD.sh --kd-loss-weight; mdistiller configs/cifar100/reviewkd.yaml
# has 5.0 for resnet32x4 -> resnet8x4). The other pairs get mdistiller's default REVIEWKD_WEIGHT, 1.0.
REVIEWKD_WEIGHTS: dict[tuple[str, str], float] = {
    ('wrn_40_2', 'wrn_16_2'): 5.0,
    ('wrn_40_2', 'wrn_40_1'): 5.0,
    ('wrn_40_2', 'ShuffleV1'): 5.0,
    ('resnet32x4', 'resnet8x4'): 5.0,
    ('resnet32x4', 'ShuffleV1'): 5.0,
    ('resnet32x4', 'ShuffleV2'): 8.0,
    ('resnet56', 'resnet20'): 0.6,
    ('resnet110', 'resnet32'): 1.0,
}
DEFAULT_WEIGHT = 1.0


def hcl_loss(fstudent: Sequence[Tensor], fteacher: Sequence[Tensor]) -> Tensor:
    """Hierarchical context loss, summed over pairs of equally shaped (B, C, H, W) maps.

    Per pair: (MSE(s, t) + sum_k 2^-k MSE(pool_k(s), pool_k(t))) / (1 + sum_k 2^-k), k = 1, 2, ... over the
    sizes of HCL_LEVELS smaller than H (adaptive average pooling to l x l; mean-reduced MSE).
    """
    total = fstudent[0].new_zeros(())
    for fs, ft in zip(fstudent, fteacher):
        height = fs.shape[2]
        loss = F.mse_loss(fs, ft)
        weight, weights = 1.0, 1.0
        for size in HCL_LEVELS:
            if size >= height:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(pool_to(fs, (size, size)), pool_to(ft, (size, size)))
            weights += weight
        total = total + loss / weights
    return total


class ABF(nn.Module):
    """Attention-based fusion of one student level (official names: ``conv1``, ``conv2``, ``att_conv``).

    conv1: 1x1 conv in -> mid (no bias) + BN; att_conv (only when ``fuse``): 1x1 conv 2 mid -> 2 (with bias) +
    sigmoid; conv2: 3x3 conv mid -> out (pad 1, no bias) + BN. Both bias-free convs are initialised with
    kaiming_uniform_(a=1), as the official code.

    forward(x (B, in, h, w), residual (B, mid, h', w') or None, out_size) -> (output (B, out, *out_size),
    fused (B, mid, *out_size)): x' = conv1(x); with a residual (upsampled to (h, w), nearest) and attention maps
    a = att_conv([x', residual]): x' = a0 x' + a1 residual; x' is resized to ``out_size`` (nearest) when it
    differs, and the output is conv2(x'). ``fused`` is x', the next (shallower) level's residual.
    """

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channel))
        self.att_conv = nn.Sequential(nn.Conv2d(mid_channel * 2, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: Sequence[int]) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, size=tuple(x.shape[2:]), mode='nearest')
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, 0:1] + residual * attention[:, 1:2]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode='nearest')
        return self.conv2(x), x


def review_levels(feats: Sequence[Tensor]) -> list[Tensor]:
    """A feature list of ``forward(is_feat=True)`` -> ReviewKD's levels, shallow to deep: the stage maps
    feat[1:-1], then the pooled vector feat[-1] as a (B, C, 1, 1) map (feat[0], the stem, is not used)."""
    return [*feats[1:-1], feats[-1][:, :, None, None]]


def add_reviewkd_arguments(parser: ArgumentParser) -> None:
    """ReviewKD's flag (its weight is -b: per pair in docs/methods.md, "ReviewKD and OFD")."""
    g = parser.add_argument_group('ReviewKD')
    g.add_argument('--reviewkd_warmup', type=int, default=20,
                   help='epochs of linear warm-up of the ReviewKD loss, min(epoch / N, 1) (0: none)')


class ReviewKD(Distiller):
    """``--distill reviewkd``: -r CE + -b x warm-up x HCL(ABF review of the student's levels, teacher's pre-ReLU levels).

    The student's levels are post-ReLU (mdistiller's STU_PREACT False on CIFAR), the teacher's pre-ReLU.
    Student and teacher must have the same number of levels (every pair with a published setting does); the
    ABFs and their three convs are trainable, the teacher is frozen in eval mode.
    """

    name = 'reviewkd'
    default_weights = (1.0, 0.0, DEFAULT_WEIGHT)   # mdistiller: CE_WEIGHT 1, REVIEWKD_WEIGHT 1 (per pair: resolve_options)
    option_groups = (add_reviewkd_arguments,)

    @classmethod
    def resolve_options(cls, opt: Namespace) -> Namespace:
        """The warm-up check, then the published -b of the pair (CIFAR-100) where -b was not given."""
        if opt.reviewkd_warmup < 0:
            raise UserError(f"--reviewkd_warmup must be >= 0 epochs, got {opt.reviewkd_warmup}")
        if getattr(opt, 'beta', None) is None:
            published = REVIEWKD_WEIGHTS.get((opt.model_t, opt.model_s)) if opt.dataset == 'cifar100' else None
            opt = updated(opt, beta=DEFAULT_WEIGHT if published is None else published)
        return super().resolve_options(opt)

    def __init__(self, student: nn.Module, teacher: nn.Module | None, opt: Namespace, info: DataInfo) -> None:
        super().__init__(student, teacher, opt, info)
        levels_s = review_levels(probe_features(student, self.image_size))
        levels_t = review_levels(probe_features(teacher, self.image_size, preact=True))
        if len(levels_s) != len(levels_t):
            raise UserError(f"reviewkd needs as many feature levels in the student as in the teacher: {opt.model_s} has "
                            f"{len(levels_s)} ({len(levels_s) - 1} stages + the pooled vector), {opt.model_t} "
                            f"{len(levels_t)}")
        self.in_channels = [int(f.shape[1]) for f in levels_s]          # shallow to deep, as the official lists
        self.out_channels = [int(f.shape[1]) for f in levels_t]
        self.shapes = [tuple(f.shape[2:]) for f in levels_s][::-1]      # deep to shallow (official `shapes`)
        self.out_shapes = [tuple(f.shape[2:]) for f in levels_t][::-1]  # official `out_shapes`
        mid_channel = min(MAX_MID_CHANNEL, self.in_channels[-1])
        last = len(self.in_channels) - 1
        abfs = [ABF(c_in, mid_channel, c_out, idx < last)
                for idx, (c_in, c_out) in enumerate(zip(self.in_channels, self.out_channels))]
        self.abfs = nn.ModuleList(abfs[::-1])                            # abfs.0: the deepest level (no fusion)
        self.warmup = int(opt.reviewkd_warmup)
        # the epoch's warm-up factor as a tensor: a Python number would recompile a compiled step every epoch
        self.register_buffer('warmup_scale', torch.tensor(self.warmup_factor(1)), persistent=False)

    def warmup_factor(self, epoch: int) -> float:
        """min(epoch / warmup, 1) for 1-indexed epochs (1 without warm-up)."""
        return min(epoch / self.warmup, 1.0) if self.warmup > 0 else 1.0

    def start_epoch(self, epoch: int) -> None:
        self.warmup_scale.fill_(self.warmup_factor(epoch))

    def review(self, levels_s: Sequence[Tensor]) -> list[Tensor]:
        """The ABF outputs for the student's levels (shallow to deep in, shallow to deep out), computed from the
        deepest level up, each with the teacher's channels and map size."""
        deep_first = list(levels_s)[::-1]
        out, residual = self.abfs[0](deep_first[0], None, self.out_shapes[0])
        results = [out]
        for x, abf, out_size in zip(deep_first[1:], self.abfs[1:], self.out_shapes[1:]):
            out, residual = abf(x, residual, out_size)
            results.insert(0, out)
        return results

    def forward_train(self, image: Tensor, target: Tensor, **extras: Any) -> tuple[Tensor, dict[str, Tensor]]:
        feat_s, logit_s = self.student(image, is_feat=True)
        with torch.no_grad():
            feat_t, logit_t = self.teacher(image, is_feat=True, preact=True)
        losses = self.logit_losses(logit_s, logit_t, target)
        levels_t = [f.detach() for f in review_levels(feat_t)]
        losses[self.name] = self.beta * self.warmup_scale * hcl_loss(self.review(review_levels(feat_s)), levels_t)
        return logit_s, losses
