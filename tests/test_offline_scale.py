"""The offline stage at ImageNet scale, scaled down: bounded memory while streaming far more positions than
--max_positions, the peak of building both quantizers (LDA included) against ``offline_memory_bound``, and
LDA + per-class k-means at 1000 classes."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from helper.letkd_offline import OfflineSettings, _PositionSink, build_subclasses, ensure_quantizers, offline_memory_bound
from helper.util import load_checkpoint

TOTAL, DIM, MAX_POSITIONS, BATCH_ROWS = 2_000_000, 16, 20_000, 4096


def test_position_sampling_memory_is_bounded_by_max_positions() -> None:
    """Streaming 2M positions x 16 channels (122 MiB as float32) keeps <= 20k rows: the peak stays under
    max_positions x (4 D + 8 + 8) bytes (rows, labels, kept indices) + 3 batches + 1 MiB."""
    tracemalloc.start()
    rng = np.random.default_rng(0)
    sink = _PositionSink(TOTAL, DIM, MAX_POSITIONS, np.random.default_rng(1))
    for start in range(0, TOTAL, BATCH_ROWS):
        n = min(BATCH_ROWS, TOTAL - start)
        rows = rng.standard_normal((n, DIM), dtype=np.float32)
        sink.add(rows, np.full(n, start % 1000, np.int64))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    bound = MAX_POSITIONS * (4 * DIM + 16) + 3 * BATCH_ROWS * (4 * DIM + 8) + 2**20
    full = TOTAL * DIM * 4
    print(f'peak {peak / 2**20:.2f} MiB, bound {bound / 2**20:.2f} MiB, all positions {full / 2**20:.0f} MiB')
    assert sink.seen == TOTAL and sink.filled == MAX_POSITIONS
    assert peak < bound < full / 20


def test_lda_and_subclass_kmeans_at_1000_classes() -> None:
    """letKD-2's intermediate quantizer for 1000 classes (8000 x 8000 scores at K_inter 8; 2 here for speed)."""
    torch.manual_seed(0)
    classes, per_class, dim, k_inter = 1000, 6, 48, 2
    labels = np.repeat(np.arange(classes), per_class)
    means = np.random.default_rng(0).standard_normal((classes, dim)).astype(np.float32) * 3
    features = (means[labels] + np.random.default_rng(1).standard_normal((len(labels), dim))).astype(np.float32)
    tensors, extra = build_subclasses(features, labels, classes, k_inter, 60, seed=0, device=torch.device('cpu'))
    assert extra['n_comp'] == min(60, dim)
    assert tensors['centroids'].shape == (classes * k_inter, extra['n_comp'])
    scores = tensors['scores']
    assert scores.shape == (classes * k_inter, classes * k_inter)
    torch.testing.assert_close(scores.sum(1), torch.ones(classes * k_inter))
    assert int(tensors['counts'].sum()) == len(labels)


# ---------------------------------------------------------------------------------------------- both quantizers

SCALE = dict(images=1500, classes=100, channels=64, batch=250, max_positions=80_000, k_penult=64, k_inter=8,
             lda_dim=8)


class TwoStageTeacher(nn.Module):
    """Stands at resnet8's KD places: 'layer3.0' (inter) and 'layer3' (penult), each a fixed random 1x1 conv
    + ReLU, 64 channels, 8x8 maps."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        convs = [nn.Conv2d(channels, channels, 1) for _ in range(2)]
        for conv in convs:
            conv.weight.data = torch.randn(channels, channels, 1, 1, generator=g) / channels ** 0.5
            conv.bias.data.zero_()
        self.layer3 = nn.Sequential(*(nn.Sequential(conv, nn.ReLU()) for conv in convs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(x)


class GeneratedBatches:
    """The same seeded batches on every pass (images: a class pattern plus noise), made on the fly so that the
    data set itself takes no memory."""

    def __init__(self, images: int, classes: int, channels: int, batch: int) -> None:
        self.dataset = range(images)
        self.batch = batch
        self.classes = classes
        self.patterns = torch.randn(classes, channels, 1, 1, generator=torch.Generator().manual_seed(1))

    def __iter__(self):
        g = torch.Generator().manual_seed(2)
        for start in range(0, len(self.dataset), self.batch):
            labels = torch.arange(start, min(start + self.batch, len(self.dataset))) % self.classes
            yield self.patterns[labels] + torch.randn(len(labels), self.patterns.shape[1], 8, 8, generator=g), labels


@pytest.mark.parametrize('backend', ['torch', 'faiss'])
def test_building_both_quantizers_stays_within_the_documented_bound(tmp_path: Path, backend: str) -> None:
    """Both layers missing: 1500 images x 8x8 = 96k positions per layer, 80k sampled, 64 channels (19.5 MiB
    per layer), LDA to 8 components, 100 classes x 8 sub-classes, K = 64. The traced peak stays under
    ``offline_memory_bound`` (without the chunk working memory, which tracemalloc cannot see) and under the
    two layers' features together: one layer is held at a time."""
    if backend == 'faiss':
        pytest.importorskip('faiss')                    # imported before the measurement starts
    c = SCALE
    teacher_path = tmp_path / 'resnet8_vanilla' / 'ckpt_epoch_240.pth'
    teacher_path.parent.mkdir()
    teacher_path.write_bytes(b'a teacher file: only its sha256 is used here')
    settings = OfflineSettings(k_penult=c['k_penult'], k_inter=c['k_inter'], lda_dim=c['lda_dim'], seed=0,
                               max_positions=c['max_positions'], kmeans_backend=backend)
    loader = GeneratedBatches(c['images'], c['classes'], c['channels'], c['batch'])
    teacher = TwoStageTeacher(c['channels'])
    tracemalloc.start()
    tensors = ensure_quantizers(teacher, teacher_arch='resnet8', teacher_path=teacher_path, roles=('inter', 'penult'),
                                pool_sizes={'inter': (8, 8), 'penult': (8, 8)}, loader=loader, dataset='cifar100',
                                num_classes=c['classes'], settings=settings, cache_dir=tmp_path / 'cache',
                                device=torch.device('cpu'))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rows, dim = c['max_positions'], c['channels']
    bound = offline_memory_bound(rows, dim, total_positions=c['images'] * 64, batch_rows=c['batch'] * 64,
                                 k_penult=c['k_penult'], n_comp=c['lda_dim'], num_classes=c['classes'],
                                 num_subclasses=c['classes'] * c['k_inter'], faiss=backend == 'faiss', chunk_bytes=0)
    one_layer = rows * dim * 4
    print(f'{backend}: traced peak {peak / 2**20:.2f} MiB, bound {bound / 2**20:.2f} MiB, '
          f'one layer\'s features {one_layer / 2**20:.2f} MiB')
    assert one_layer < peak <= bound < 2 * one_layer
    assert tensors['inter']['scores'].shape == (800, 800) and tensors['penult']['centroids'].shape == (64, 64)
    metas = [load_checkpoint(p)['meta'] for p in sorted((tmp_path / 'cache' / 'letkd').glob('*.pth'))]
    assert [m['n_positions'] for m in metas] == [rows, rows] and {m['kmeans_backend'] for m in metas} == {f'{backend}-cpu'}
