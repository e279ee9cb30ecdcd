"""MobileNetV2 for CIFAR (Sandler et al. 2018) in RepDistiller's layout.

Registered: 'MobileNetV2' -> ``mobile_half`` (expansion 6, width 0.5). The stem has stride 2, so
on 32x32 input the feature maps are 16, 8, 4 and 2 pixels wide.
"""
from __future__ import annotations


import torch
import torch.nn as nn
from torch import Tensor

from models._common import init_conv_bn_linear

__all__ = ['MobileNetV2', 'InvertedResidual', 'mobilenetv2_T_w', 'mobile_half']


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    """3x3 conv (no bias) + BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


def conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    """1x1 conv (no bias) + BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1, x expand_ratio) - depthwise 3x3 (stride) - project (1x1, linear BN), in ``conv``
    indices 0..7; residual add when stride == 1 and inp == oup.

    (B, inp, H, W) -> (B, oup, H/stride, W/stride). The expansion conv exists even for ratio 1.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f'stride must be 1 or 2, got {stride}')
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),                              # 0 expand
            nn.BatchNorm2d(hidden),                                                     # 1
            nn.ReLU(inplace=True),                                                      # 2
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),        # 3 depthwise
            nn.BatchNorm2d(hidden),                                                     # 4
            nn.ReLU(inplace=True),                                                      # 5
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),                               # 6 project
            nn.BatchNorm2d(oup),                                                        # 7 (no ReLU)
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """Stem ``conv1`` (stride 2), seven stages in ``blocks``, ``conv2`` (1x1 -> 1280), global average
    pooling and ``classifier`` (a one-element Sequential, key ``classifier.0``).

    ``T`` is the expansion ratio of stages 2..7 (stage 1 uses 1); ``feature_dim`` is the number of
    classes. ``input_size`` is accepted for RepDistiller compatibility and unused (the pooling adapts
    to the input). ``remove_avg`` skips the pooling (then the classifier only fits inputs whose
    final map is 1x1, i.e. 16x16 images).
    """

    feature_stages = (1, 2, 4, 6)  # the blocks whose outputs are f1..f4

    def __init__(self, T: int, feature_dim: int, input_size: int = 32, width_mult: float = 1.0,
                 remove_avg: bool = False) -> None:
        super().__init__()
        self.remove_avg = remove_avg
        # (expansion t, base channels c, repeats n, first stride s); stage 2 keeps stride 1 for CIFAR.
        self.stage_settings = [
            [1, 16, 1, 1],
            [T, 24, 2, 1],
            [T, 32, 3, 2],
            [T, 64, 4, 2],
            [T, 96, 3, 1],
            [T, 160, 3, 2],
            [T, 320, 1, 1],
        ]
        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn(3, input_channel, 2)

        self.blocks = nn.ModuleList()
        for t, c, n, s in self.stage_settings:
            output_channel = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))

        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_1x1_bn(input_channel, self.last_channel)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # RepDistiller: AvgPool2d(2, ceil_mode=True) at 32x32
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, feature_dim))
        init_conv_bn_linear(self)

    def get_feat_modules(self) -> nn.ModuleList:
        """[conv1, blocks] (conv2 is not included, as in RepDistiller)."""
        return nn.ModuleList([self.conv1, self.blocks])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The projection BN (``conv[-1]``) of the last block of blocks[1], [2], [4], [6]."""
        return [self.blocks[i][-1].conv[-1] for i in self.feature_stages]

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False
                ) -> Tensor | tuple[list[Tensor], Tensor]:
        """(B, 3, H, W) -> logits (B, classes), or with ``is_feat`` ([f0, ..., f5], logits).

        f0 = conv1 output (B, 16, H/2, W/2); f1, f2, f3, f4 = outputs of blocks[1], [2], [4], [6]
        (12, 16, 48, 160 channels at H/2, H/4, H/8, H/16 for width 0.5); f5 = pooled conv2
        output (B, 1280). ``preact`` is ignored (the block outputs end in a linear BN anyway).
        """
        out = self.conv1(x)
        feats = [out]
        for i, stage in enumerate(self.blocks):
            out = stage(out)
            if i in self.feature_stages:
                feats.append(out)
        out = self.conv2(out)
        if not self.remove_avg:
            out = self.avgpool(out)
        out = torch.flatten(out, 1)
        feats.append(out)
        logits = self.classifier(out)
        if is_feat:
            return feats, logits
        return logits


def mobilenetv2_T_w(T: int, W: float, feature_dim: int = 100) -> MobileNetV2:
    """MobileNetV2 with expansion ``T`` and width multiplier ``W``."""
    return MobileNetV2(T=T, feature_dim=feature_dim, width_mult=W)


def mobile_half(num_classes: int = 100) -> MobileNetV2:
    """MobileNetV2 with expansion 6 and width 0.5 (RepDistiller's 'MobileNetV2')."""
    return mobilenetv2_T_w(6, 0.5, num_classes)
