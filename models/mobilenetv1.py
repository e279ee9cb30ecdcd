"""MobileNetV1 for 224x224 ImageNet, the Table-2 (b) student of the letKD paper (as in the OFD /
mdistiller / QUEST ImageNet zoos): 4,231,976 parameters at 1000 classes.

Layout (the state_dict keys follow it: ``model.0.0.weight`` ... ``model.13.4.running_var``,
``fc.weight``, ``fc.bias``): ``model`` is an ``nn.Sequential`` of

- ``model[0]``: full 3x3 conv 3->32, stride 2, as (conv, BN, ReLU);
- ``model[1..13]``: depthwise-separable units (depthwise 3x3 conv, BN, ReLU, pointwise 1x1 conv,
  BN, ReLU) 32-64/1, 64-128/2, 128-128/1, 128-256/2, 256-256/1, 256-512/2, 5 x 512-512/1,
  512-1024/2, 1024-1024/1;
- ``model[14]``: global average pooling (adaptive here, so any input size works; at 224 it is the
  reference's 7x7 average pool),

then ``fc`` = Linear(1024, classes). Convs have no bias; PyTorch's default initialisation (the
reference defines none).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ['MobileNetV1', 'mobilenet_v1']

# (in, out, stride) of the 13 depthwise-separable units model[1..13]
_DW_UNITS: tuple[tuple[int, int, int], ...] = (
    (32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
    (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1),
    (512, 1024, 2), (1024, 1024, 1),
)
# model indices whose outputs are the features f1..f4 (ends of the stride-4/8/16/32 stages)
_FEAT_UNITS: tuple[int, ...] = (3, 5, 11, 13)


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    """Full 3x3 conv (no bias) - BN - ReLU: (B, in_ch, H, W) -> (B, out_ch, H/stride, W/stride)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def _separable(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 conv (stride) - BN - ReLU - pointwise 1x1 conv - BN - ReLU (indices 0..5):
    (B, in_ch, H, W) -> (B, out_ch, H/stride, W/stride)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, in_ch, kernel_size=3, stride=stride, padding=1, groups=in_ch, bias=False),
        nn.BatchNorm2d(in_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    """MobileNetV1 (width 1.0): ``model`` (stem + 13 separable units + global pool) and ``fc``.
    Input (B, 3, H, W), any H, W; the last map is (B, 1024, H/32, W/32)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        units: list[nn.Module] = [_conv_bn_relu(3, 32, 2)]
        units += [_separable(i, o, s) for i, o, s in _DW_UNITS]
        units.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*units)
        self.fc = nn.Linear(1024, num_classes)

    def get_feat_modules(self) -> nn.ModuleList:
        """The modules that produce the features (the 14 conv units; everything but the classifier)."""
        return nn.ModuleList(list(self.model[:14]))

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The pointwise BN of the units that end the stride-4/8/16/32 stages (model[3, 5, 11, 13][4])."""
        return [self.model[i][4] for i in _FEAT_UNITS]

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False
                ) -> Tensor | tuple[list[Tensor], Tensor]:
        """(B, 3, H, W) -> logits (B, classes), or with ``is_feat`` ([f1, f2, f3, f4, f5], logits).

        f1..f4 = outputs of model[3], model[5], model[11], model[13]: (B, 128, H/4), (B, 256, H/8),
        (B, 512, H/16), (B, 1024, H/32) (post-ReLU, or with ``preact`` the pointwise BN output before
        the unit's last ReLU; the logits are the same either way); f5 = pooled f4, (B, 1024).
        There is no stem feature (as in the reference), so the list has 5 entries.
        """
        feats = []
        for i in range(14):
            unit = self.model[i]
            if preact and i in _FEAT_UNITS:
                pre = unit[:5](x)
                x = F.relu(pre)
                feats.append(pre)
            else:
                x = unit(x)
                if i in _FEAT_UNITS:
                    feats.append(x)
        x = torch.flatten(self.model[14](x), 1)
        logits = self.fc(x)
        if is_feat:
            return [*feats, x], logits
        return logits


def mobilenet_v1(num_classes: int = 1000) -> MobileNetV1:
    """MobileNetV1 with a ``num_classes``-way classifier (4,231,976 parameters at 1000 classes)."""
    return MobileNetV1(num_classes=num_classes)
