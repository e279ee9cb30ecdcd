"""Data-side determinism at ImageNet scale: exact resume with persistent loader workers, per-item augmentation
seeds, and CRD's int32 negative pools (the same draws as int64 pools, half the memory)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import helper.run as run_module
import train_teacher
from dataset import get_dataloaders, set_epoch
from dataset.sampling import ContrastiveIndexSampler
from tests.fixtures_data import write_imagenet_folders


@pytest.fixture(scope='module')
def imagenet(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp('imagenet_resume')
    write_imagenet_folders(root, num_classes=3, n_per_class=4, size=40)
    return str(root)


def teacher_argv(data: str, save: Path) -> list[str]:
    return ['--model', 'resnet8', '--dataset', 'imagenet', '--data_folder', data, '--save_dir', str(save),
            '--crop_size', '24', '--batch_size', '4', '--num_workers', '2', '--epochs', '2', '--device', 'cpu',
            '--print_freq', '0']


def test_imagenet_resume_with_persistent_workers_equals_the_uninterrupted_run(imagenet, tmp_path, monkeypatch):
    """2 persistent loader workers (ImageNet's default): a run stopped after epoch 1 and resumed ends with the
    weights of the uninterrupted run. The workers' own RNG seeds are drawn once per run, so before per-item
    seeding the resumed epoch 2 cropped and flipped differently (and, sharing the order's generator, shuffled
    differently)."""
    torch.set_num_threads(1)
    whole, cut = tmp_path / 'whole', tmp_path / 'cut'
    assert train_teacher.cli(teacher_argv(imagenet, whole)) == 0
    real = run_module.train_one_epoch

    def dies_in_epoch_2(*args, epoch, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(run_module, 'train_one_epoch', dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_teacher.cli(teacher_argv(imagenet, cut))
    monkeypatch.setattr(run_module, 'train_one_epoch', real)
    assert train_teacher.cli(teacher_argv(imagenet, cut) + ['--resume']) == 0

    folder = 'resnet8_imagenet_lr_0.05_decay_0.0005_trial_0'
    expected = torch.load(whole / 'models' / folder / 'last.pth', weights_only=True)
    resumed = torch.load(cut / 'models' / folder / 'last.pth', weights_only=True)
    assert resumed['epoch'] == expected['epoch'] == 2
    for key, value in expected['model'].items():
        assert torch.equal(resumed['model'][key], value), f'{key} differs from the uninterrupted run'


def batch_pixels(loader) -> list[torch.Tensor]:
    return [batch[0] for batch in loader]


def test_keyed_items_do_not_depend_on_worker_count_or_on_earlier_epochs(imagenet):
    """Epoch e's batches are a function of (seed, e): the same with workers that persist from epoch 1 and with
    fresh ones; an item's augmentation does not depend on the process that loads it."""
    from dataset.sampling import EpochKeyedSampler, SeededItems
    def loader(workers: int, persistent: bool):
        return get_dataloaders('imagenet', imagenet, 4, workers, crop_size=16, seed=3,
                               persistent_workers=persistent).train_loader

    kept = loader(2, True)
    assert isinstance(kept.sampler, EpochKeyedSampler) and isinstance(kept.dataset, SeededItems)
    set_epoch(kept, 1, 3)
    batch_pixels(kept)
    set_epoch(kept, 2, 3)
    epoch2_kept = batch_pixels(kept)
    fresh = loader(2, True)
    set_epoch(fresh, 2, 3)
    epoch2_fresh = batch_pixels(fresh)
    assert len(epoch2_kept) == 3
    for a, b in zip(epoch2_kept, epoch2_fresh):
        assert torch.equal(a, b)
    set_epoch(fresh, 1, 3)
    assert not torch.equal(batch_pixels(fresh)[0], epoch2_fresh[0])     # another epoch, other batches
    # the items' augmentation seeds do not depend on which worker loads them: the main process gives the same
    keyed = kept.dataset
    item = keyed[(2, 12345, 5)]
    assert torch.equal(item[0], keyed[(2, 12345, 5)][0]) and item[1] == keyed.base[5][1]


def test_loaders_without_persistent_workers_are_unchanged(imagenet):
    """CIFAR-100, Tiny-ImageNet and digits (workers restart every epoch) keep their plain sampler: their
    numbers do not move."""
    from dataset.sampling import EpochKeyedSampler, SeededItems
    loader = get_dataloaders('imagenet', imagenet, 4, 2, crop_size=16, persistent_workers=False).train_loader
    assert not isinstance(loader.sampler, EpochKeyedSampler) and not isinstance(loader.dataset, SeededItems)


def test_crd_pools_are_int32_and_draw_what_int64_pools_draw():
    labels = np.random.default_rng(0).integers(0, 7, size=500)
    for mode, percent in (('exact', 1.0), ('relax', 1.0), ('exact', 0.5)):
        sampler = ContrastiveIndexSampler(labels, k=64, mode=mode, percent=percent, seed=4)
        assert all(a.dtype == np.int32 for a in sampler.cls_negative + sampler.cls_positive)
        wide = ContrastiveIndexSampler(labels, k=64, mode=mode, percent=percent, seed=4)
        wide.cls_negative = [a.astype(np.int64) for a in wide.cls_negative]
        wide.cls_positive = [a.astype(np.int64) for a in wide.cls_positive]
        for epoch in (0, 3):
            sampler.set_epoch(epoch)
            wide.set_epoch(epoch)
            for index in (0, 17, 499):
                drawn = sampler(index)
                assert drawn.dtype == np.int64 and np.array_equal(drawn, wide(index))
        pools = sum(a.nbytes for a in sampler.cls_negative)
        assert pools == 4 * sum(a.size for a in sampler.cls_negative)      # half of int64's bytes
