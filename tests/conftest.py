"""Shared pytest fixtures: tiny on-disk data sets in the real formats (see tests/fixtures_data.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`) does not add the repo root
    sys.path.insert(0, str(ROOT))

from tests.fixtures_data import write_cifar100, write_tinyimagenet, write_vanilla_teacher  # noqa: E402


@pytest.fixture(scope="session")
def cifar100_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data_folder holding cifar-100-python/ with 2 train and 1 test image per class (100 classes)."""
    root = tmp_path_factory.mktemp("cifar100_data")
    write_cifar100(root)
    return root


@pytest.fixture(scope="session")
def tinyimagenet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data_folder holding tiny-imagenet-200/ with 3 classes, 2 train and 1 val image each."""
    root = tmp_path_factory.mktemp("tinyimagenet_data")
    write_tinyimagenet(root)
    return root


@pytest.fixture(scope="session")
def data_dir(cifar100_dir: Path) -> str:
    """``cifar100_dir`` as the string the CLIs take for --data_folder."""
    return str(cifar100_dir)


@pytest.fixture(scope="session")
def vanilla_teacher(tmp_path_factory: pytest.TempPathFactory):
    """``vanilla_teacher(name)``: the path of a random ``<name>_vanilla/ckpt_epoch_240.pth`` (100 classes),
    written once per session."""
    root = tmp_path_factory.mktemp("teachers")
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            made[name] = write_vanilla_teacher(root, name)
        return made[name]

    return make


@pytest.fixture(autouse=True)
def _restore_torch_numerics():
    """Runs in this process must not inherit another test's process-wide numerics: the fast path sets the
    float32 matmul precision and TF32 flags, --deterministic switches deterministic algorithms on, some tests
    change the thread count. Each test starts from the state the session started with."""
    import torch
    state = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32, torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    yield
    torch.set_float32_matmul_precision(state[0])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = state[1], state[2]
    torch.use_deterministic_algorithms(state[3])
    if torch.get_num_threads() != state[4]:
        torch.set_num_threads(state[4])
