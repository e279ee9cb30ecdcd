"""Tiny-ImageNet-200 (64x64 RGB, 200 classes) from the official unzipped `tiny-imagenet-200` folder.

Two layouts are read:

- the official archive (tiny-imagenet-200.zip):
    tiny-imagenet-200/wnids.txt
    tiny-imagenet-200/train/<wnid>/images/<wnid>_<i>.JPEG      (500 per class)
    tiny-imagenet-200/val/images/val_<i>.JPEG                  (10000, 50 per class)
    tiny-imagenet-200/val/val_annotations.txt                  (file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1)
- the letKD authors' layout: the same train/, plus labelled class folders val/<wnid>/*.JPEG and
  test/<wnid>/*.JPEG (25 + 25 per class, carved out of the official val images).

Evaluation splits (`split` argument, CLI flag --tiny_split):
- 'val50': every labelled held-out image (the official 50 per class; in the authors' layout
  val/ and test/ together) is the one evaluation set, as in RepDistiller-style papers.
- 'letkd': the authors' protocol: a 'val' part (25 per class) for model selection and a 'test'
  part (25 per class) for the reported number. Read from the val/<wnid>/ and test/<wnid>/ class
  folders when test/ has them; otherwise the official val images are split deterministically:
  per class, the images sorted by their number (val_<i>.JPEG by i) are cut in two, the first
  half (n // 2, i.e. 25 of 50) goes to 'val' and the rest to 'test'.

The class index of a wnid is its position among the sorted train/ folder names (as torchvision's
ImageFolder numbers them); held-out labels use the same mapping. Some images are greyscale JPEGs;
every split converts every image to RGB.
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

SPLITS = ("val50", "letkd")
AUGMENTATIONS = ("rotate", "crop")

# Normalisation used by the letKD authors' Tiny-ImageNet dataset class.
MEAN = (0.4802, 0.4481, 0.3975)
STD = (0.2302, 0.2265, 0.2262)
IMAGE_SIZE = 64
FOLDER = "tiny-imagenet-200"
_HINT = (
    "expected the unzipped tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip) "
    "with train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt"
)


def train_transform(pad_mode: str = "zero", augment: str = "rotate") -> transforms.Compose:
    """The training augmentation, then ToTensor + Normalize.

    augment 'rotate' (default; the letKD authors' Tiny-ImageNet code): a random rotation of up to
    20 degrees either way (nearest-neighbour, black corners, same size) and a horizontal flip; no
    crop, so `pad_mode` is not used. 'crop': RandomCrop(64, padding=4, `pad_mode` border) and a
    horizontal flip (the CIFAR recipe of RepDistiller-style papers).
    """
    if augment == "rotate":
        first: list[Callable] = [transforms.RandomRotation(20)]
    elif augment == "crop":
        first = [padded_random_crop(IMAGE_SIZE, pad_mode)]
    else:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    return transforms.Compose([*first, transforms.RandomHorizontalFlip(), *normalized_tensor(MEAN, STD)])


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


class LabelledImages(Dataset):
    """A list of (image path, class index): items (PIL RGB -> transform, target), with `targets`/`samples`.

    class_to_idx: wnid -> index (from the train folders).
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        class_to_idx: dict[str, int],
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        loader: Callable[[str], Any] = default_loader,
    ) -> None:
        self.class_to_idx = dict(class_to_idx)
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.__getitem__)
        self.transform = transform
        self.target_transform = target_transform
        self.loader = loader
        self.samples = list(samples)
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


class TinyImageNetVal(LabelledImages):
    """The official labelled val split (val/images + val_annotations.txt), 50 images per class.

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
        super().__init__([], class_to_idx, transform, target_transform, loader)
        self.root = root
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


def _image_number(path: str) -> tuple[int, str]:
    """Sort key of an official val file: val_<i>.JPEG -> (i, name); other names sort after, by name."""
    stem = Path(path).stem
    digits = stem.rsplit("_", 1)[-1]
    return (int(digits), stem) if digits.isdigit() else (2**63, stem)


def split_official_val(val_set: LabelledImages) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """The deterministic letKD-style cut of the official val images: (val samples, test samples).

    Per class, the images sorted by their number (val_<i>.JPEG by i): the first n // 2 go to val,
    the rest to test (25 / 25 of the official 50). The order of each list is the input's order.
    """
    by_class: dict[int, list[str]] = {}
    for path, target in val_set.samples:
        by_class.setdefault(target, []).append(path)
    to_val = set()
    for paths in by_class.values():
        ordered = sorted(paths, key=_image_number)
        to_val.update(ordered[: len(ordered) // 2])
    val = [(p, t) for p, t in val_set.samples if p in to_val]
    test = [(p, t) for p, t in val_set.samples if p not in to_val]
    return val, test


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "images") if folder.is_dir() else []


def _class_folder_samples(folder: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """(path, class index) of every image under folder/<wnid>/ (recursively), sorted by path."""
    samples = []
    for class_dir in _class_folders(folder):
        if class_dir.name not in class_to_idx:
            raise UserError(f"Tiny-ImageNet: class folder {class_dir} has no folder in train/")
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and path.suffix.lower() in (".jpeg", ".jpg", ".png"):
                samples.append((str(path), class_to_idx[class_dir.name]))
    if not samples:
        raise UserError(f"Tiny-ImageNet: no images in the class folders of {folder}")
    return samples


def has_letkd_layout(root: str | Path) -> bool:
    """True when test/ holds class folders (the authors' labelled val/<wnid>, test/<wnid> layout)."""
    return bool(_class_folders(Path(root) / "test"))


def get_tinyimagenet_datasets(
    data_folder: str | Path,
    train_tf: Callable | None = None,
    test_tf: Callable | None = None,
    split: str = "val50",
) -> tuple[ImageFolder, LabelledImages, LabelledImages | None]:
    """(train ImageFolder, val, test) with the same wnid -> index mapping; items (img, target).

    split 'val50': val is every labelled held-out image and test is None. 'letkd': val (25 per
    class, model selection) and test (25 per class, the reported number); see the module docstring.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
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
    classes = train_set.class_to_idx
    if has_letkd_layout(root):
        val = _class_folder_samples(root / "val", classes)
        test = _class_folder_samples(root / "test", classes)
    else:
        official = TinyImageNetVal(root, classes, transform=test_tf)
        if split == "val50":
            return train_set, official, None
        val, test = split_official_val(official)
        if not val or not test:
            raise UserError(f"Tiny-ImageNet: --tiny_split letkd needs at least 2 val images per class in {root / 'val'}")
    if split == "val50":
        return train_set, LabelledImages(val + test, classes, transform=test_tf), None
    return train_set, LabelledImages(val, classes, transform=test_tf), LabelledImages(test, classes, transform=test_tf)
