"""No host sync in a training step: every registered method's ``forward_train`` + ``backward`` runs
without an op that makes the host wait for the device (``.item()``, ``bool(tensor)``, ``nonzero``,
``equal``, a device-to-host copy).

The syncing ops are counted with a dispatch mode on CPU tensors (on CPU they do not block, but they are
the same aten calls that block on CUDA). The step counted is the second one: the first may fix
one-time state and print it (CRD's normalisers Z), as a print step may.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from distiller_zoo import DISTILLERS, build_distiller
from models import create_model
from helper.sync_counter import SyncCounter
from tests.fixtures_data import load_random_quantizers
from tests.options import data_info, student_options

# methods that cannot avoid a sync in a training step, and the ops that are allowed to sync there
UNAVOIDABLE: dict[str, set[str]] = {
    'kdsvd': {'aten._linalg_svd'},    # KDSVD's loss is built on the SVD of the feature maps (one per stage)
}

NUM_CLASSES, N_DATA, BATCH = 10, 40, 4


def build(method: str) -> Any:
    """``method`` for resnet14 -> resnet8 on 10 classes, small sizes, offline stages replaced by random ones."""
    torch.manual_seed(0)
    opt = student_options(method, model_s='resnet8', model_t='resnet14', dataset='cifar100', path_t=None,
                          feat_dim=16, nce_k=8, k_penult=16, k_inter=2, lda_dim=5, hint_layer=2, seed=0)
    distiller = build_distiller(method, create_model('resnet8', NUM_CLASSES), create_model('resnet14', NUM_CLASSES),
                                opt, data_info(num_classes=NUM_CLASSES, n_data=N_DATA))
    if hasattr(distiller, 'quantizers'):
        load_random_quantizers(distiller, n_comp=3)
    if hasattr(distiller, 'set_partitions'):
        distiller.set_partitions([[list(range(g, NUM_CLASSES, m)) for g in range(m)] for m in (2, 5, 10)])
    return distiller.train()


def training_step(distiller: Any, seed: int) -> None:
    """The loop's step without the optimizer: forward_train with the loop's extras, summed losses, backward."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(BATCH, 3, 32, 32, generator=g)
    target = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
    index = torch.randint(0, N_DATA, (BATCH,), generator=g)
    contrast_idx = torch.randint(0, N_DATA, (BATCH, 9), generator=g)
    contrast_idx[:, 0] = index
    image_strong = torch.randn(BATCH, 3, 32, 32, generator=g)     # the second view of the 'weak_strong' mode (mlkd)
    _, losses = distiller.forward_train(image, target, index=index, contrast_idx=contrast_idx, image_strong=image_strong)
    loss = sum(losses.values())
    loss.backward()


def test_the_counter_sees_the_syncs_it_is_meant_to_see():
    x = torch.randn(5)
    with SyncCounter(kernel_syncs=True) as counter:
        torch.linalg.svd(torch.randn(3, 3))
        torch.bincount(torch.tensor([0, 2, 2]), minlength=4)
        x.sum().item()
        if (x > 10).any():
            pass
        torch.nonzero(x > 0)
        torch.equal(x, x)
        float(x.max())
    ops = counter.ops
    assert ops['aten._local_scalar_dense'] >= 3 and ops['aten._linalg_svd'] == 1
    assert ops['aten.nonzero'] == 1 and ops['aten.equal'] == 1 and ops['aten.bincount'] == 1


@pytest.mark.parametrize('method', sorted(DISTILLERS))
def test_a_training_step_does_not_sync(method):
    distiller = build(method)
    training_step(distiller, seed=0)            # the first step may fix one-time state (CRD's Z) and print it
    with SyncCounter(kernel_syncs=True) as counter:
        training_step(distiller, seed=1)
    allowed = UNAVOIDABLE.get(method, set())
    assert set(counter.ops) == allowed, f'{method} syncs in a training step: {counter.summary()}'
    distiller.epoch_metrics()                    # the epoch end may sync; it still works after the step


def test_letkd_metrics_are_accumulated_on_the_device_and_read_at_the_epoch_end():
    distiller = build('letkd2')
    for seed in range(3):
        training_step(distiller, seed)
    metrics = distiller.epoch_metrics()
    assert {f'{m}_{r}' for m in ('kl', 'agree', 'perplexity', 'teacher_maxprob') for r in ('inter', 'penult')} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    assert 0.0 <= metrics['agree_penult'] <= 100.0 and metrics['perplexity_penult'] >= 1.0
    assert distiller.epoch_metrics() == {}      # reset
