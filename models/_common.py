"""Small pieces shared by the model files (private; the public API lives in each model file).

Residual blocks in this package return a single tensor when called, so forward hooks and
``nn.Sequential`` always see plain tensors. Blocks that can end a stage also offer
``forward_with_preact(x) -> (out, preact)``, where ``preact`` is the value just before the final
ReLU. ``run_stages`` uses it for the ``preact=True`` feature flavour (RepDistiller's ``is_last``
tuples, without the tuples leaking out of the blocks).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def run_stages(stages: Sequence[nn.Sequential], x: Tensor, preact: bool) -> tuple[Tensor, list[Tensor]]:
    """Run ``stages`` one after the other on ``x`` (B, C, H, W).

    Returns the last stage's output and one feature map per stage: the stage output, or with
    ``preact`` the pre-ReLU value of the stage's last block. The running tensor is always the
    post-ReLU output, so ``preact`` changes only the returned features, never the logits.
    """
    feats = []
    for stage in stages:
        if preact:
            for block in stage[:-1]:
                x = block(x)
            x, pre = stage[-1].forward_with_preact(x)
            feats.append(pre)
        else:
            x = stage(x)
            feats.append(x)
    return x, feats


class ShuffleBlock(nn.Module):
    """Channel shuffle (ShuffleNet): (B, C, H, W) -> (B, C, H, W) with the channels read as a
    (groups, C // groups) grid and transposed. No parameters."""

    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        g = self.groups
        return x.view(b, g, c // g, h, w).transpose(1, 2).reshape(b, c, h, w)


def flatten_pool(x: Tensor) -> Tensor:
    """Global average pooling at any input size: (B, C, H, W) -> (B, C)."""
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def init_conv_bn_linear(model: nn.Module) -> None:
    """RepDistiller's VGG/MobileNetV2 initialisation: conv N(0, sqrt(2 / (k*k*out))) with zero bias,
    BN weight 1 / bias 0, Linear N(0, 0.01) with zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
