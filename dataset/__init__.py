"""Datasets and the one loader factory the training CLIs use.

    bundle = get_dataloaders('cifar100', './data', batch_size=64, mode='crd', seed=0)
    for epoch in range(1, epochs + 1):
        set_epoch(bundle, epoch, seed)      # before iterating: order, augmentation, CRD negatives
        for img, target, index, sample_idx in bundle.train_loader: ...

Datasets: 'cifar100' (32x32, 100 classes, downloads when missing), 'tinyimagenet' (64x64, 200),
'imagenet' (224x224, class folders), 'digits' (32x32, 10, bundled with scikit-learn).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from helper.errors import UserError

from . import cifar100, digits, imagenet, tinyimagenet
from .common import seed_worker, torchvision_padding_mode, with_transform
from .sampling import ContrastiveSampleDataset, EpochKeyedSampler, IndexedDataset, SeededItems
from .strong_aug import WeakStrongDataset, strong_transform

DATASETS = ("cifar100", "tinyimagenet", "imagenet", "digits")
MODES = ("plain", "instance", "crd", "weak_strong")

__all__ = [
    "DATASETS", "MODES", "DataBundle", "DataInfo", "get_dataloaders", "get_datasets", "get_transforms", "set_epoch",
    "IndexedDataset", "ContrastiveSampleDataset", "MAIN_STREAM", "INIT_STREAM", "get_cifar100_dataloaders",
    "get_cifar100_dataloaders_sample",
]

_MODULES = {"cifar100": cifar100, "tinyimagenet": tinyimagenet, "imagenet": imagenet, "digits": digits}


@dataclass(frozen=True)
class DataInfo:
    """The facts of a data set that models and methods are sized by (known once it is read)."""

    num_classes: int
    n_data: int        # training images (CRD's memory bank, TDD's embeddings)
    image_size: int    # side of the (square) training images


@dataclass
class DataBundle:
    """Everything a training run needs from the data side.

    train_loader: shuffled, augmented; (img, target) for mode 'plain', (img, target, index) for
        'instance', (img, target, index, sample_idx) for 'crd', (img, target, index, img_strong) for
        'weak_strong' (dataset/strong_aug.py).
    val_loader: the evaluation split, test transform, no shuffle; (img, target). With a separate
        test split (test_loader not None) this is the model-selection split.
    train_eval_loader: train split, test transform, in order; (img, target, index).
    test_loader: None, or the held-out split reported at the model selected on val_loader
        (Tiny-ImageNet with split='letkd'); like val_loader.
    """

    train_loader: DataLoader
    val_loader: DataLoader
    train_eval_loader: DataLoader
    num_classes: int
    n_data: int
    image_size: int
    test_loader: DataLoader | None = None

    @property
    def info(self) -> DataInfo:
        """num_classes, n_data and image_size as one frozen record."""
        return DataInfo(self.num_classes, self.n_data, self.image_size)


def _check_name(dataset: str) -> None:
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def get_transforms(dataset: str, pad_mode: str = "zero", augment: str | None = None,
                   crop_size: int | None = None) -> tuple[Callable, Callable]:
    """(train_transform, test_transform) of a dataset; both map a PIL image to a normalised (3, S, S) tensor.

    augment: Tiny-ImageNet only, 'rotate' (default, the letKD authors') or 'crop'; see tinyimagenet.train_transform.
    crop_size: ImageNet only (default 224; test resize scaled as 256/224).
    """
    _check_name(dataset)
    torchvision_padding_mode(pad_mode)  # validates
    module = _MODULES[dataset]
    if crop_size is not None:
        if dataset != "imagenet":
            raise ValueError(f"crop_size is an ImageNet option, not {dataset}'s")
        return module.train_transform(pad_mode, crop_size), module.test_transform(crop_size)
    if dataset == "tinyimagenet":
        return module.train_transform(pad_mode, augment or "rotate"), module.test_transform()
    if augment is not None:
        raise ValueError(f"augment is a Tiny-ImageNet option; {dataset} has one augmentation")
    return module.train_transform(pad_mode), module.test_transform()


def get_datasets(
    dataset: str,
    data_folder: str | Path,
    train_tf: Callable | None = None,
    test_tf: Callable | None = None,
    download: bool = True,
) -> tuple[Dataset, Dataset]:
    """(train, test) datasets with items (img, target) and integer `targets`; `download` concerns CIFAR-100 only."""
    _check_name(dataset)
    if dataset == "cifar100":
        return cifar100.get_cifar100_datasets(data_folder, train_tf, test_tf, download=download)
    if dataset == "tinyimagenet":
        train_set, val_set, _ = tinyimagenet.get_tinyimagenet_datasets(data_folder, train_tf, test_tf)
        return train_set, val_set
    if dataset == "imagenet":
        return imagenet.get_imagenet_datasets(data_folder, train_tf, test_tf)
    return digits.get_digits_datasets(data_folder, train_tf, test_tf)


def get_dataloaders(
    dataset: str,
    data_folder: str,
    batch_size: int = 64,
    num_workers: int = 8,
    *,
    mode: str = "plain",
    pad_mode: str = "zero",
    download: bool = True,
    seed: int = 0,
    nce_k: int = 16384,
    crd_mode: str = "exact",
    percent: float = 1.0,
    test_batch_size: int | None = None,
    pin_memory: bool = False,
    drop_last: bool = False,
    augment: str | None = None,
    split: str = "val50",
    crop_size: int | None = None,
    persistent_workers: bool | None = None,
) -> DataBundle:
    """Build the train / val / train-eval loaders of `dataset` (see DataBundle for what they yield).

    mode: 'plain', 'instance', 'crd' (nce_k negatives, crd_mode 'exact'/'relax', percent of the
    negative pool) or 'weak_strong' (a second, strongly augmented view: dataset/strong_aug.py).
    test_batch_size defaults to batch_size // 2 (RepDistiller), at least 1; the
    val loader uses num_workers // 2 workers. drop_last: the train loader skips the last incomplete
    batch (the letKD/QUEST protocol: 781 iterations per CIFAR-100 epoch at batch 64).
    augment, split: Tiny-ImageNet's augmentation ('rotate'/'crop') and evaluation split
    ('val50': one evaluation set; 'letkd': val_loader for selection and test_loader for reporting).
    crop_size: ImageNet's crop (default 224). persistent_workers: keep worker processes between epochs
    (default: on for ImageNet with workers, where starting them costs seconds; off elsewhere, as before).
    A train loader with persistent workers seeds each item's augmentation from (the epoch's seed, index)
    (``EpochKeyedSampler`` + ``SeededItems``): its workers draw their own seeds only once, so this is what
    makes a resumed run's augmentation equal the uninterrupted run's. Loaders whose workers restart every
    epoch keep the worker seeding they always had (their numbers are unchanged).
    The train loader is seeded for epoch 0 here; call
    `set_epoch(bundle, epoch, seed)` before each epoch for reproducible, resumable runs.
    With num_workers=0 augmentation draws from the global torch RNG (seed it in the caller).
    """
    _check_name(dataset)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if split != "val50" and dataset != "tinyimagenet":
        raise ValueError(f"split {split!r} is a Tiny-ImageNet option")
    train_tf, test_tf = get_transforms(dataset, pad_mode, augment, crop_size)
    held_out = None
    if dataset == "tinyimagenet":
        train_set, test_set, held_out = tinyimagenet.get_tinyimagenet_datasets(data_folder, train_tf, test_tf, split)
    else:
        train_set, test_set = get_datasets(dataset, data_folder, train_tf, test_tf, download=download)
    if drop_last and len(train_set) < batch_size:  # type: ignore[arg-type]
        raise UserError(f"drop_last with batch size {batch_size} leaves no batch of the {len(train_set)} "  # type: ignore[arg-type]
                        "training images; lower --batch_size")
    eval_set = IndexedDataset(with_transform(train_set, test_tf))

    if mode == "instance":
        train_items: Dataset = IndexedDataset(train_set)
    elif mode == "crd":
        train_items = ContrastiveSampleDataset(train_set, k=nce_k, mode=crd_mode, percent=percent, seed=seed)
    elif mode == "weak_strong":
        train_items = WeakStrongDataset(with_transform(train_set, None), train_tf, strong_transform(train_tf))
    else:
        train_items = train_set

    if test_batch_size is None:
        test_batch_size = max(1, batch_size // 2)
    if persistent_workers is None:
        persistent_workers = dataset == "imagenet"

    def workers(n: int, keep: bool = persistent_workers) -> dict:
        return dict(num_workers=n, persistent_workers=keep and n > 0)

    common = dict(pin_memory=pin_memory, worker_init_fn=seed_worker)
    if persistent_workers and num_workers > 0:
        # the order from a generator of its own (the loader's generator also feeds the workers' base seeds,
        # drawn when the workers start: once per run here, so sharing it would shift the order after a resume)
        keyed = SeededItems(train_items)
        train_loader = DataLoader(keyed, batch_size=batch_size, generator=torch.Generator(), drop_last=drop_last,
                                  sampler=EpochKeyedSampler(RandomSampler(keyed, generator=torch.Generator())),
                                  **workers(num_workers), **common)
    else:
        train_loader = DataLoader(train_items, batch_size=batch_size, shuffle=True, generator=torch.Generator(),
                                  drop_last=drop_last, **workers(num_workers), **common)
    # the evaluation loaders get generators of their own: without one, each iteration draws its workers' base
    # seed from the global torch RNG, so an offline stage that reads train_eval_loader only when its cache is
    # missing would change the augmentation of the training run that follows
    evaluation = dict(batch_size=test_batch_size, shuffle=False, **common)
    val_loader = DataLoader(test_set, generator=torch.Generator(), **workers(num_workers // 2), **evaluation)
    test_loader = None if held_out is None else DataLoader(
        held_out, generator=torch.Generator(), **workers(num_workers // 2, keep=False), **evaluation)
    # read once (offline stages): its workers are not kept
    train_eval_loader = DataLoader(eval_set, generator=torch.Generator(), **workers(num_workers, keep=False),
                                   **evaluation)
    bundle = DataBundle(
        train_loader=train_loader,
        val_loader=val_loader,
        train_eval_loader=train_eval_loader,
        num_classes=len(train_set.classes),  # type: ignore[attr-defined]
        n_data=len(train_set),  # type: ignore[arg-type]
        image_size=crop_size or _MODULES[dataset].IMAGE_SIZE,
        test_loader=test_loader,
    )
    set_epoch(bundle, 0, seed)
    return bundle


# Streams of set_epoch: the main training stage and the init stage of AB/FT/FSP draw different
# orders and augmentations for the same epoch number.
MAIN_STREAM = 0
INIT_STREAM = 1


def epoch_seed(seed: int, epoch: int, stream: int = MAIN_STREAM) -> int:
    """A 63-bit torch seed derived from (seed, epoch, stream) through numpy's SeedSequence.

    The main stream keeps the key (seed, epoch, 0x10AD); other streams append their number.
    """
    key = [int(seed), int(epoch), 0x10AD] + ([int(stream)] if stream != MAIN_STREAM else [])
    lo, hi = np.random.SeedSequence(key).generate_state(2, dtype=np.uint32)
    return (int(hi) << 31) ^ int(lo)


def set_epoch(bundle_or_loader: DataBundle | DataLoader, epoch: int, seed: int, stream: int = MAIN_STREAM) -> None:
    """Make the next iteration of the train loader a pure function of (seed, epoch, stream).

    Reseeds the loader's generator in place (shuffling order and the worker seeds that drive
    augmentation) and calls `dataset.set_epoch(epoch)` when the dataset has one (CRD negatives). A loader
    whose sampler is an `EpochKeyedSampler` (persistent workers) gets its order generator reseeded and the
    epoch's seed handed to every item (its augmentation seed).
    Call it before creating the epoch's iterator. Accepts a DataBundle (its train_loader) or a loader;
    a device-resident loader (dataset.device_data) reseeds its own generator the same way.
    stream: MAIN_STREAM for the training epochs, INIT_STREAM for an init stage (AB/FT/FSP), so the
    init stage's epoch e does not replay the main stage's epoch e. CRD negatives depend on the epoch only.
    """
    loader = bundle_or_loader.train_loader if isinstance(bundle_or_loader, DataBundle) else bundle_or_loader
    own_set_epoch = getattr(loader, "set_epoch", None)  # a loader that reseeds itself (dataset.device_data)
    if callable(own_set_epoch):
        own_set_epoch(epoch, seed, stream)
        return
    if loader.generator is None:
        raise ValueError("this DataLoader has no generator to reseed; build it with generator=torch.Generator()")
    if seed < 0 or epoch < 0 or stream < 0:
        raise ValueError(f"seed, epoch and stream must be >= 0, got seed={seed}, epoch={epoch}, stream={stream}")
    seed_value = epoch_seed(seed, epoch, stream)
    keyed = loader.sampler if isinstance(loader.sampler, EpochKeyedSampler) else None
    sampler = keyed.sampler if keyed is not None else loader.sampler
    if isinstance(sampler, DistributedSampler):  # under torchrun: the shard's order, and a stream per rank
        sampler.set_epoch(epoch)
        seed_value = (seed_value + 0x9E3779B97F4A7C15 * sampler.rank) % 2**63
    elif isinstance(sampler, RandomSampler) and keyed is not None and sampler.generator is not None:
        sampler.generator.manual_seed(seed_value)
    if keyed is not None:
        keyed.set_key(epoch, seed_value)
    loader.generator.manual_seed(seed_value)
    dataset_set_epoch = getattr(loader.dataset, "set_epoch", None)
    if callable(dataset_set_epoch):
        dataset_set_epoch(epoch)


# RepDistiller's CIFAR-100 loader functions (dataset/cifar100.py there): thin wrappers over get_dataloaders

def get_cifar100_dataloaders(
    batch_size: int = 128,
    num_workers: int = 8,
    is_instance: bool = False,
    *,
    data_folder: str | Path = "./data",
    pad_mode: str = "zero",
    download: bool = True,
    seed: int = 0,
) -> tuple[DataLoader, DataLoader] | tuple[DataLoader, DataLoader, int]:
    """RepDistiller's loader pair: (train, test), or (train, test, n_data) when is_instance.

    Train items are (img, target), or (img, target, index) when is_instance; the test loader
    uses batch_size // 2 and yields (img, target).
    """
    bundle = get_dataloaders(
        "cifar100", str(data_folder), batch_size, num_workers,
        mode="instance" if is_instance else "plain", pad_mode=pad_mode, download=download, seed=seed,
    )
    if is_instance:
        return bundle.train_loader, bundle.val_loader, bundle.n_data
    return bundle.train_loader, bundle.val_loader


def get_cifar100_dataloaders_sample(
    batch_size: int = 128,
    num_workers: int = 8,
    k: int = 4096,
    mode: str = "exact",
    is_sample: bool = True,
    percent: float = 1.0,
    *,
    data_folder: str | Path = "./data",
    pad_mode: str = "zero",
    download: bool = True,
    seed: int = 0,
) -> tuple[DataLoader, DataLoader, int]:
    """RepDistiller's CRD loaders: (train, test, n_data); train items (img, target, index, sample_idx).

    With is_sample=False the train items are (img, target, index).
    """
    bundle = get_dataloaders(
        "cifar100", str(data_folder), batch_size, num_workers,
        mode="crd" if is_sample else "instance", pad_mode=pad_mode, download=download, seed=seed,
        nce_k=k, crd_mode=mode, percent=percent,
    )
    return bundle.train_loader, bundle.val_loader, bundle.n_data
