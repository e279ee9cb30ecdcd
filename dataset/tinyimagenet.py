"""Tiny-ImageNet-200 (64x64 RGB, 200 classes) from the official unzipped `tiny-imagenet-200` folder.

Layout read here (as in tiny-imagenet-200.zip):
    tiny-imagenet-200/wnids.txt
    tiny-imagenet-200/train/<wnid>/images/<wnid>_<i>.JPEG      (500 per class)
    tiny-imagenet-200/val/images/val_<i>.JPEG                  (10000)
    tiny-imagenet-200/val/val_annotations.txt                  (file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1)
The class index of a wnid is its position among the sorted train/ folder names (as torchvision's
ImageFolder numbers them); val labels use the same mapping. Some images are greyscale JPEGs;
both splits convert every image to RGB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader

from helper.errors import UserError

from .common import normalized_tensor, padded_random_crop, require_dir, require_file

# Normalisation used by the letKD authors' Tiny-ImageNet dataset class.
MEAN = (0.4802, 0.4481, 0.3975)
STD = (0.2302, 0.2265, 0.2262)
IMAGE_SIZE = 64
FOLDER = "tiny-imagenet-200"
_HINT = (
    "expected the unzipped tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip) "
    "with train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt"
)


def train_transform(pad_mode: str = "zero") -> transforms.Compose:
    """RandomCrop(64, padding=4, zero or reflect border), horizontal flip, ToTensor, Normalize.

    This is the augmentation of RepDistiller-style Tiny-ImageNet KD papers. The letKD authors'
    code used RandomRotation(20) + RandomHorizontalFlip instead (no crop).
    """
    return transforms.Compose(
        [padded_random_crop(IMAGE_SIZE, pad_mode), transforms.RandomHorizontalFlip(), *normalized_tensor(MEAN, STD)]
    )


def test_transform() -> transforms.Compose:
    """ToTensor + Normalize: PIL 64x64 RGB -> float tensor (3, 64, 64)."""
    return transforms.Compose(normalized_tensor(MEAN, STD))


def find_tinyimagenet_root(data_folder: str | Path) -> Path:
    """The tiny-imagenet-200 folder: `data_folder` itself or `data_folder/tiny-imagenet-200`."""
    folder = Path(data_folder).expanduser()
    for candidate in (folder, folder / FOLDER):
        if (candidate / "train").is_dir() and (candidate / "val").is_dir():
            return candidate
    raise UserError(f"Tiny-ImageNet not found: neither {folder} nor {folder / FOLDER} holds train/ and val/; {_HINT}")


class TinyImageNetVal(Dataset):
    """The labelled val split: items (PIL RGB 64x64 -> transform, target), with `targets`/`samples`.

    root: the tiny-imagenet-200 folder; class_to_idx: wnid -> index (from the train folders).
    """

    def __init__(
        self,
        root: str | Path,
        class_to_idx: dict[str, int],
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        loader: Callable[[str], Any] = default_loader,
    ) -> None:
        root = Path(root)
        images = root / "val" / "images"
        annotations = root / "val" / "val_annotations.txt"
        require_dir(images, "Tiny-ImageNet val images", _HINT)
        require_file(annotations, "Tiny-ImageNet val annotations", _HINT)
        self.root = root
        self.class_to_idx = dict(class_to_idx)
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.__getitem__)
        self.transform = transform
        self.target_transform = target_transform
        self.loader = loader
        self.samples: list[tuple[str, int]] = []
        for line_no, line in enumerate(annotations.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise UserError(f"{annotations}:{line_no}: expected 'file<TAB>wnid<TAB>bbox', got {line!r}")
            name, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in self.class_to_idx:
                raise UserError(f"{annotations}:{line_no}: wnid {wnid} has no folder in {root / 'train'}")
            self.samples.append((str(images / name), self.class_to_idx[wnid]))
        if not self.samples:
            raise UserError(f"Tiny-ImageNet val annotations {annotations} list no images; {_HINT}")
        absent = [path for path, _ in self.samples if not Path(path).is_file()]
        if absent:
            raise UserError(f"Tiny-ImageNet: {len(absent)} val images listed in {annotations} are missing, e.g. {absent[0]}")
        self.targets = [target for _, target in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        path, target = self.samples[index]
        img = self.loader(path)
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def get_tinyimagenet_datasets(
    data_folder: str | Path,
    train_tf: Callable | None = None,
    test_tf: Callable | None = None,
) -> tuple[ImageFolder, TinyImageNetVal]:
    """(train ImageFolder, val TinyImageNetVal) with the same wnid -> index mapping; items (img, target)."""
    root = find_tinyimagenet_root(data_folder)
    try:
        # ImageFolder walks each class folder recursively, so train/<wnid>/images/*.JPEG is found
        # and the <wnid>_boxes.txt files are skipped (not an image extension).
        train_set = ImageFolder(str(root / "train"), transform=train_tf)
    except (FileNotFoundError, OSError) as err:
        raise UserError(f"Tiny-ImageNet train split unreadable under {root / 'train'} ({err}); {_HINT}") from err
    wnids_file = root / "wnids.txt"
    if wnids_file.is_file():
        listed = set(wnids_file.read_text().split())
        if listed and listed != set(train_set.classes):
            raise UserError(
                f"Tiny-ImageNet: {wnids_file} lists {len(listed)} wnids but {root / 'train'} has "
                f"{len(train_set.classes)} class folders that differ from them"
            )
    val_set = TinyImageNetVal(root, train_set.class_to_idx, transform=test_tf)
    return train_set, val_set
