"""ImageNet-style ResNets adapted to CIFAR (3x3 stem, stride 1, no max-pool), RepDistiller layout.

Registered: ResNet50. Also defined (not registered): ResNet18, ResNet34, ResNet101, ResNet152.
Unlike models/resnet.py, the shortcut is called ``shortcut`` and the classifier ``linear``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from models._common import run_stages

__all__ = ['ResNet', 'BasicBlock', 'Bottleneck', 'ResNet18', 'ResNet34', 'ResNet50', 'ResNet101',
           'ResNet152']


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Identity (empty Sequential) when shapes agree, else 1x1 conv with the stride + BN."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN plus ``shortcut``: (B, in_planes, H, W) -> (B, planes, H/stride, W/stride)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (output, residual sum before the final ReLU)."""
        out = torch.relu(self.bn1(self.conv1(x)))
        preact = self.bn2(self.conv2(out)) + self.shortcut(x)
        return torch.relu(preact), preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


class Bottleneck(nn.Module):
    """1x1, 3x3 (stride), 1x1 (x4) convs with BN plus ``shortcut``:
    (B, in_planes, H, W) -> (B, 4 * planes, H/stride, W/stride)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.shortcut = _shortcut(in_planes, self.expansion * planes, stride)

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (output, residual sum before the final ReLU)."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        preact = self.bn3(self.conv3(out)) + self.shortcut(x)
        return torch.relu(preact), preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


class ResNet(nn.Module):
    """Stem conv1-bn1-ReLU (64 channels, stride 1), ``layer1..layer4`` (planes 64/128/256/512,
    strides 1/2/2/2), adaptive average pooling, ``linear``. Input (B, 3, H, W), any H, W."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], num_blocks: list[int],
                 num_classes: int = 10, zero_init_residual: bool = False) -> None:
        super().__init__()
        self.block = block
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            # Start every residual branch at zero, so each block begins as an identity.
            for bn in self._last_bns(all_blocks=True):
                nn.init.constant_(bn.weight, 0)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, num_blocks: int,
                    stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def _last_bns(self, all_blocks: bool) -> list[nn.BatchNorm2d]:
        name = 'bn3' if self.block is Bottleneck else 'bn2'
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        blocks = [b for s in stages for b in s] if all_blocks else [s[-1] for s in stages]
        return [getattr(b, name) for b in blocks]

    def get_feat_modules(self) -> nn.ModuleList:
        """The modules that produce the features (everything but the classifier)."""
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3, self.layer4])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The last BN (bn3, or bn2 for BasicBlock) of each stage's last block."""
        return self._last_bns(all_blocks=False)

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False
                ) -> Tensor | tuple[list[Tensor], Tensor]:
        """(B, 3, H, W) -> logits (B, classes), or with ``is_feat`` ([f0, ..., f5], logits).

        f0 = stem output (B, 64, H, W); f1..f4 = stage outputs at H, H/2, H/4, H/8 (post-ReLU, or
        with ``preact`` the last block's residual sum); f5 = pooled f4, (B, 512 * expansion).
        RepDistiller returns a two-element list instead of a tuple when ``preact``; this always
        returns a tuple (it unpacks the same way).
        """
        x = torch.relu(self.bn1(self.conv1(x)))
        f0 = x
        x, stage_feats = run_stages((self.layer1, self.layer2, self.layer3, self.layer4), x, preact)
        x = torch.flatten(self.avgpool(x), 1)
        f5 = x
        logits = self.linear(x)
        if is_feat:
            return [f0, *stage_feats, f5], logits
        return logits


def ResNet18(**kwargs: Any) -> ResNet:
    """ResNet-18: BasicBlock, [2, 2, 2, 2] (not registered)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


def ResNet34(**kwargs: Any) -> ResNet:
    """ResNet-34: BasicBlock, [3, 4, 6, 3] (not registered)."""
    return ResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


def ResNet50(**kwargs: Any) -> ResNet:
    """ResNet-50: Bottleneck, [3, 4, 6, 3]; 2048-d pooled feature."""
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


def ResNet101(**kwargs: Any) -> ResNet:
    """ResNet-101: Bottleneck, [3, 4, 23, 3] (not registered)."""
    return ResNet(Bottleneck, [3, 4, 23, 3], **kwargs)


def ResNet152(**kwargs: Any) -> ResNet:
    """ResNet-152: Bottleneck, [3, 8, 36, 3] (not registered)."""
    return ResNet(Bottleneck, [3, 8, 36, 3], **kwargs)
