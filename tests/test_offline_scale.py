"""The offline stage at ImageNet scale, scaled down: bounded memory while streaming far more positions than
--max_positions, and LDA + per-class k-means at 1000 classes."""
from __future__ import annotations

import tracemalloc

import numpy as np
import torch

from helper.letkd_offline import _PositionSink, build_subclasses

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
