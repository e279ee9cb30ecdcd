"""VGG for CIFAR (Simonyan & Zisserman 2015, with BN) in RepDistiller's layout.

Five conv blocks ``block0..block4`` (each a Sequential of conv3x3(+BN)+ReLU whose *trailing* ReLU is
removed, so the forward applies it and can also return the pre-ReLU value), max-pools
``pool0..pool3``, adaptive average pool ``pool4`` and a linear ``classifier``.
Registered names vgg8/11/13/16/19 map to the batch-norm variants (``vgg8_bn`` ...).
"""
from __future__ import annotations

from typing import Any


import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models._common import init_conv_bn_linear

__all__ = ['VGG', 'cfg', 'vgg8', 'vgg8_bn', 'vgg11', 'vgg11_bn', 'vgg13', 'vgg13_bn', 'vgg16',
           'vgg16_bn', 'vgg19', 'vgg19_bn']

# Output widths of the convs in each of the five blocks.
cfg: dict[str, list[list[int]]] = {
    'S': [[64], [128], [256], [512], [512]],                                   # vgg8
    'A': [[64], [128], [256, 256], [512, 512], [512, 512]],                    # vgg11
    'B': [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],           # vgg13
    'D': [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],              # vgg16
    'E': [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],              # vgg19
}


class VGG(nn.Module):
    """VGG on (B, 3, H, W) images. ``pool3`` is applied only when H == 64 (Tiny-ImageNet), so on
    32x32 input block3 and block4 both run at 4x4; ``pool4`` adapts to any size."""

    def __init__(self, cfg: list[list[int]], batch_norm: bool = False, num_classes: int = 1000) -> None:
        super().__init__()
        self.block0 = self._make_layers(cfg[0], batch_norm, 3)
        self.block1 = self._make_layers(cfg[1], batch_norm, cfg[0][-1])
        self.block2 = self._make_layers(cfg[2], batch_norm, cfg[1][-1])
        self.block3 = self._make_layers(cfg[3], batch_norm, cfg[2][-1])
        self.block4 = self._make_layers(cfg[4], batch_norm, cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        init_conv_bn_linear(self)

    @staticmethod
    def _make_layers(widths: list[int], batch_norm: bool, in_channels: int) -> nn.Sequential:
        """conv3x3 (with bias) [+ BN] + ReLU per width, without the block's last ReLU."""
        layers: list[nn.Module] = []
        for v in widths:
            layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            in_channels = v
        return nn.Sequential(*layers[:-1])

    def get_feat_modules(self) -> nn.ModuleList:
        """Blocks and pools in forward order (everything but the classifier)."""
        return nn.ModuleList([self.block0, self.pool0, self.block1, self.pool1, self.block2, self.pool2,
                              self.block3, self.pool3, self.block4, self.pool4])

    def get_bn_before_relu(self) -> list[nn.Module]:
        """The last module of block1..block4 (a BN in the ``_bn`` variants)."""
        return [self.block1[-1], self.block2[-1], self.block3[-1], self.block4[-1]]

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False
                ) -> Tensor | tuple[list[Tensor], Tensor]:
        """(B, 3, H, W) -> logits (B, classes), or with ``is_feat`` ([f0, ..., f5], logits).

        f0 = relu(block0) (B, 64, H, W); f1..f4 = relu(block1..4) at H/2, H/4, H/8, H/8 (H/16 for
        H == 64), or the blocks' pre-ReLU outputs with ``preact`` (f0 is always post-ReLU);
        f5 = pooled f4, (B, 512).
        """
        height = x.shape[2]
        x = F.relu(self.block0(x))
        feats = [x]
        pools = [self.pool0, self.pool1, self.pool2, self.pool3 if height == 64 else None]
        blocks = [self.block1, self.block2, self.block3, self.block4]
        for pool, block in zip(pools, blocks):
            if pool is not None:
                x = pool(x)
            pre = block(x)
            x = F.relu(pre)
            feats.append(pre if preact else x)
        x = torch.flatten(self.pool4(x), 1)
        feats.append(x)
        logits = self.classifier(x)
        if is_feat:
            return feats, logits
        return logits


def vgg8(**kwargs: Any) -> VGG:
    """VGG-8 without BN (cfg 'S')."""
    return VGG(cfg['S'], **kwargs)


def vgg8_bn(**kwargs: Any) -> VGG:
    """VGG-8 with BN (cfg 'S'); registered as 'vgg8'."""
    return VGG(cfg['S'], batch_norm=True, **kwargs)


def vgg11(**kwargs: Any) -> VGG:
    """VGG-11 without BN (cfg 'A')."""
    return VGG(cfg['A'], **kwargs)


def vgg11_bn(**kwargs: Any) -> VGG:
    """VGG-11 with BN (cfg 'A'); registered as 'vgg11'."""
    return VGG(cfg['A'], batch_norm=True, **kwargs)


def vgg13(**kwargs: Any) -> VGG:
    """VGG-13 without BN (cfg 'B')."""
    return VGG(cfg['B'], **kwargs)


def vgg13_bn(**kwargs: Any) -> VGG:
    """VGG-13 with BN (cfg 'B'); registered as 'vgg13'."""
    return VGG(cfg['B'], batch_norm=True, **kwargs)


def vgg16(**kwargs: Any) -> VGG:
    """VGG-16 without BN (cfg 'D')."""
    return VGG(cfg['D'], **kwargs)


def vgg16_bn(**kwargs: Any) -> VGG:
    """VGG-16 with BN (cfg 'D'); registered as 'vgg16'."""
    return VGG(cfg['D'], batch_norm=True, **kwargs)


def vgg19(**kwargs: Any) -> VGG:
    """VGG-19 without BN (cfg 'E')."""
    return VGG(cfg['E'], **kwargs)


def vgg19_bn(**kwargs: Any) -> VGG:
    """VGG-19 with BN (cfg 'E'); registered as 'vgg19'."""
    return VGG(cfg['E'], batch_norm=True, **kwargs)
