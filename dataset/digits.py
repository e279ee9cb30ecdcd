"""The scikit-learn handwritten digits (1797 real 8x8 images, 10 classes) as a CIFAR-like 32x32 RGB set.

It ships inside scikit-learn, so it needs no download and makes quick end-to-end runs possible.
Each 8x8 image (values 0..16) is scaled to 0..255 uint8, upscaled to 32x32 with PIL bilinear
resampling and repeated over 3 channels. A fixed stratified split (train_test_split with
test_size=0.2, random_state=0) gives 1437 train and 360 test images.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from .common import normalized_tensor, padded_random_crop

IMAGE_SIZE = 32
NUM_CLASSES = 10
# Per-channel mean / std of the train split's pixels in [0, 1] (identical over the 3 channels):
#   x = Digits(train=True).data / 255.0; x.mean(), x.std()  ->  0.305660, 0.323522
MEAN = (0.3057, 0.3057, 0.3057)
STD = (0.3235, 0.3235, 0.3235)


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images N x 32 x 32 x 3 uint8, labels N int64, train indices, test indices), built once."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    small = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    size = (IMAGE_SIZE, IMAGE_SIZE)
    big = np.stack([np.asarray(Image.fromarray(im, mode="L").resize(size, Image.Resampling.BILINEAR)) for im in small])
    rgb = np.repeat(big[..., None], 3, axis=3)
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels
    )
    for arr in (rgb, labels, train_idx, test_idx):
        arr.setflags(write=False)
    return rgb, labels, train_idx, test_idx


class Digits(Dataset):
    """One split of the digits set; items (PIL RGB 32x32 -> transform, target).

    Attributes like CIFAR: `data` (N x 32 x 32 x 3 uint8), `targets` (list of int), `classes`.
    """

    def __init__(
        self,
        train: bool = True,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ) -> None:
        images, labels, train_idx, test_idx = _digits_arrays()
        idx = train_idx if train else test_idx
        self.train = train
        self.data = images[idx]
        self.targets = [int(t) for t in labels[idx]]
        self.classes = [str(c) for c in range(NUM_CLASSES)]
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        img: Any = Image.fromarray(self.data[index])
        target: Any = self.targets[index]
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def train_transform(pad_mode: str = "zero") -> transforms.Compose:
    """RandomCrop(32, padding=4, zero or reflect border), ToTensor, Normalize; no flip (a flipped digit changes meaning)."""
    return transforms.Compose([padded_random_crop(IMAGE_SIZE, pad_mode), *normalized_tensor(MEAN, STD)])


def test_transform() -> transforms.Compose:
    """ToTensor + Normalize -> float tensor (3, 32, 32)."""
    return transforms.Compose(normalized_tensor(MEAN, STD))


def get_digits_datasets(
    data_folder: Any = None,
    train_tf: Callable | None = None,
    test_tf: Callable | None = None,
) -> tuple[Digits, Digits]:
    """(train 1437, test 360) Digits sets; data_folder is ignored (the data ships with scikit-learn)."""
    return Digits(train=True, transform=train_tf), Digits(train=False, transform=test_tf)
