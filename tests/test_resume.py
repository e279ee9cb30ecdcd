"""Exact resume after a kill, through train_student.py's CLI, for the state that lives beyond a plain student:
DataLoader workers (augmentation and order drawn in worker processes), letKD-2 (quantizers from the offline
step), DKD (a warm-up that depends on the epoch), TDD (class trees) and FT (init stage, frozen paraphraser).

Each case trains once without interruption and once killed in the middle of an epoch, then continued with
--resume; metrics.jsonl (without `time`), summary.json's accuracies and every tensor of last.pth (deployed
weights, the distiller's own modules and buffers, optimizer state, RNG state) must be equal.

The kill is test_cli's (train_one_epoch of one epoch raises KeyboardInterrupt), moved inside the epoch: the
loader of that epoch raises after its first batch, so one SGD step has happened in memory, workers are running,
and nothing of that epoch was saved.
"""
import json

import pytest
import torch

import helper.run as run_module
import train_student
from helper.util import load_checkpoint
from tests.fixtures_data import one_intra_op_thread

FAST = ['--num_workers', '0', '--batch_size', '32', '--device', 'cpu', '--print_freq', '1000', '--seed', '5',
        '--lr_decay_epochs', '1']          # the lr changes after epoch 1, so a resumed epoch must pick the right one

# id: (flags, epochs, epoch in which the run is killed)
CASES = {
    'kd-2-workers': (['--distill', 'kd', '--num_workers', '2'], 2, 2),
    'letkd2': (['--distill', 'letkd2', '--k_penult', '16', '--k_inter', '2'], 2, 2),
    'dkd-warmup': (['--distill', 'dkd', '--dkd_warmup', '2'], 3, 2),
    'tdd': (['--distill', 'tdd', '--tdd_knn', '3'], 2, 2),
    'factor': (['--distill', 'factor', '--init_epochs', '1'], 2, 1),   # killed before epoch 1 is saved
}


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Small convolutions run several times faster on one intra-op thread when the CPUs are shared."""
    with one_intra_op_thread():
        yield


class DiesAfterFirstBatch:
    """A loader of the same length that yields its first batch, then raises KeyboardInterrupt."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == 1:
                raise KeyboardInterrupt('killed')
            yield batch


def kill_in_epoch(monkeypatch, kill_epoch):
    real_epoch = run_module.train_one_epoch

    def dying(distiller, loader, *args, epoch, **kwargs):
        if epoch == kill_epoch:
            loader = DiesAfterFirstBatch(loader)
        return real_epoch(distiller, loader, *args, epoch=epoch, **kwargs)

    monkeypatch.setattr(run_module, 'train_one_epoch', dying)
    return real_epoch


def strip_time(run_dir):
    path = run_dir / 'metrics.jsonl'
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [{k: v for k, v in r.items() if k != 'time'} for r in records]


def assert_same_tensors(a, b, where):
    """Equal nested checkpoint content: tensors bit for bit, other leaves by ==."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_same_tensors(a[key], b[key], f'{where}.{key}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f'{where}[{i}]')
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.parametrize('case', list(CASES))
def test_killed_and_resumed_run_equals_an_uninterrupted_one(case, tmp_path, data_dir, vanilla_teacher, monkeypatch,
                                                            capsys):
    flags, epochs, kill_epoch = CASES[case]

    def argv(save, *extra):
        # separate save_dirs: each run builds the method's offline cache (quantizers, TDD trees) itself, and the
        # resumed run reads the killed run's cache
        return ['--path_t', str(vanilla_teacher('resnet14')), '--model_s', 'resnet8', '--data_folder', data_dir,
                '--save_dir', str(tmp_path / save), *FAST, *flags, '--epochs', str(epochs), *extra]

    assert train_student.cli(argv('full')) == 0
    real_epoch = kill_in_epoch(monkeypatch, kill_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_student.cli(argv('killed'))
    monkeypatch.setattr(run_module, 'train_one_epoch', real_epoch)
    (full,), (killed,) = ((tmp_path / save / 'student_model').iterdir() for save in ('full', 'killed'))
    assert full.name == killed.name
    assert load_checkpoint(killed / 'last.pth')['epoch'] == kill_epoch - 1
    assert len(strip_time(killed)) == kill_epoch - 1
    capsys.readouterr()

    assert train_student.cli(argv('killed', '--resume')) == 0
    out = capsys.readouterr().out
    assert f'resuming {killed} at epoch {kill_epoch}' in out
    assert 'init epoch' not in out                                 # FT's init stage is not run again

    metrics = strip_time(full)
    assert [r['epoch'] for r in metrics] == list(range(1, epochs + 1))
    assert strip_time(killed) == metrics
    a, b = load_checkpoint(full / 'last.pth'), load_checkpoint(killed / 'last.pth')
    assert a['epoch'] == b['epoch'] == epochs
    for key in ('model', 'distiller', 'optimizer', 'rng', 'best_acc', 'best_epoch', 'settings'):
        assert_same_tensors(a[key], b[key], key)
    assert any(k.startswith('student.') for k in a['distiller'])
    sa, sb = (json.loads((d / 'summary.json').read_text()) for d in (full, killed))
    for key in ('last_acc', 'best_acc', 'best_epoch', 'epochs'):
        assert sa[key] == sb[key], key
