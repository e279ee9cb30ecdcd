"""ShuffleNet V1 for CIFAR (Zhang et al. 2018) in RepDistiller's layout.

Registered: 'ShuffleV1' (groups 3, stage widths 240/480/960, blocks 4/8/4). The stem is a 1x1
conv without stride or max-pool, so the stem map keeps the input size.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from models._common import ShuffleBlock, flatten_pool, run_stages

__all__ = ['ShuffleNet', 'Bottleneck', 'ShuffleV1']


class Bottleneck(nn.Module):
    """ShuffleNet unit: grouped 1x1 (to out/4) - shuffle - depthwise 3x3 (stride) - grouped 1x1.

    stride 1: out = relu(branch(x) + x), (B, C, H, W) -> (B, C, H, W) with out_planes == C.
    stride 2: out = relu(cat[branch(x), avgpool3x3/2(x)]), so the output has out_planes + in_planes
    channels at half the size. The first unit of the network (in_planes 24) uses an ungrouped 1x1.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1,
                               groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (output, concat/sum before the final ReLU)."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return torch.relu(preact), preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


class ShuffleNet(nn.Module):
    """Stem (1x1 conv 3->24, ``bn1``, ReLU), ``layer1..layer3`` (each starts with a stride-2 unit),
    global average pooling, ``linear``. ``cfg`` has 'out_planes', 'num_blocks' and 'groups'."""

    def __init__(self, cfg: dict, num_classes: int = 10) -> None:
        super().__init__()
        out_planes = cfg['out_planes']
        num_blocks = cfg['num_blocks']
        groups = cfg['groups']

        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        # The first unit concatenates its input, so its branch only adds out_planes - in_planes.
        layers = [Bottleneck(self.in_planes, out_planes - self.in_planes, stride=2, groups=groups)]
        layers += [Bottleneck(out_planes, out_planes, stride=1, groups=groups) for _ in range(1, num_blocks)]
        self.in_planes = out_planes
        return nn.Sequential(*layers)

    def get_feat_modules(self) -> nn.ModuleList:
        """[conv1, bn1, layer1, layer2, layer3]."""
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """Not available for ShuffleNet (as in RepDistiller)."""
        raise NotImplementedError('get_bn_before_relu is not defined for ShuffleNet V1')

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False
                ) -> Tensor | tuple[list[Tensor], Tensor]:
        """(B, 3, H, W) -> logits (B, classes), or with ``is_feat`` ([f0, f1, f2, f3, f4], logits).

        f0 = stem output (B, 24, H, W); f1..f3 = stage outputs (240, 480, 960 channels at H/2, H/4,
        H/8; post-ReLU, or with ``preact`` the last unit's value before the ReLU); f4 = pooled f3.
        """
        x = torch.relu(self.bn1(self.conv1(x)))
        f0 = x
        x, stage_feats = run_stages((self.layer1, self.layer2, self.layer3), x, preact)
        x = flatten_pool(x)  # RepDistiller: avg_pool2d(4) on 32x32 input
        logits = self.linear(x)
        if is_feat:
            return [f0, *stage_feats, x], logits
        return logits


def ShuffleV1(**kwargs: Any) -> ShuffleNet:
    """ShuffleNet V1, groups 3, widths 240/480/960, blocks 4/8/4."""
    cfg = {'out_planes': [240, 480, 960], 'num_blocks': [4, 8, 4], 'groups': 3}
    return ShuffleNet(cfg, **kwargs)
