"""ShuffleNet V2 for CIFAR (Ma et al. 2018) in RepDistiller's layout.

Registered: 'ShuffleV2' (net_size 1: stage widths 116/232/464, head 1024, blocks 3/7/3). The stem is
a 1x1 conv without stride or max-pool.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from models._common import ShuffleBlock, flatten_pool, run_stages

__all__ = ['ShuffleNetV2', 'BasicBlock', 'DownBlock', 'SplitBlock', 'configs', 'ShuffleV2']


class SplitBlock(nn.Module):
    """Splits the channels: (B, C, H, W) -> ((B, r*C, H, W), (B, C - r*C, H, W)). No parameters."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = int(x.size(1) * self.ratio)
        return x[:, :c], x[:, c:]


class BasicBlock(nn.Module):
    """Stride-1 unit: the first half of the channels passes through, the second goes through
    1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN-ReLU; concat, then channel shuffle (2 groups).
    (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split = SplitBlock(split_ratio)
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock()

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (output, cat[x1, branch before its last ReLU]); the latter is NOT shuffled,
        so its channel order differs from the output's (RepDistiller's convention)."""
        x1, x2 = self.split(x)
        out = torch.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        branch_pre = self.bn3(self.conv3(out))
        out = self.shuffle(torch.cat([x1, torch.relu(branch_pre)], 1))
        return out, torch.cat([x1, branch_pre], 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


class DownBlock(nn.Module):
    """Stride-2 unit with two branches, each producing out_channels / 2:
    left = depthwise 3x3/2-BN, 1x1-BN-ReLU; right = 1x1-BN-ReLU, depthwise 3x3/2-BN, 1x1-BN-ReLU;
    concat, then channel shuffle. (B, in, H, W) -> (B, out, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=1,
                               groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock()

    def forward(self, x: Tensor) -> Tensor:
        left = self.bn1(self.conv1(x))
        left = torch.relu(self.bn2(self.conv2(left)))
        right = torch.relu(self.bn3(self.conv3(x)))
        right = self.bn4(self.conv4(right))
        right = torch.relu(self.bn5(self.conv5(right)))
        return self.shuffle(torch.cat([left, right], 1))


# Stage widths (3 stages + head conv) and blocks per stage, by width multiplier (from the paper;
# 1.5 is SimKD's ShuffleV2_1_5).
configs: dict[float, dict[str, tuple[int, ...]]] = {
    0.5: {'out_channels': (48, 96, 192, 1024), 'num_blocks': (3, 7, 3)},
    1: {'out_channels': (116, 232, 464, 1024), 'num_blocks': (3, 7, 3)},
    1.5: {'out_channels': (176, 352, 704, 1024), 'num_blocks': (3, 7, 3)},
}


class ShuffleNetV2(nn.Module):
    """Stem (1x1 conv 3->24, ``bn1``, ReLU), ``layer1..layer3`` (a DownBlock then BasicBlocks),
    head ``conv2``-``bn2``-``relu2`` (1x1 to 1024), global average pooling, ``linear``."""

    def __init__(self, net_size: float, num_classes: int = 10) -> None:
        super().__init__()
        if net_size not in configs:
            raise ValueError(f'net_size must be one of {sorted(configs)}, got {net_size}')
        out_channels = configs[net_size]['out_channels']
        num_blocks = configs[net_size]['num_blocks']

        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        # a module (not torch.relu) so a forward hook can reach the head's output (letKD's penultimate site)
        self.relu2 = nn.ReLU()
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [DownBlock(self.in_channels, out_channels)]
        layers += [BasicBlock(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def get_feat_modules(self) -> nn.ModuleList:
        """[conv1, bn1, layer1, layer2, layer3]."""
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """Not available for ShuffleNetV2 (as in RepDistiller)."""
        raise NotImplementedError('get_bn_before_relu is not defined for ShuffleNet V2')

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False
                ) -> Tensor | tuple[list[Tensor], Tensor]:
        """(B, 3, H, W) -> logits (B, classes), or with ``is_feat`` ([f0, f1, f2, f3, f4], logits).

        f0 = stem output (B, 24, H, W); f1..f3 = stage outputs (116, 232, 464 channels at H/2, H/4,
        H/8; with ``preact`` the last block's unshuffled pre-ReLU concat); f4 = pooled head output
        (B, 1024). The head conv2 map itself is not in the list.
        """
        x = torch.relu(self.bn1(self.conv1(x)))
        f0 = x
        x, stage_feats = run_stages((self.layer1, self.layer2, self.layer3), x, preact)
        x = self.relu2(self.bn2(self.conv2(x)))
        x = flatten_pool(x)  # RepDistiller: avg_pool2d(4) on 32x32 input
        logits = self.linear(x)
        if is_feat:
            return [f0, *stage_feats, x], logits
        return logits


def ShuffleV2(**kwargs: Any) -> ShuffleNetV2:
    """ShuffleNet V2 1x (widths 116/232/464, head 1024)."""
    return ShuffleNetV2(net_size=1, **kwargs)
