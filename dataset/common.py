"""Small pieces shared by the dataset modules: padding modes, transform swaps, worker seeding."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
from torchvision import transforms

from helper.errors import UserError

# Our --pad_mode names -> torchvision's RandomCrop padding_mode.
PAD_MODES: dict[str, str] = {"zero": "constant", "reflect": "reflect"}

D = TypeVar("D")


def torchvision_padding_mode(pad_mode: str) -> str:
    """Map 'zero' -> 'constant' and 'reflect' -> 'reflect'; anything else is a ValueError."""
    try:
        return PAD_MODES[pad_mode]
    except KeyError:
        raise ValueError(f"pad_mode must be one of {sorted(PAD_MODES)}, got {pad_mode!r}") from None


def padded_random_crop(size: int, pad_mode: str = "zero", padding: int = 4) -> transforms.RandomCrop:
    """RandomCrop(size, padding) whose border is zeros ('zero') or a mirror image ('reflect')."""
    return transforms.RandomCrop(size, padding=padding, padding_mode=torchvision_padding_mode(pad_mode))


def normalized_tensor(mean: tuple[float, ...], std: tuple[float, ...]) -> list[Callable]:
    """The ToTensor + Normalize tail every pipeline ends with (PIL HxWx3 -> float 3xHxW)."""
    return [transforms.ToTensor(), transforms.Normalize(mean, std)]


def with_transform(dataset: D, transform: Callable | None) -> D:
    """A shallow copy of a torchvision-style dataset that applies `transform` instead.

    The copy shares the (possibly large) sample list / pixel array with the original, so
    the same split can be served with and without augmentation without reading it twice.
    """
    clone = copy.copy(dataset)
    clone.transform = transform
    if hasattr(clone, "transforms"):  # torchvision VisionDataset keeps a combined wrapper too
        from torchvision.datasets.vision import StandardTransform

        clone.transforms = StandardTransform(transform, getattr(clone, "target_transform", None))
    return clone


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: seed Python's and NumPy's global RNGs from the worker's torch seed.

    torch gives every worker the seed base_seed + worker_id, where base_seed comes from the
    loader's generator, so this makes any python/numpy randomness in transforms reproducible too.
    """
    seed = torch.initial_seed()
    random.seed(seed)
    np.random.seed(seed % 2**32)


def require_dir(path: Path, what: str, hint: str) -> None:
    """Raise UserError('<what> not found: <path> is missing; <hint>') unless `path` is a folder."""
    if not path.is_dir():
        raise UserError(f"{what} not found: {path} is missing or not a folder; {hint}")


def require_file(path: Path, what: str, hint: str) -> None:
    """Raise UserError naming `path` unless it is an existing file."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path} is missing; {hint}")
