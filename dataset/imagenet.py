"""ImageNet (or any ImageFolder-style set) from `data_folder/imagenet/{train,val}/<class>/<image>`.

`data_folder` may also hold train/ and val/ directly. val/ must be sorted into one folder per
class like train/ (the raw ILSVRC2012 val archive is flat; torchvision's ImageNet class or the
usual valprep.sh script sorts it). num_classes is the number of train/ class folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from torchvision import transforms
from torchvision.datasets import ImageFolder

from helper.errors import UserError

from .common import normalized_tensor

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 224
FOLDER = "imagenet"
_HINT = "expected train/<class>/*.JPEG and val/<class>/*.JPEG (one folder per class in both)"


def resize_for(crop_size: int) -> int:
    """The test-time resize of a centre crop: 256 for 224 (the standard ratio 256/224)."""
    return round(crop_size * 256 / 224)


def train_transform(pad_mode: str = "zero", crop_size: int = IMAGE_SIZE) -> transforms.Compose:
    """RandomResizedCrop(224), horizontal flip, ToTensor, Normalize (pad_mode is unused here).

    crop_size: 224 for ImageNet; smaller values only make tests and smoke runs fast."""
    return transforms.Compose(
        [transforms.RandomResizedCrop(crop_size), transforms.RandomHorizontalFlip(), *normalized_tensor(MEAN, STD)]
    )


def test_transform(crop_size: int = IMAGE_SIZE) -> transforms.Compose:
    """Resize(256), CenterCrop(224), ToTensor, Normalize -> float tensor (3, 224, 224) (scaled with crop_size)."""
    return transforms.Compose([transforms.Resize(resize_for(crop_size)), transforms.CenterCrop(crop_size),
                               *normalized_tensor(MEAN, STD)])


def find_imagenet_root(data_folder: str | Path) -> Path:
    """`data_folder/imagenet` when it holds train/ and val/, else `data_folder` itself if it does."""
    folder = Path(data_folder).expanduser()
    for candidate in (folder / FOLDER, folder):
        if (candidate / "train").is_dir() and (candidate / "val").is_dir():
            return candidate
    raise UserError(f"ImageNet not found: neither {folder / FOLDER} nor {folder} holds train/ and val/; {_HINT}")


def _image_folder(path: Path, transform: Callable | None) -> ImageFolder:
    try:
        return ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, OSError) as err:
        raise UserError(f"cannot read image folders in {path} ({err}); {_HINT}") from err


def get_imagenet_datasets(
    data_folder: str | Path,
    train_tf: Callable | None = None,
    test_tf: Callable | None = None,
) -> tuple[ImageFolder, ImageFolder]:
    """(train, val) ImageFolder sets with identical class lists; items (img, target)."""
    root = find_imagenet_root(data_folder)
    train_set = _image_folder(root / "train", train_tf)
    val_set = _image_folder(root / "val", test_tf)
    if val_set.classes != train_set.classes:
        raise UserError(
            f"ImageNet: {root / 'val'} has {len(val_set.classes)} class folders and {root / 'train'} has "
            f"{len(train_set.classes)}, and they differ; sort val/ into the same per-class folders as train/"
        )
    return train_set, val_set
