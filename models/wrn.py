"""Wide ResNets (Zagoruyko & Komodakis 2016, pre-activation blocks) in RepDistiller's layout.

Registered: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2 (WRN-depth-width). Note RepDistiller's feature
convention, kept here on purpose: the stage features are the *raw* residual sums (no BN, no ReLU)
and f0 is the raw conv1 output.
"""
from __future__ import annotations

from typing import Any

import math

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models._common import flatten_pool

__all__ = ['WideResNet', 'NetworkBlock', 'BasicBlock', 'wrn', 'wrn_16_1', 'wrn_16_2', 'wrn_40_1',
           'wrn_40_2']


class BasicBlock(nn.Module):
    """Pre-activation block: (B, in_planes, H, W) -> (B, out_planes, H/stride, W/stride).

    When in_planes == out_planes: out = x + conv2(relu2(bn2(conv1(relu1(bn1(x)))))).
    Otherwise x is first replaced by relu1(bn1(x)), which feeds both the conv path and the 1x1
    ``convShortcut``.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropRate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.droprate = dropRate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = None if self.equalInOut else nn.Conv2d(
            in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu1(self.bn1(x))  # in place on the fresh BN output; x stays intact
        shortcut = x if self.equalInOut else self.convShortcut(activated)
        out = self.relu2(self.bn2(self.conv1(activated)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    """A group of ``nb_layers`` blocks held in ``layer``; the first has the stride and the width change."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, block: type[BasicBlock],
                 stride: int, dropRate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, dropRate)
            for i in range(nb_layers)
        ])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """conv1 (16 ch, no BN/ReLU), ``block1..block3`` (16k, 32k, 64k ch; strides 1, 2, 2), then
    ``bn1``-ReLU, global average pooling and ``fc``. Input (B, 3, H, W), any H, W."""

    def __init__(self, depth: int, num_classes: int, widen_factor: int = 1, dropRate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f'WRN depth must be 6n+4, got {depth}')
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], BasicBlock, 1, dropRate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], BasicBlock, 2, dropRate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], BasicBlock, 2, dropRate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        self.nChannels = channels[3]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def get_feat_modules(self) -> nn.ModuleList:
        """The modules that produce the stage features: [conv1, block1, block2, block3]."""
        return nn.ModuleList([self.conv1, self.block1, self.block2, self.block3])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The BN that next reads each stage output: block2's and block3's first bn1, then ``bn1``."""
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False
                ) -> Tensor | tuple[list[Tensor], Tensor]:
        """(B, 3, H, W) -> logits (B, classes), or with ``is_feat`` ([f0, f1, f2, f3, f4], logits).

        f0 = conv1 output (B, 16, H, W); f1..f3 = raw residual sums of block1..3 at H, H/2, H/4
        (no BN/ReLU); f4 = pooled relu(bn1(f3)), (B, 64k). With ``preact``, f1..f3 are replaced by
        the next BN applied to them (block2.layer[0].bn1, block3.layer[0].bn1, bn1), pre-ReLU;
        these BN calls run in the model's current mode (in train mode they update running stats).
        """
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        pooled = flatten_pool(self.relu(self.bn1(f3)))  # RepDistiller: avg_pool2d(8) on 32x32 input
        logits = self.fc(pooled)
        if not is_feat:
            return logits
        if preact:
            f1 = self.block2.layer[0].bn1(f1)
            f2 = self.block3.layer[0].bn1(f2)
            f3 = self.bn1(f3)
        return [f0, f1, f2, f3, pooled], logits


def wrn(**kwargs: Any) -> WideResNet:
    """WideResNet with explicit ``depth``, ``num_classes``, ``widen_factor``."""
    return WideResNet(**kwargs)


def wrn_40_2(**kwargs: Any) -> WideResNet:
    """WRN-40-2 (6 blocks per group, widths 32/64/128)."""
    return WideResNet(depth=40, widen_factor=2, **kwargs)


def wrn_40_1(**kwargs: Any) -> WideResNet:
    """WRN-40-1 (6 blocks per group, widths 16/32/64)."""
    return WideResNet(depth=40, widen_factor=1, **kwargs)


def wrn_16_2(**kwargs: Any) -> WideResNet:
    """WRN-16-2 (2 blocks per group, widths 32/64/128)."""
    return WideResNet(depth=16, widen_factor=2, **kwargs)


def wrn_16_1(**kwargs: Any) -> WideResNet:
    """WRN-16-1 (2 blocks per group, widths 16/32/64)."""
    return WideResNet(depth=16, widen_factor=1, **kwargs)
