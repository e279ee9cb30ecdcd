"""ResNet-18/34/50 for 224x224 ImageNet (7x7 stride-2 stem + max-pool), Table 2 of the letKD paper.

Module names, state_dict keys and tensor shapes are those of ``torchvision.models.resnet18/34/50``
(``conv1``, ``bn1``, ``layer1..layer4`` of BasicBlock / Bottleneck with ``conv1 bn1 conv2 bn2
[conv3 bn3] [downsample.0 downsample.1]``, ``fc``), so torchvision's ImageNet weight files load with
``strict=True``. The Bottleneck strides in its 3x3 conv (the "v1.5" variant torchvision ships).
Initialisation as torchvision's with ``zero_init_residual=False``: convs kaiming-normal (fan_out,
ReLU gain), BN weight 1 / bias 0, ``fc`` PyTorch's default Linear init.

``forward(x, is_feat=False, preact=False)`` follows the zoo's convention (see models/__init__.py):
with ``is_feat`` it returns ``([f0, f1, f2, f3, f4, f5], logits)`` where f0 is the stem
``relu(bn1(conv1(x)))`` before the max-pool (64 ch, stride 2), f1..f4 the outputs of
``layer1..layer4`` (strides 4, 8, 16, 32) and f5 the pooled vector that feeds ``fc``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from models._common import run_stages

__all__ = ['ImageNetResNet', 'ImageNetBasicBlock', 'ImageNetBottleneck', 'imagenet_resnet18',
           'imagenet_resnet34', 'imagenet_resnet50']


def _downsample(in_planes: int, out_planes: int, stride: int) -> nn.Sequential | None:
    """None when the block keeps shape, else 1x1 conv (with the stride) + BN (keys downsample.0/1)."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class ImageNetBasicBlock(nn.Module):
    """3x3 conv (stride) - BN - ReLU - 3x3 conv - BN, plus the shortcut, then ReLU:
    (B, in_planes, H, W) -> (B, planes, H/stride, W/stride)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_planes, planes, stride)

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (output, residual sum before the final ReLU)."""
        out = torch.relu(self.bn1(self.conv1(x)))
        identity = x if self.downsample is None else self.downsample(x)
        preact = self.bn2(self.conv2(out)) + identity
        return torch.relu(preact), preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


class ImageNetBottleneck(nn.Module):
    """1x1 conv - BN - ReLU - 3x3 conv (stride) - BN - ReLU - 1x1 conv (x4) - BN, plus the shortcut,
    then ReLU: (B, in_planes, H, W) -> (B, 4 * planes, H/stride, W/stride)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.downsample = _downsample(in_planes, out_planes, stride)

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (output, residual sum before the final ReLU)."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        identity = x if self.downsample is None else self.downsample(x)
        preact = self.bn3(self.conv3(out)) + identity
        return torch.relu(preact), preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


_Block = type[ImageNetBasicBlock] | type[ImageNetBottleneck]


class ImageNetResNet(nn.Module):
    """Stem: 7x7/2 ``conv1`` (64 ch) - ``bn1`` - ReLU - 3x3/2 max-pool; ``layer1..layer4`` (planes
    64/128/256/512, strides 1/2/2/2); adaptive average pooling; ``fc``. Input (B, 3, H, W), any H, W
    (224 for ImageNet; the last map is H/32)."""

    def __init__(self, block: _Block, num_blocks: list[int], num_classes: int = 1000) -> None:
        super().__init__()
        self.block = block
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: _Block, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (num_blocks - 1):
            blocks.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*blocks)

    def _stages(self) -> tuple[nn.Sequential, ...]:
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def get_feat_modules(self) -> nn.ModuleList:
        """The modules that produce the features (everything but the classifier)."""
        return nn.ModuleList([self.conv1, self.bn1, self.maxpool, *self._stages()])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The last BN (bn3, or bn2 for BasicBlock) of each stage's last block."""
        name = 'bn3' if self.block is ImageNetBottleneck else 'bn2'
        return [getattr(stage[-1], name) for stage in self._stages()]

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False
                ) -> Tensor | tuple[list[Tensor], Tensor]:
        """(B, 3, H, W) -> logits (B, classes), or with ``is_feat`` ([f0, ..., f5], logits).

        f0 = relu(bn1(conv1(x))) before the max-pool, (B, 64, H/2, W/2); f1..f4 = stage outputs at
        H/4, H/8, H/16, H/32 with 64/128/256/512 x expansion channels (post-ReLU, or with ``preact``
        the last block's residual sum before its ReLU; the logits are the same either way);
        f5 = pooled f4 (post-ReLU), (B, 512 x expansion).
        """
        x = torch.relu(self.bn1(self.conv1(x)))
        f0 = x
        x, stage_feats = run_stages(self._stages(), self.maxpool(x), preact)
        x = torch.flatten(self.avgpool(x), 1)
        logits = self.fc(x)
        if is_feat:
            return [f0, *stage_feats, x], logits
        return logits


def imagenet_resnet18(num_classes: int = 1000, **kwargs: Any) -> ImageNetResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]); 11,689,512 parameters at 1000 classes."""
    return ImageNetResNet(ImageNetBasicBlock, [2, 2, 2, 2], num_classes=num_classes, **kwargs)


def imagenet_resnet34(num_classes: int = 1000, **kwargs: Any) -> ImageNetResNet:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3]); 21,797,672 parameters at 1000 classes."""
    return ImageNetResNet(ImageNetBasicBlock, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


def imagenet_resnet50(num_classes: int = 1000, **kwargs: Any) -> ImageNetResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]); 25,557,032 parameters at 1000 classes."""
    return ImageNetResNet(ImageNetBottleneck, [3, 4, 6, 3], num_classes=num_classes, **kwargs)
