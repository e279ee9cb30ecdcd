"""Teachers given by name from torchvision's ImageNet weights: ``--path_t torchvision:ResNet34``.

The weights are torchvision's ``IMAGENET1K_V1`` (the 73.31 / 76.13 top-1 teachers of the letKD paper's
Table 2; ``weights="DEFAULT"`` would give ResNet50's V2 weights, 80.86). They are fetched through
torchvision's weights API into torch hub's cache (``$TORCH_HOME/hub/checkpoints``), their file hash
checked against the hash in the file name, and loaded with ``weights_only=True``; then loaded strictly
into the zoo's ImageNet model of the same name (same state_dict keys as torchvision's).

A torchvision teacher has no local file of ours, so the letKD/QUEST/TDD caches identify it by
``teacher_identity``: the sha256 of the weights' URL, which itself carries the file's hash prefix.
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable

import torch

from helper.errors import UserError

PREFIX = 'torchvision:'
# zoo name -> (torchvision weights enum name); IMAGENET1K_V1 is the member used
TORCHVISION_WEIGHTS = {'ResNet18': 'ResNet18_Weights', 'ResNet34': 'ResNet34_Weights',
                       'ResNet50': 'ResNet50_Weights'}
WEIGHTS_MEMBER = 'IMAGENET1K_V1'


def is_torchvision_teacher(path_t: str | os.PathLike | None) -> bool:
    """True for ``torchvision:<name>``."""
    return isinstance(path_t, str) and path_t.startswith(PREFIX)


def torchvision_teacher_name(path_t: str) -> str:
    """The zoo name in ``torchvision:<name>``; UserError for a name torchvision has no weights for here."""
    name = path_t[len(PREFIX):]
    if name not in TORCHVISION_WEIGHTS:
        raise UserError(f"--path_t {path_t}: no torchvision weights for {name!r}; "
                        f"choose one of: {', '.join(PREFIX + n for n in TORCHVISION_WEIGHTS)}")
    return name


def torchvision_weights(name: str):  # -> torchvision.models.WeightsEnum member
    """torchvision's IMAGENET1K_V1 weights entry of the zoo name ``name``."""
    import torchvision.models as tvm
    return getattr(getattr(tvm, TORCHVISION_WEIGHTS[name]), WEIGHTS_MEMBER)


def _download_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Fetch (or read from the hub cache) and load safely: hash checked, weights_only=True."""
    return torchvision_weights(name).get_state_dict(progress=True, check_hash=True, weights_only=True,
                                                   map_location='cpu')


# tests replace this (nothing downloads in tests)
state_dict_loader: Callable[[str], dict[str, torch.Tensor]] = _download_state_dict


def load_torchvision_state_dict(path_t: str) -> dict[str, torch.Tensor]:
    """The state_dict of ``torchvision:<name>``; UserError when it cannot be fetched."""
    name = torchvision_teacher_name(path_t)
    try:
        return state_dict_loader(name)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; hash mismatch a RuntimeError
        raise UserError(f"cannot load torchvision's {name} {WEIGHTS_MEMBER} weights ({err}); without network "
                        f"access put the file {torchvision_weights(name).url.rsplit('/', 1)[-1]} into "
                        "$TORCH_HOME/hub/checkpoints/") from err


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (read in 1 MiB blocks); identifies a teacher checkpoint in cache metadata."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def teacher_exists(path_t: str | os.PathLike | None) -> bool:
    """A teacher checkpoint file that exists, or a ``torchvision:<name>`` teacher."""
    return path_t is not None and (is_torchvision_teacher(path_t) or os.path.isfile(path_t))


def teacher_identity(path_t: str | os.PathLike) -> str:
    """A sha256 that identifies the teacher's weights: the file's, or for ``torchvision:<name>`` the URL's."""
    if is_torchvision_teacher(path_t):
        url = torchvision_weights(torchvision_teacher_name(str(path_t))).url
        return hashlib.sha256(url.encode()).hexdigest()
    return file_sha256(path_t)
