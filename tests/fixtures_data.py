"""Test helpers: the generated data sets (dataset/generated.py, re-exported here), a published-style teacher,
a few training/quantizer shortcuts and a thread-count context."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from dataset.generated import (read_cifar100_split, tinyimagenet_val_labels, write_cifar100,  # noqa: F401
                               write_imagenet_folders, write_tinyimagenet)


def write_vanilla_teacher(root: str | Path, name: str, num_classes: int = 100, seed: int = 0) -> Path:
    """A randomly initialised ``name`` saved like RepDistiller's published teachers:
    ``root/<name>_vanilla/ckpt_epoch_240.pth`` holding ``{'model': state_dict}``. Returns the file."""
    import torch

    from models import create_model
    folder = Path(root) / f"{name}_vanilla"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    path = folder / "ckpt_epoch_240.pth"
    torch.save({"model": create_model(name, num_classes).state_dict()}, path)
    return path


def train_on_fixed_batch(distiller, x, y, steps: int = 15, lr: float = 0.05) -> list[dict[str, float]]:
    """``steps`` SGD steps (momentum 0.9) of ``distiller.forward_train`` on one batch; per step the
    value of every named loss and of their sum under 'total'."""
    import torch

    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=lr, momentum=0.9)
    distiller.train()
    history = []
    for _ in range(steps):
        _, losses = distiller.forward_train(x, y)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({'total': loss.item(), **{k: v.item() for k, v in losses.items()}})
    return history


def load_random_quantizers(distiller, n_comp: int = 5, seed: int = 0) -> None:
    """Fill a letKD/QUEST Distiller's quantizers with random tensors of the right shapes (random
    centroids, LDA scalings/xbar, row-stochastic s_T), instead of running the offline step."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for role, quantizer in distiller.quantizers.items():
        dim = distiller.teacher_shapes[role][0]
        if role == 'penult':
            quantizer.load({'centroids': torch.rand(quantizer.centroids.shape[0], dim, generator=g)})
        else:
            s = quantizer.num_subclasses
            quantizer.load({'scalings': torch.randn(dim, n_comp, generator=g), 'xbar': torch.rand(dim, generator=g),
                            'centroids': torch.randn(s, n_comp, generator=g),
                            'scores': torch.rand(s, s, generator=g).softmax(1)})


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Small convolutions run several times faster on one intra-op thread when the CPUs are shared;
    the previous thread count is restored on exit."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
