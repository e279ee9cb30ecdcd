"""The 'weak_strong' data mode: each training image as a weak and a strong view (MLKD, Jin et al., CVPR 2023).

Items are ``(weak, target, index, strong)``: the weak view is the data set's usual training transform (CIFAR-100:
RandomCrop(32, padding 4) + horizontal flip), the strong view an independent draw of the same transform with
``FixMatchRandAugment`` inserted before ToTensor. This follows the MLKD authors' CIFAR-100 data code
(Jin-Ying/Multi-Level-Logit-Distillation ``mdistiller/dataset/cifar100.py``: ``get_cifar100_train_transform_strong``,
two independent pipelines applied by ``MultipleApply``; the strong one is crop + flip + ``RandAugment(2, 10)`` +
ToTensor + Normalize), which is the FixMatch flavour of RandAugment, not torchvision's ``RandAugment``:

- two operations drawn uniformly with replacement from 14 (AutoContrast, Brightness, Color, Contrast, Equalize,
  Identity, Posterize, Rotate, Sharpness, ShearX, ShearY, Solarize, TranslateX, TranslateY), each with a magnitude
  drawn uniformly in its own range (Brightness / Color / Contrast / Sharpness factor in [0.05, 0.95], Posterize
  bits int([4, 8]), Rotate [-30, 30] degrees, Shear [-0.3, 0.3], Solarize threshold [0, 256], Translate [-0.3, 0.3]
  of the side); the ``m = 10`` of ``RandAugment(2, 10)`` is unused there;
- then always a Cutout: a square of side ``v * W``, v uniform in [0, 0.5], filled with (125, 123, 114), its centre
  drawn uniformly in [1, W] x [1, H] (the official ``np.random.uniform(w)`` draws between w and 1).

Every random draw comes from torch's RNG (as torchvision's transforms), so the loader's seeding (dataset.set_epoch,
worker seeds) makes the views reproducible. The operations are torchvision's functional transforms where they do the
same thing as the official PIL calls, and PIL's affine ``Image.transform`` for the shears and translations (which
torchvision parametrises differently). There is no device-resident version (dataset/device_data.py refuses this mode).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw
from torchvision import transforms

from .sampling import _Wrapper

CUTOUT_FILL = (125, 123, 114)


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _affine(img: Image.Image, coefficients: tuple[float, ...]) -> Image.Image:
    """PIL's affine transform (nearest neighbour, black outside), the official ShearX/Y and TranslateX/Y."""
    return img.transform(img.size, Image.Transform.AFFINE, coefficients)


# (name, operation(img, v), low, high): the official augment_list, in its order
OPERATIONS: tuple[tuple[str, Callable[[Image.Image, float], Image.Image], float, float], ...] = (
    ('AutoContrast', lambda img, v: TF.autocontrast(img), 0.0, 1.0),
    ('Brightness', lambda img, v: TF.adjust_brightness(img, v), 0.05, 0.95),
    ('Color', lambda img, v: TF.adjust_saturation(img, v), 0.05, 0.95),      # PIL ImageEnhance.Color
    ('Contrast', lambda img, v: TF.adjust_contrast(img, v), 0.05, 0.95),
    ('Equalize', lambda img, v: TF.equalize(img), 0.0, 1.0),
    ('Identity', lambda img, v: img, 0.0, 1.0),
    ('Posterize', lambda img, v: TF.posterize(img, max(1, int(v))), 4.0, 8.0),
    ('Rotate', lambda img, v: TF.rotate(img, v), -30.0, 30.0),              # PIL rotate: nearest, black corners
    ('Sharpness', lambda img, v: TF.adjust_sharpness(img, v), 0.05, 0.95),
    ('ShearX', lambda img, v: _affine(img, (1, v, 0, 0, 1, 0)), -0.3, 0.3),
    ('ShearY', lambda img, v: _affine(img, (1, 0, 0, v, 1, 0)), -0.3, 0.3),
    ('Solarize', lambda img, v: TF.solarize(img, v), 0.0, 256.0),
    ('TranslateX', lambda img, v: _affine(img, (1, 0, v * img.size[0], 0, 1, 0)), -0.3, 0.3),
    ('TranslateY', lambda img, v: _affine(img, (1, 0, 0, 0, 1, v * img.size[1])), -0.3, 0.3),
)


def cutout(img: Image.Image, fraction: float) -> Image.Image:
    """A copy of ``img`` with a square of side ``fraction * width`` filled with CUTOUT_FILL (the official Cutout)."""
    if fraction <= 0:
        return img
    side = fraction * img.size[0]
    width, height = img.size
    cx, cy = _uniform(1.0, width), _uniform(1.0, height)
    x0, y0 = int(max(0.0, cx - side / 2.0)), int(max(0.0, cy - side / 2.0))
    x1, y1 = min(width, x0 + side), min(height, y0 + side)
    img = img.copy()
    ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), fill=CUTOUT_FILL)
    return img


class FixMatchRandAugment:
    """``n`` random operations of OPERATIONS with random magnitudes, then a random Cutout (module doc); PIL in, PIL out."""

    def __init__(self, n: int = 2) -> None:
        self.n = int(n)

    def __call__(self, img: Image.Image) -> Image.Image:
        for choice in torch.randint(len(OPERATIONS), (self.n,)).tolist():
            _, operation, low, high = OPERATIONS[choice]
            img = operation(img, _uniform(low, high))
        return cutout(img, _uniform(0.0, 0.5))

    def __repr__(self) -> str:
        return f'{type(self).__name__}(n={self.n})'


def strong_transform(train_transform: transforms.Compose, n: int = 2) -> transforms.Compose:
    """``train_transform`` (a Compose of PIL steps then ToTensor, ...) with FixMatchRandAugment(n) before ToTensor."""
    steps = list(train_transform.transforms)
    at = next((i for i, step in enumerate(steps) if isinstance(step, transforms.ToTensor)), None)
    if at is None:
        raise ValueError("the training transform has no ToTensor step to insert the strong augmentation before")
    return transforms.Compose([*steps[:at], FixMatchRandAugment(n), *steps[at:]])


class WeakStrongDataset(_Wrapper):
    """Item i of a dataset of (PIL image, target) as ``(weak(img), target, i, strong(img))``.

    ``base`` must yield untransformed images (``common.with_transform(train_set, None)``).
    """

    def __init__(self, base: Any, weak: Callable, strong: Callable) -> None:
        super().__init__(base)
        self.weak, self.strong = weak, strong

    def __getitem__(self, index: int) -> tuple[Any, Any, int, Any]:
        img, target = self.base[index][:2]
        return self.weak(img), target, index, self.strong(img)
