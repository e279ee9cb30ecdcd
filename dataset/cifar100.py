"""CIFAR-100 in the standard `cifar-100-python/{train,test,meta}` pickle layout.

Class names follow RepDistiller (`CIFAR100Instance`, `CIFAR100InstanceSample`,
`get_cifar100_dataloaders`, `get_cifar100_dataloaders_sample`) and use the modern torchvision
attributes `data` (N x 32 x 32 x 3 uint8) and `targets` (list of int).
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path
from typing import Any, Callable

import torchvision
from torchvision import transforms

from helper.errors import UserError

from .common import normalized_tensor, padded_random_crop
from .sampling import ContrastiveIndexSampler, ContrastiveSampling, IndexedDataset

MEAN = (0.5071, 0.4867, 0.4408)
STD = (0.2675, 0.2565, 0.2761)
IMAGE_SIZE = 32
NUM_CLASSES = 100
FILES = ("train", "test", "meta")
URL_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"


def train_transform(pad_mode: str = "zero") -> transforms.Compose:
    """RandomCrop(32, padding=4, zero or reflect border), horizontal flip, ToTensor, Normalize."""
    return transforms.Compose(
        [padded_random_crop(IMAGE_SIZE, pad_mode), transforms.RandomHorizontalFlip(), *normalized_tensor(MEAN, STD)]
    )


def test_transform() -> transforms.Compose:
    """ToTensor + Normalize: PIL 32x32 RGB -> float tensor (3, 32, 32)."""
    return transforms.Compose(normalized_tensor(MEAN, STD))


def _missing_files(root: Path) -> list[str]:
    folder = root / CIFAR100.base_folder
    return [name for name in FILES if not (folder / name).is_file()]


def _download(root: Path) -> None:
    """Fetch and unpack the official archive into `root` through torchvision, errors as UserError."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        torchvision.datasets.utils.download_and_extract_archive(
            CIFAR100.url, str(root), filename=CIFAR100.filename, md5=CIFAR100.tgz_md5
        )
    except (OSError, RuntimeError, ValueError, tarfile.TarError) as err:  # URLError is an OSError
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise UserError(
            f"could not download CIFAR-100 into {root} ({reason}); fetch cifar-100-python.tar.gz "
            f"from {URL_PAGE} and unpack it there, or check your network/proxy"
        ) from err
    missing = _missing_files(root)
    if missing:
        raise UserError(f"CIFAR-100 download into {root} did not produce cifar-100-python/{', '.join(missing)}")


class CIFAR100(torchvision.datasets.CIFAR100):
    """torchvision's CIFAR100 reading `root/cifar-100-python/{train,test,meta}` without md5 checks.

    Only the presence of the three pickles is checked, not their md5 sums, so that subsets,
    re-packed copies and the tiny test fixtures load too (a corrupt file fails while unpickling,
    reported as UserError). When a file is missing it is downloaded through torchvision if
    `download` is True (the archive itself is md5-checked), otherwise UserError is raised.
    Items are (PIL image -> transform, target).
    """

    train_list = [["train", None]]
    test_list = [["test", None]]
    meta = {"filename": "meta", "key": "fine_label_names", "md5": None}

    def __init__(
        self,
        root: str | Path,
        train: bool = True,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        download: bool = False,
    ) -> None:
        root = Path(root).expanduser()
        missing = _missing_files(root)
        if missing:
            if not download:
                raise UserError(
                    f"CIFAR-100 not found: {root / self.base_folder} lacks {', '.join(missing)} "
                    f"(expected the unpacked cifar-100-python.tar.gz with train, test and meta); "
                    f"allow downloading or unpack the archive from {URL_PAGE} there"
                )
            _download(root)
        try:
            super().__init__(str(root), train=train, transform=transform, target_transform=target_transform)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, UnicodeDecodeError) as err:
            raise UserError(
                f"cannot read CIFAR-100 from {root / self.base_folder} ({type(err).__name__}: {err}); "
                "expected the python-version pickles of cifar-100-python.tar.gz"
            ) from err


def CIFAR100Instance(root: str | Path, train: bool = True, transform: Callable | None = None,
                     target_transform: Callable | None = None, download: bool = False) -> IndexedDataset:
    """RepDistiller's CIFAR100Instance, items (img, target, index): the training path's own IndexedDataset
    over CIFAR100 (a function with the class's name and arguments)."""
    return IndexedDataset(CIFAR100(root, train=train, transform=transform, target_transform=target_transform,
                                   download=download))


class CIFAR100InstanceSample(ContrastiveSampling, CIFAR100):
    """CIFAR100 for CRD: items are (img, target, index, sample_idx), sample_idx int64 of shape (k+1,).

    sample_idx[0] is the positive (the item itself for mode='exact', a random same-class sample
    for 'relax'); the k others are negatives from other classes only, without replacement unless
    k exceeds the pool. percent < 1 keeps that fraction of each class's negative pool, chosen once
    at construction from `seed`. Draws depend only on (seed, epoch, index): call `set_epoch`
    each epoch. With is_sample=False items are (img, target, index).
    """

    def __init__(
        self,
        root: str | Path,
        train: bool = True,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        download: bool = False,
        k: int = 4096,
        mode: str = "exact",
        is_sample: bool = True,
        percent: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(root, train=train, transform=transform, target_transform=target_transform, download=download)
        self.k = k
        self.mode = mode
        self.is_sample = is_sample
        self.sampler = ContrastiveIndexSampler(self.targets, k=k, mode=mode, percent=percent, seed=seed)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        img, target = super().__getitem__(index)
        return self.contrastive_item(img, target, index)


def get_cifar100_datasets(
    data_folder: str | Path,
    train_tf: Callable | None = None,
    test_tf: Callable | None = None,
    download: bool = False,
) -> tuple[CIFAR100, CIFAR100]:
    """(train 50000, test 10000) CIFAR100 sets from `data_folder`, items (img, target)."""
    train_set = CIFAR100(data_folder, train=True, transform=train_tf, download=download)
    test_set = CIFAR100(data_folder, train=False, transform=test_tf, download=False)
    return train_set, test_set
