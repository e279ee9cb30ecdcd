"""torchrun / DistributedDataParallel on the CPU (gloo), 2 processes, generated ImageNet-format folders
(3 classes x 3 images: 9 test images, not divisible by 2), a CIFAR model at a 32-pixel crop for speed.

Two launches (process start-up dominates here): the first runs a teacher, then kd, letkd2 and crd students
for one epoch, a crd student for two epochs, and the same crd run killed (os._exit on every rank) after
epoch 1; the second resumes the killed run. tests/ddp_worker.py dumps each rank's state after each run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helper.distributed import ShardWithoutPadding
from tests.fixtures_data import write_imagenet_folders

ROOT = Path(__file__).resolve().parents[1]
N_TEST = 9
COMMON = ['--dataset', 'imagenet', '--crop_size', '32', '--batch_size', '4', '--num_workers', '0',
          '--device', 'cpu', '--print_freq', '0']
STUDENT = ['--model_s', 'resnet8', '--model_t', 'resnet8']


def torchrun(out: Path, *runs: list[str], port: int) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUT run :: run ...``."""
    args: list[str] = []
    for run in runs:
        args += (['::'] if args else []) + run
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                           '--master_port', str(port), str(ROOT / 'tests' / 'ddp_worker.py'), str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp('ddp')
    data, save, out = root / 'data', root / 'save', root / 'out'
    out.mkdir()
    write_imagenet_folders(data, num_classes=3, n_per_class=3, size=36)
    base = ['--data_folder', str(data), '--save_dir', str(save), *COMMON]
    teacher_dir = save / 'models' / 'resnet8_imagenet_lr_0.05_decay_0.0005_trial_0'
    path_t = str(teacher_dir / 'ckpt_epoch_1.pth')

    def student(distill: str, trial: str, epochs: int, *extra: str) -> list[str]:
        return ['student', f'{distill}-{trial}', *base, *STUDENT, '--path_t', path_t, '--distill', distill,
                '--trial', trial, '--seed', '5', '--epochs', str(epochs), *extra]

    first = torchrun(out, ['teacher', 'teacher', *base, '--model', 'resnet8', '--epochs', '1'],
                     student('kd', 'one', 1), student('letkd2', 'one', 1, '--k_penult', '4', '--k_inter', '2'),
                     student('crd', 'one', 1, '--nce_k', '4'),
                     student('kd', 'fast', 1, '--fast', '--compile', 'none'),   # the sync-free loop under DDP
                     student('crd', 'full', 2, '--nce_k', '4'),
                     student('crd', 'cut', 2, '--nce_k', '4', '--kill_after_epoch', '1'), port=29561)
    assert first.returncode != 0, 'the killed run should end the launch with an error'
    assert (out / 'crd-full.rank1.pt').is_file(), first.stdout[-3000:] + first.stderr[-3000:]
    assert not (out / 'crd-cut.rank0.pt').exists()
    second = torchrun(out, student('crd', 'cut', 2, '--nce_k', '4', '--resume'), port=29562)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    folders = {'teacher': teacher_dir}
    for folder in (save / 'student_model').iterdir():
        distill, trial = folder.name.split('_')[3], folder.name.rsplit('_', 1)[1]
        folders[f'{distill}-{trial}'] = folder
    return {'out': out, **folders}


def dumps(runs: dict[str, Path], name: str) -> tuple[dict, dict]:
    return tuple(torch.load(runs['out'] / f'{name}.rank{r}.pt', weights_only=False) for r in (0, 1))  # our own dumps


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / 'metrics.jsonl').read_text().splitlines()]


RUNS = ['teacher', 'kd-one', 'letkd2-one', 'crd-one', 'kd-fast', 'crd-full', 'crd-cut']


@pytest.mark.parametrize('name', RUNS)
def test_both_ranks_end_identical(runs: dict[str, Path], name: str) -> None:
    """Weights, BN statistics, CRD's memory bank, quantizers: every tensor equal on both ranks."""
    rank0, rank1 = dumps(runs, name)
    assert rank0['state'].keys() == rank1['state'].keys()
    for key, value in rank0['state'].items():
        assert torch.equal(value, rank1['state'][key]), f'{name}: {key} differs between ranks'
    if name.startswith('crd'):
        assert any('memory_v1' in key for key in rank0['state'])


@pytest.mark.parametrize('name', RUNS)
def test_only_rank0_writes_and_evaluation_counts_each_image_once(runs: dict[str, Path], name: str) -> None:
    folder = runs[name]
    records = metrics(folder)
    epochs = json.loads((folder / 'summary.json').read_text())['epochs']
    assert [r['epoch'] for r in records] == list(range(1, epochs + 1))   # rank 1 appended nothing
    assert len(list(folder.glob('events.out.tfevents.*'))) == (2 if name == 'crd-cut' else 1)  # one per launch
    assert all(r['test_images'] == N_TEST for r in records)              # 9 = 5 + 4, no padded repeat
    rank0, _ = dumps(runs, name)
    assert rank0['summary']['last_acc'] == records[-1]['test_acc']


def test_resume_after_kill_matches_uninterrupted(runs: dict[str, Path]) -> None:
    full, cut = metrics(runs['crd-full']), metrics(runs['crd-cut'])
    keys = ('train_loss', 'train_acc', 'test_acc', 'test_acc_top5', 'test_loss')
    assert [[r[k] for k in keys] for r in cut] == [[r[k] for k in keys] for r in full]
    (full0, _), (cut0, _) = dumps(runs, 'crd-full'), dumps(runs, 'crd-cut')
    for key, value in full0['state'].items():
        assert torch.equal(value, cut0['state'][key]), key


def test_eval_shards_partition_the_test_set() -> None:
    """The evaluation sampler: every index once over the ranks (DistributedSampler repeats one for 9 / 2)."""
    from torch.utils.data.distributed import DistributedSampler
    data = list(range(N_TEST))
    ours = [i for r in range(2) for i in ShardWithoutPadding(data, 2, r)]
    assert sorted(ours) == data
    padded = [i for r in range(2) for i in DistributedSampler(data, num_replicas=2, rank=r, shuffle=False)]
    assert len(padded) == N_TEST + 1
