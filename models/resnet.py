"""CIFAR ResNets (He et al. 2016, the 6n+2 family) in RepDistiller's layout.

Registered: resnet8, resnet14, resnet20, resnet32, resnet44, resnet56, resnet110 (widths
16/16/32/64) and resnet8x4, resnet32x4 (widths 32/64/128/256). Three stages at strides 1/2/2,
global average pooling, then ``fc``. State-dict keys match RepDistiller's checkpoints.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from models._common import run_stages

__all__ = ['ResNet', 'BasicBlock', 'Bottleneck', 'resnet8', 'resnet14', 'resnet20', 'resnet32',
           'resnet44', 'resnet56', 'resnet110', 'resnet8x4', 'resnet32x4']


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; out = relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x)).

    (B, inplanes, H, W) -> (B, planes, H / stride, W / stride).
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (output, residual sum before the final ReLU)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        preact = self.bn2(self.conv2(out)) + identity
        return torch.relu(preact), preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride), 1x1 expand (x4), each with BN, plus the shortcut.

    (B, inplanes, H, W) -> (B, 4 * planes, H / stride, W / stride). Not used by a registered model.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (output, residual sum before the final ReLU)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        preact = self.bn3(self.conv3(out)) + identity
        return torch.relu(preact), preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


class ResNet(nn.Module):
    """CIFAR ResNet: conv1-bn1-relu stem, stages ``layer1..layer3`` (strides 1, 2, 2), pooling, ``fc``.

    ``depth`` is 6n+2 for BasicBlock (9n+2 for Bottleneck); ``num_filters`` = [stem, stage1, stage2,
    stage3] widths. Input (B, 3, H, W), any H, W (32 for CIFAR, 64 for Tiny-ImageNet).
    """

    def __init__(self, depth: int, num_filters: list[int], block_name: str = 'basicblock',
                 num_classes: int = 10) -> None:
        super().__init__()
        if block_name.lower() == 'basicblock':
            if (depth - 2) % 6 != 0:
                raise ValueError(f'BasicBlock ResNet depth must be 6n+2, got {depth}')
            n, block = (depth - 2) // 6, BasicBlock
        elif block_name.lower() == 'bottleneck':
            if (depth - 2) % 9 != 0:
                raise ValueError(f'Bottleneck ResNet depth must be 9n+2, got {depth}')
            n, block = (depth - 2) // 9, Bottleneck
        else:
            raise ValueError(f"block_name must be 'basicblock' or 'bottleneck', got {block_name!r}")
        self.block = block

        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, num_filters[1], n)
        self.layer2 = self._make_layer(block, num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(block, num_filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # RepDistiller: AvgPool2d(8), the same on 32x32 input
        self.fc = nn.Linear(num_filters[3] * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def get_feat_modules(self) -> nn.ModuleList:
        """The modules that produce the features (everything but the classifier)."""
        return nn.ModuleList([self.conv1, self.bn1, self.relu, self.layer1, self.layer2, self.layer3])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The BN before the final ReLU of each stage's last block (bn2, or bn3 for Bottleneck)."""
        stages = (self.layer1, self.layer2, self.layer3)
        if self.block is Bottleneck:
            return [stage[-1].bn3 for stage in stages]
        return [stage[-1].bn2 for stage in stages]

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False
                ) -> Tensor | tuple[list[Tensor], Tensor]:
        """(B, 3, H, W) -> logits (B, classes), or with ``is_feat`` ([f0, f1, f2, f3, f4], logits).

        f0 = stem output (B, c0, H, W); f1..f3 = stage outputs at H, H/2, H/4 (post-ReLU, or with
        ``preact`` the last block's residual sum before the ReLU); f4 = pooled f3, (B, c3).
        """
        x = self.relu(self.bn1(self.conv1(x)))
        f0 = x
        x, stage_feats = run_stages((self.layer1, self.layer2, self.layer3), x, preact)
        x = torch.flatten(self.avgpool(x), 1)
        f4 = x
        logits = self.fc(x)
        if is_feat:
            return [f0, *stage_feats, f4], logits
        return logits


def resnet8(**kwargs: Any) -> ResNet:
    """ResNet-8 (1 block per stage, widths 16/16/32/64)."""
    return ResNet(8, [16, 16, 32, 64], 'basicblock', **kwargs)


def resnet14(**kwargs: Any) -> ResNet:
    """ResNet-14 (2 blocks per stage, widths 16/16/32/64)."""
    return ResNet(14, [16, 16, 32, 64], 'basicblock', **kwargs)


def resnet20(**kwargs: Any) -> ResNet:
    """ResNet-20 (3 blocks per stage, widths 16/16/32/64)."""
    return ResNet(20, [16, 16, 32, 64], 'basicblock', **kwargs)


def resnet32(**kwargs: Any) -> ResNet:
    """ResNet-32 (5 blocks per stage, widths 16/16/32/64)."""
    return ResNet(32, [16, 16, 32, 64], 'basicblock', **kwargs)


def resnet44(**kwargs: Any) -> ResNet:
    """ResNet-44 (7 blocks per stage, widths 16/16/32/64)."""
    return ResNet(44, [16, 16, 32, 64], 'basicblock', **kwargs)


def resnet56(**kwargs: Any) -> ResNet:
    """ResNet-56 (9 blocks per stage, widths 16/16/32/64)."""
    return ResNet(56, [16, 16, 32, 64], 'basicblock', **kwargs)


def resnet110(**kwargs: Any) -> ResNet:
    """ResNet-110 (18 blocks per stage, widths 16/16/32/64)."""
    return ResNet(110, [16, 16, 32, 64], 'basicblock', **kwargs)


def resnet8x4(**kwargs: Any) -> ResNet:
    """ResNet-8x4 (1 block per stage, widths 32/64/128/256; layer1.0 has a downsample)."""
    return ResNet(8, [32, 64, 128, 256], 'basicblock', **kwargs)


def resnet32x4(**kwargs: Any) -> ResNet:
    """ResNet-32x4 (5 blocks per stage, widths 32/64/128/256; layer1.0 has a downsample)."""
    return ResNet(32, [32, 64, 128, 256], 'basicblock', **kwargs)
