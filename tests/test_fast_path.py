"""The fast path changes speed, not the method: device-resident data with torchvision's augmentation
distribution and pixels, CRD sampling semantics, epoch-seeded batches, a training step without host syncs,
the same meters and weights as the reference loop, compile / bf16 / channels_last, its flags and resume."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms

import train_teacher
from dataset import cifar100, get_dataloaders, set_epoch, tinyimagenet
from dataset.device_data import DEVICE_MODES, Augmentation, DeviceCRDSampler, DeviceTrainLoader, device_bundle
from distiller_zoo.registry import DISTILLERS
from helper.errors import UserError
from helper.loops import (FastOptions, FastTrainer, LossNotFinite, configure_fast_path, train_one_epoch,
                          train_one_epoch_fast)
from models import create_model
from tests.fixtures_data import write_cifar100, write_tinyimagenet
from tests.options import student_options
from helper.compile_counter import CompileCounter
from helper.sync_counter import SyncCounter

CPU = torch.device('cpu')


def random_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def loader(images: np.ndarray, targets, augmentation: Augmentation, **kw) -> DeviceTrainLoader:
    kw.setdefault('batch_size', 8)
    return DeviceTrainLoader(images, targets, mean=cifar100.MEAN, std=cifar100.STD, augmentation=augmentation,
                             device=CPU, **kw)


# ----------------------------------------------------------------------------------- augmentation
def test_crop_offsets_uniform_over_81_positions_and_flip_rate_half():
    n = 81 * 200
    dl = loader(random_images(n, size=2), [0] * n, Augmentation(padding=4, flip=True))
    dl.set_epoch(3, seed=1)
    drawn = dl.draw_epoch()
    position = (drawn['offsets'][:, 0] * 9 + drawn['offsets'][:, 1]).numpy()
    counts = np.bincount(position, minlength=81)
    assert counts.size == 81 and counts.min() > 0
    chi2 = ((counts - n / 81) ** 2 / (n / 81)).sum()
    assert chi2 < 124.8, chi2            # 80 degrees of freedom, p = 0.001
    rate = drawn['flips'].float().mean().item()
    assert abs(rate - 0.5) < 4 * (0.25 / n) ** 0.5
    assert sorted(set(drawn['order'].tolist())) == list(range(n))   # a permutation


@pytest.mark.parametrize('pad_mode', ['zero', 'reflect'])
def test_pixels_equal_torchvision_crop_flip_normalise(pad_mode):
    images = random_images(6)
    dl = loader(images, list(range(6)), Augmentation(padding=4, pad_mode=pad_mode, flip=True))
    offsets = torch.tensor([[0, 0], [8, 8], [3, 5], [7, 1], [4, 4], [0, 8]])
    flips = torch.tensor([False, True, True, False, True, False])
    got = dl.augment(torch.arange(6), offsets, flips, None)
    normalise = transforms.Compose([transforms.ToTensor(), transforms.Normalize(cifar100.MEAN, cifar100.STD)])
    for i in range(6):
        padded = TF.pad(Image.fromarray(images[i]), 4, padding_mode='constant' if pad_mode == 'zero' else 'reflect')
        crop = TF.crop(padded, int(offsets[i, 0]), int(offsets[i, 1]), 32, 32)
        want = normalise(TF.hflip(crop) if flips[i] else crop)
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-5)


def test_rotation_equals_torchvision_rotate_nearest():
    images = random_images(3, size=64)
    dl = DeviceTrainLoader(images, [0, 1, 2], batch_size=3, mean=tinyimagenet.MEAN, std=tinyimagenet.STD,
                           augmentation=Augmentation(flip=True, rotate_degrees=20.0), device=CPU)
    angles = torch.tensor([17.3, -12.0, 0.5])
    got = dl.augment(torch.arange(3), torch.zeros(3, 2, dtype=torch.long), torch.tensor([False, True, False]), angles)
    for i in range(3):
        tensor = torch.from_numpy(images[i]).permute(2, 0, 1)
        rotated = TF.rotate(tensor, float(angles[i]), interpolation=TF.InterpolationMode.NEAREST)
        rotated = TF.hflip(rotated) if i == 1 else rotated
        want = TF.normalize(rotated.float() / 255, tinyimagenet.MEAN, tinyimagenet.STD)
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-5)
    many = DeviceTrainLoader(random_images(2000, size=1), [0] * 2000, batch_size=3, mean=tinyimagenet.MEAN,
                             std=tinyimagenet.STD, augmentation=Augmentation(rotate_degrees=20.0), device=CPU)
    drawn = many.draw_epoch()['angles']
    assert drawn.abs().max() <= 20 and drawn.min() < -19.5 and drawn.max() > 19.5 and abs(drawn.mean()) < 1


# ----------------------------------------------------------------------------------- CRD, seeds, shapes
@pytest.mark.parametrize('mode', ['exact', 'relax'])
def test_crd_negatives_never_of_the_anchor_class(mode):
    targets = torch.tensor([i % 5 for i in range(60)])
    pools = [np.flatnonzero(targets.numpy() != c) for c in range(5)]
    sampler = DeviceCRDSampler(targets, k=20, mode=mode, cls_negative=pools, device=CPU)
    generator = torch.Generator().manual_seed(0)
    index = torch.arange(60)
    drawn = sampler(index, targets[index], generator)
    assert drawn.shape == (60, 21) and drawn.dtype == torch.int64
    assert (targets[drawn[:, 1:]] != targets[:, None]).all()
    assert all(len(set(row)) == 20 for row in drawn[:, 1:].tolist())     # without replacement (pool 48 >= 20)
    if mode == 'exact':
        assert torch.equal(drawn[:, 0], index)
    else:
        assert (targets[drawn[:, 0]] == targets).all()
    big = DeviceCRDSampler(targets, k=100, mode=mode, cls_negative=pools, device=CPU)(index, targets, generator)
    assert (targets[big[:, 1:]] != targets[:, None]).all()               # pool 48 < k: with replacement


def test_same_seed_and_epoch_same_batches_and_tuple_layouts(tmp_path):
    write_cifar100(tmp_path, n_train_per_class=2, n_test_per_class=1, num_classes=10)
    layouts = {}
    for mode in ('plain', 'instance', 'crd'):
        reference = get_dataloaders('cifar100', str(tmp_path), 8, 0, mode=mode, nce_k=5, download=False)
        bundle = device_bundle(reference, 'cifar100', CPU, mode=mode, seed=4)

        def epoch(e):
            set_epoch(bundle, e, 4)
            return [tuple(t.clone() for t in batch) for batch in bundle.train_loader]

        first, again, other = epoch(2), epoch(2), epoch(3)
        assert all(torch.equal(a, b) for x, y in zip(first, again) for a, b in zip(x, y))
        assert not torch.equal(first[0][0], other[0][0])
        ref_batch = next(iter(reference.train_loader))
        assert [t.shape for t in first[0]] == [t.shape for t in ref_batch]
        assert [t.dtype for t in first[0]] == [t.dtype for t in ref_batch]
        layouts[mode] = len(first[0])
        val = next(iter(bundle.val_loader))
        assert val[0].shape == (10, 3, 32, 32) and len(val) == 2
    assert layouts == {'plain': 2, 'instance': 3, 'crd': 4}
    dropped = device_bundle(get_dataloaders('cifar100', str(tmp_path), 8, 0, drop_last=True, download=False),
                            'cifar100', CPU)
    assert len(dropped.train_loader) == 20 // 8 == len(list(dropped.train_loader))


def test_tinyimagenet_on_the_device_rotates(tmp_path):
    write_tinyimagenet(tmp_path, num_classes=3, n_train_per_class=2)
    reference = get_dataloaders('tinyimagenet', str(tmp_path), 4, 0, augment='rotate')
    bundle = device_bundle(reference, 'tinyimagenet', CPU, augment='rotate')
    assert bundle.train_loader.augmentation == Augmentation(flip=True, rotate_degrees=20.0)
    image, target = next(iter(bundle.train_loader))
    assert image.shape == (4, 3, 64, 64) and target.dtype == torch.int64
    assert len(list(bundle.val_loader)) == 1


# ----------------------------------------------------------------------------------- the loop
class FlakyDistiller(nn.Module):
    """A tiny model whose loss becomes NaN from the third step on."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
        self.calls = 0

    def forward_train(self, image, target, **extras):
        self.calls += 1
        logits = self.net(image)
        ce = nn.functional.cross_entropy(logits, target)
        return logits, {'ce': ce * (float('nan') if self.calls >= 3 else 1.0), 'extra': ce.detach() * 0}

    def start_epoch(self, epoch):
        pass


@pytest.fixture(scope='module')
def cifar_folder(tmp_path_factory):
    """A CIFAR-100-format folder with 10 classes x 8 training images (5 batches of 16)."""
    root = tmp_path_factory.mktemp('cifar')
    write_cifar100(root, n_train_per_class=8, n_test_per_class=1, num_classes=10)
    return str(root)


class PreloadedLoader:
    """The batches of one pass of a reference loader, read once: the stand-in for device data in the data modes
    dataset/device_data.py does not have ('weak_strong'), so that a step's syncs and graphs are the step's own
    (torchvision's PIL transforms read random numbers with .item())."""

    def __init__(self, loader) -> None:
        self.batches = [tuple(batch) for batch in loader]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)

    def set_epoch(self, epoch: int, seed: int, stream: int = 0) -> None:
        pass


def small_bundle(folder: str, mode: str = 'plain', batch_size: int = 16):
    """The fixture data on the device, loaders as the CLIs build them (preloaded reference batches for the
    modes without device data)."""
    reference = get_dataloaders('cifar100', folder, batch_size, 0, mode=mode, nce_k=32, download=False)
    if mode not in DEVICE_MODES:
        return replace(reference, train_loader=PreloadedLoader(reference.train_loader))
    return device_bundle(reference, 'cifar100', CPU, mode=mode)


def test_nan_loss_stops_at_the_check_naming_the_first_bad_iteration(cifar_folder):
    model = FlakyDistiller()
    trainer = FastTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), CPU)
    with pytest.raises(LossNotFinite) as err:   # print steps: iterations 1 and 5 (the last)
        train_one_epoch_fast(trainer, small_bundle(cifar_folder).train_loader, epoch=7, print_freq=50)
    message = str(err.value)
    assert 'epoch 7, iteration 3/5' in message and 'ce=nan' in message and 'extra=0' in message
    assert 'after iteration 5' in message and err.value.iteration == 3


def build(distill: str, data, seed: int = 0, **values):
    opt = student_options(distill, model_s='resnet8', model_t='resnet8', dataset='cifar100', nce_k=32,
                          init_epochs=1, k_penult=16, k_inter=2, **values)
    method = DISTILLERS[opt.distill]
    torch.manual_seed(seed)
    distiller = method(create_model('resnet8', num_classes=10), create_model('resnet8', num_classes=10), opt,
                       data.info)
    return distiller, opt


def test_fast_loop_matches_the_reference_loop(cifar_folder):
    data = small_bundle(cifar_folder)
    stats, weights = [], []
    for fast in (False, True):
        distiller, _ = build('kd', data)
        optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.05, momentum=0.9)
        set_epoch(data, 1, 0)
        if fast:
            stats.append(train_one_epoch_fast(FastTrainer(distiller, optimizer, CPU), data.train_loader, epoch=1))
        else:
            stats.append(train_one_epoch(distiller, data.train_loader, optimizer, epoch=1, device=CPU))
        weights.append(distiller.student.state_dict())
    assert stats[0].keys() == stats[1].keys() == {'train_loss', 'train_acc', 'train_acc_top5', 'loss_ce', 'loss_kd'}
    for key in stats[0]:
        assert stats[1][key] == pytest.approx(stats[0][key], rel=1e-5, abs=1e-5), key
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=0)


def count_step_syncs(distill: str, folder: str, cache_dir: Path) -> SyncCounter:
    """Syncs of one non-print fast step (the loader's next batch included), after a first step."""
    method = DISTILLERS[student_options(distill).distill]
    data = small_bundle(folder, mode=method.data_mode)
    distiller = prepared(distill, data, cache_dir)
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01, momentum=0.9)
    trainer = FastTrainer(distiller, optimizer, CPU)
    trainer.reset(1, len(data.train_loader))
    batches = iter(data.train_loader)
    trainer.step(next(batches))
    with SyncCounter() as syncs:
        batch = next(batches)
        trainer.step(batch)
    return syncs


def prepared(distill: str, data, cache_dir: Path):
    """``build``'s distiller with its offline stage done (the teacher file names the letKD/QUEST/TDD caches)."""
    teacher_file = cache_dir / 'teacher' / 'ckpt.pth'
    teacher_file.parent.mkdir(parents=True, exist_ok=True)
    distiller, _ = build(distill, data, path_t=str(teacher_file))
    if distiller.teacher is not None:
        torch.save({'model': distiller.teacher.state_dict()}, teacher_file)
    distiller.prepare(data, device=CPU, cache_dir=str(cache_dir / 'cache'), resumed=False)
    return distiller


# The fast path's promise: one graph per step. Dynamo decides graph breaks and recompiles before any backend
# runs, so the 'eager' backend counts them at the cost of tracing alone. Three epochs of 12-image batches
# (6 full, the 7th of 8 runs eagerly), with start_epoch, the metrics' reads and resets between them, as fit runs.
@pytest.mark.parametrize('distill', list(DISTILLERS))
def test_every_methods_fast_step_is_one_graph_compiled_once_over_a_run(distill, cifar_folder, tmp_path):
    method = DISTILLERS[student_options(distill).distill]
    data = small_bundle(cifar_folder, mode=method.data_mode, batch_size=12)
    distiller = prepared(distill, data, tmp_path)
    trainer = FastTrainer(distiller, torch.optim.SGD(distiller.trainable_parameters(), lr=0.01, momentum=0.9), CPU,
                          FastOptions(compile='default', compile_backend='eager'))
    torch._dynamo.reset()
    with CompileCounter() as compiled:
        for epoch in (1, 2, 3):
            set_epoch(data, epoch, 0)
            stats = train_one_epoch_fast(trainer, data.train_loader, epoch=epoch, print_freq=3)
            distiller.epoch_metrics()
    assert compiled.graph_breaks == 0, compiled.summary()
    assert compiled.frames == 1, compiled.summary()      # compiled at the second step, never again
    assert np.isfinite(stats['train_loss'])


# One method per way a compiled step broke before (AOTAutograd, which builds the backward, included): ce: a
# single loss term summed with sum() lost its grad_fn; crd: Z set in place after a traced read of the same
# buffer (backward failed); tdd and letKD: Python counters and meters, now buffers changed inside the graph.
@pytest.mark.parametrize('distill', ['ce', 'crd', 'tdd', 'letkd2'])
def test_a_compiled_step_trains_and_keeps_its_metrics(distill, cifar_folder, tmp_path):
    method = DISTILLERS[student_options(distill).distill]
    data = small_bundle(cifar_folder, mode=method.data_mode)
    distiller = prepared(distill, data, tmp_path)
    trainer = FastTrainer(distiller, torch.optim.SGD(distiller.trainable_parameters(), lr=0.01), CPU,
                          FastOptions(compile='default', compile_backend='aot_eager'))
    set_epoch(data, 1, 0)
    batches = [b for b in data.train_loader if b[0].shape[0] == 16]     # full batches only: one shape
    trainer.reset(1, len(batches))
    torch._dynamo.reset()
    before = [p.detach().clone() for p in distiller.trainable_parameters()]
    with CompileCounter() as compiled:
        for batch in batches:
            trainer.step(batch)
    assert len(batches) >= 5 and compiled.frames == 1 and compiled.graph_breaks == 0, compiled.summary()
    stats = trainer.read()
    assert np.isfinite(stats['train_loss']) and stats['train_loss'] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, distiller.trainable_parameters())), 'nothing trained'
    metrics = distiller.epoch_metrics()
    if distill == 'letkd2':        # the meters, updated inside the compiled step, count every step
        assert {'agree_penult', 'agree_inter', 'kl_penult', 'perplexity_inter'} <= set(metrics)
        assert 0 <= metrics['agree_penult'] <= 100 and metrics['kl_penult'] > 0
        assert all(m.counts[0].item() == 0 for m in distiller.meters.values())      # read and reset
    if distill == 'tdd':
        assert 0 <= metrics['tdd_head_acc_1'] <= 100


@pytest.mark.parametrize('distill', ['kd', 'ce'])
def test_no_host_sync_in_a_fast_training_step(distill, cifar_folder, tmp_path):
    syncs = count_step_syncs(distill, cifar_folder, tmp_path)
    assert syncs.count == 0, syncs.summary()


# Methods whose forward_train still syncs (metrics, memory bookkeeping or warm-up read on the host): their
# method side is another branch's work (issue 11, Part 2). The lead removes a name when it merges the fix.
@pytest.mark.parametrize('distill', list(DISTILLERS))
def test_no_host_sync_in_a_fast_step_of_every_method(distill, cifar_folder, tmp_path):
    syncs = count_step_syncs(distill, cifar_folder, tmp_path)
    assert syncs.count == 0, syncs.summary()


def test_the_reference_step_syncs_and_the_counter_sees_it(cifar_folder):
    data = small_bundle(cifar_folder)
    distiller, _ = build('kd', data)
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01)
    one_batch = [next(iter(data.train_loader))]
    with SyncCounter() as syncs:
        train_one_epoch(distiller, one_batch, optimizer, epoch=1, device=CPU, print_freq=0, progress=False)
    assert syncs.ops['aten._local_scalar_dense'] >= 5, syncs.summary()   # isfinite, accuracy x2, meters
    with SyncCounter() as syncs:
        torch.ones(3).tolist()
        torch.ones(3).nonzero()
    assert syncs.ops == {'Tensor.tolist': 1, 'aten.nonzero': 1}


def test_bf16_autocast_and_channels_last_run_on_cpu_and_stay_close(cifar_folder):
    data = small_bundle(cifar_folder)
    batch = next(iter(data.train_loader))
    losses = {}
    for options in (FastOptions(), FastOptions(amp='bf16'), FastOptions(channels_last=True)):
        distiller, _ = build('kd', data)
        configure_fast_path(distiller, CPU, options)
        if options.channels_last:
            conv = next(m for m in distiller.student.modules() if isinstance(m, nn.Conv2d))
            assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        trainer = FastTrainer(distiller, torch.optim.SGD(distiller.trainable_parameters(), lr=0.01), CPU, options)
        trainer.step(batch)
        losses[options] = trainer.read()['loss_ce']
    fp32, bf16, cl = losses.values()
    assert cl == pytest.approx(fp32, rel=1e-5)
    assert bf16 == pytest.approx(fp32, rel=2e-2) and bf16 != fp32


def test_compiled_step_on_cpu_tracks_the_eager_fast_step(cifar_folder):
    data = small_bundle(cifar_folder)
    set_epoch(data, 1, 0)
    batches = [b for _, b in zip(range(4), data.train_loader)]
    per_step = {}
    for mode in ('none', 'default'):
        distiller, _ = build('kd', data)
        trainer = FastTrainer(distiller, torch.optim.SGD(distiller.trainable_parameters(), lr=0.05, momentum=0.9),
                              CPU, FastOptions(compile=mode))
        per_step[mode] = []
        for batch in batches:
            trainer.reset(1, 4)
            trainer.step(batch)
            per_step[mode].append(trainer.read()['train_loss'])
    assert per_step['default'] == pytest.approx(per_step['none'], rel=1e-3)
    assert per_step['none'][0] != per_step['none'][-1]     # the weights moved


def test_reduce_overhead_needs_cuda():
    with pytest.raises(UserError, match='reduce-overhead'):
        configure_fast_path(nn.Linear(1, 1), CPU, FastOptions(compile='reduce-overhead'))


# ----------------------------------------------------------------------------------- flags and CLI
def parse(*flags):
    return train_teacher.resolve_options(train_teacher.get_args_parser().parse_args(['--model', 'resnet8', *flags]))


def test_fast_flag_resolution():
    reference = parse()
    assert (reference.fast_loop, reference.device_data, reference.compile, reference.amp) == (False, False, 'none', 'none')
    fast = parse('--fast')
    assert (fast.fast_loop, fast.device_data, fast.tf32, fast.channels_last, fast.compile, fast.amp) == \
        (True, True, True, True, 'default', 'none')
    cheap = parse('--fast', '--compile', 'none', '--no-channels_last', '--amp', 'bf16')
    assert (cheap.compile, cheap.channels_last, cheap.device_data, cheap.amp) == ('none', False, True, 'bf16')
    assert parse('--channels_last').fast_loop and not parse('--channels_last').device_data
    # ImageNet does not fit on a device: --fast there is everything but device data; asking for it is an error
    imagenet = parse('--fast', '--dataset', 'imagenet')
    assert (imagenet.fast_loop, imagenet.device_data, imagenet.channels_last, imagenet.compile) == \
        (True, False, True, 'default')
    with pytest.raises(UserError, match='imagenet'):
        parse('--fast', '--device_data', '--dataset', 'imagenet')


def test_fast_under_torchrun_leaves_device_data_off(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    opt = parse('--fast')
    assert (opt.fast_loop, opt.device_data, opt.tf32) == (True, False, True)
    with pytest.raises(UserError, match='torchrun'):
        parse('--device_data')


def test_fast_cli_resumes_exactly(tmp_path):
    write_cifar100(tmp_path / 'data', n_train_per_class=2, n_test_per_class=1)
    flags = ['--model', 'resnet8', '--data_folder', str(tmp_path / 'data'), '--num_workers', '0', '--device', 'cpu',
             '--batch_size', '64', '--lr_decay_epochs', '1', '--fast', '--compile', 'none', '--print_freq', '1']
    runs = {}
    for name, steps in (('full', [['--epochs', '2']]), ('killed', [['--epochs', '1'], ['--epochs', '2', '--resume']])):
        for extra in steps:
            assert train_teacher.cli([*flags, '--save_dir', str(tmp_path / name), *extra]) == 0
        folder = next((tmp_path / name / 'models').iterdir())
        runs[name] = [json.loads(line) for line in (folder / 'metrics.jsonl').read_text().splitlines()]
        assert json.loads((folder / 'args.json').read_text())['device_data'] is True
    keys = ('train_loss', 'train_acc', 'test_acc', 'test_loss')
    assert [[r[k] for k in keys] for r in runs['full']] == [[r[k] for k in keys] for r in runs['killed']]


@pytest.mark.parametrize('script, flags', [('run_cifar_distill.sh', ['--fast']),
                                           ('run_tinyimagenet.sh', ['--extra', '--fast --compile none'])])
def test_sweep_scripts_pass_fast_through(script, flags):
    import os
    import shlex
    import subprocess
    import sys

    import train_student
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(['bash', str(root / 'scripts' / script), '--dry-run', '--trials', '1', *flags],
                         capture_output=True, text=True, check=True, cwd=root,
                         env={**os.environ, 'PYTHON': sys.executable}).stdout
    lines = [shlex.split(line) for line in out.splitlines() if line.startswith('python')]
    training = [argv for argv in lines if argv[1] in ('train_student.py', 'train_teacher.py')]
    assert training and all('--fast' in argv for argv in training)
    assert all('--fast' not in argv for argv in lines if argv not in training)    # the offline stage has no loop
    student = next(argv for argv in lines if argv[1] == 'train_student.py')
    opt = train_student.resolve_options(train_student.get_args_parser().parse_args(student[2:]))
    assert opt.fast_loop and opt.device_data
