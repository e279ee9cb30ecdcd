"""torchrun / DistributedDataParallel on the CPU (gloo), 2 processes, generated ImageNet-format folders
(3 classes x 3 images: 9 test images, not divisible by 2), a CIFAR model at a 32-pixel crop for speed.

Two launches (process start-up dominates here): the first runs a teacher, then kd, letkd2 and crd students
for one epoch, a crd student for two epochs, and the same crd run killed (os._exit on every rank) after
epoch 1; the second resumes the killed run. tests/ddp_worker.py dumps each rank's state after each run.
A third launch, with the collectives' timeout cut to 10 s, runs FSP's init stage on both ranks and a run whose
rank 0 takes 20 s longer in ``prepare`` (a cache being built) than that timeout.

In-process checks (a world of one gloo process): every registered method gives every trainable parameter a
gradient in every step (so DDP runs without find_unused_parameters), and --sync_bn's conversion.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helper import distributed
from helper.distributed import ShardWithoutPadding
from tests.fixtures_data import write_imagenet_folders

ROOT = Path(__file__).resolve().parents[1]
N_TEST = 9
COMMON = ['--dataset', 'imagenet', '--crop_size', '32', '--batch_size', '4', '--num_workers', '0',
          '--device', 'cpu', '--print_freq', '0']
STUDENT = ['--model_s', 'resnet8', '--model_t', 'resnet8']


def torchrun(out: Path, *runs: list[str], port: int, **env_extra: str) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUT run :: run ...``."""
    args: list[str] = []
    for run in runs:
        args += (['::'] if args else []) + run
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT), **env_extra}
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
                     student('kd', 'compiled', 1, '--fast', '--compile', 'default'),   # ... compiled, with DDP inside
                     student('crd', 'full', 2, '--nce_k', '4'),
                     student('crd', 'cut', 2, '--nce_k', '4', '--kill_after_epoch', '1'), port=29561)
    assert first.returncode != 0, 'the killed run should end the launch with an error'
    assert (out / 'crd-full.rank1.pt').is_file(), first.stdout[-3000:] + first.stderr[-3000:]
    assert not (out / 'crd-cut.rank0.pt').exists()
    second = torchrun(out, student('crd', 'cut', 2, '--nce_k', '4', '--resume'), port=29562)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return {'out': out, 'base': base, 'path_t': path_t, 'root': root, **student_folders(save), 'teacher': teacher_dir}


def student_folders(save: Path) -> dict[str, Path]:
    folders = {}
    for folder in (save / 'student_model').iterdir():
        if folder.is_dir():
            distill, trial = folder.name.split('_')[3], folder.name.rsplit('_', 1)[1]
            folders[f'{distill}-{trial}'] = folder
    return folders


@pytest.fixture(scope='module')
def collective(runs: dict[str, Path]) -> dict[str, Path]:
    """The third launch (collectives time out after 10 s): FSP's init stage (2 epochs) on both ranks, and a kd
    run whose rank 0 spends 20 s more in ``prepare`` than rank 1."""
    out = runs['root'] / 'out_collective'
    out.mkdir()

    def student(distill: str, trial: str, *extra: str) -> list[str]:
        return ['student', f'{distill}-{trial}', *runs['base'], *STUDENT, '--path_t', runs['path_t'],
                '--distill', distill, '--trial', trial, '--seed', '5', '--epochs', '1', *extra]

    done = torchrun(out, student('fsp', 'init', '--init_epochs', '2', '--dump_after_prepare'),
                    student('kd', 'slow', '--slow_prepare', '20'), port=29563, DDP_TEST_TIMEOUT_S='10')
    return {'out': out, 'launch': done, **student_folders(runs['root'] / 'save')}


def dumps(runs: dict[str, Path], name: str) -> tuple[dict, dict]:
    return tuple(torch.load(runs['out'] / f'{name}.rank{r}.pt', weights_only=False) for r in (0, 1))  # our own dumps


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / 'metrics.jsonl').read_text().splitlines()]


RUNS = ['teacher', 'kd-one', 'letkd2-one', 'crd-one', 'kd-fast', 'kd-compiled', 'crd-full', 'crd-cut']


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


def test_ddp_and_compile_train_what_ddp_alone_trains(runs: dict[str, Path]) -> None:
    """--fast --compile default under torchrun: the step that is compiled calls the DDP-wrapped forward (dynamo's
    DDP support splits its graph at the gradient buckets); same batches, same weights as the uncompiled fast run
    up to float rounding, and DDP's flags as documented (no static graph under compile)."""
    (compiled, _), (eager, _) = dumps(runs, 'kd-compiled'), dumps(runs, 'kd-fast')
    assert compiled['state'].keys() == eager['state'].keys()
    for key, value in eager['state'].items():
        if torch.is_floating_point(value):
            torch.testing.assert_close(compiled['state'][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert compiled['ddp'] == {'find_unused_parameters': False, 'static_graph': False}
    assert metrics(runs['kd-compiled'])[-1]['train_loss'] == pytest.approx(metrics(runs['kd-fast'])[-1]['train_loss'],
                                                                            rel=1e-4)


def test_eval_shards_partition_the_test_set() -> None:
    """The evaluation sampler: every index once over the ranks (DistributedSampler repeats one for 9 / 2)."""
    from torch.utils.data.distributed import DistributedSampler
    data = list(range(N_TEST))
    ours = [i for r in range(2) for i in ShardWithoutPadding(data, 2, r)]
    assert sorted(ours) == data
    padded = [i for r in range(2) for i in DistributedSampler(data, num_replicas=2, rank=r, shuffle=False)]
    assert len(padded) == N_TEST + 1


def test_init_stage_runs_on_every_rank_together_each_on_its_shard(collective: dict[str, Path]) -> None:
    """AB/FT/FSP's init stage under torchrun: both ranks train at once on their own shards with averaged
    gradients (not rank 0 on its shard and then rank 1 on its own), so the init modules end identical."""
    rank0, rank1 = (torch.load(collective['out'] / f'fsp-init.prepare.rank{r}.pt', weights_only=False)
                    for r in (0, 1))
    assert rank0['state'].keys() == rank1['state'].keys()
    for key, value in rank0['state'].items():
        assert torch.equal(value, rank1['state'][key]), f'{key} differs between ranks after the init stage'
    assert len(rank0['indices']) == len(rank1['indices']) == 2                   # --init_epochs 2
    for seen0, seen1 in zip(rank0['indices'], rank1['indices']):
        assert len(seen0) == len(seen1) == 5                 # 9 images over 2 ranks: 5 each (one repeat), not 9
        assert set(seen0) | set(seen1) == set(range(9))     # together: the whole split once per epoch
    assert json.loads((collective['fsp-init'] / 'summary.json').read_text())['epochs'] == 1


def test_other_ranks_wait_for_rank0s_caches_without_a_collective(collective: dict[str, Path]) -> None:
    """Rank 0 took 20 s longer in prepare than the 10 s collective timeout; rank 1 polled for its done-marker
    instead of sitting in a barrier, and the run finished."""
    launch = collective['launch']
    assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
    summary = json.loads((collective['kd-slow'] / 'summary.json').read_text())
    assert summary['epochs'] == 1
    assert not list((collective['kd-slow'].parents[1] / 'cache' / '.main_first').glob('*.done'))   # cleaned up


def test_a_nan_loss_on_one_rank_stops_every_rank_with_one_line(runs: dict[str, Path]) -> None:
    """The reference loop under torchrun: rank 1's loss becomes NaN at its 2nd step, rank 0's does not. The NaN
    check is collective, so both ranks stop at that step with one line each (rank 0's names the other process)
    instead of rank 0 waiting in DDP's gradient all-reduce until the collective timeout (20 s here)."""
    out = runs['root'] / 'out_nan'
    out.mkdir()
    run = ['student', 'kd-nan', *runs['base'], *STUDENT, '--path_t', runs['path_t'], '--distill', 'kd',
           '--trial', 'nan', '--seed', '5', '--epochs', '1', '--nan_on_rank1_at_step', '2']
    tic = time.monotonic()
    done = torchrun(out, run, port=29564, DDP_TEST_TIMEOUT_S='20')
    assert done.returncode != 0 and time.monotonic() - tic < 120
    errors = [line for line in done.stderr.splitlines() if line.startswith('error: loss became')]
    assert any('loss became nan at epoch 1, iteration 2/' in line for line in errors), done.stderr[-2000:]
    assert any('non-finite on another process at epoch 1, iteration 2/' in line for line in errors), done.stderr[-2000:]
    assert 'Timeout' not in done.stderr and 'timed out' not in done.stderr


def test_collective_timeout_is_tens_of_minutes() -> None:
    assert timedelta(minutes=10) <= distributed.TIMEOUT <= timedelta(hours=1)


@pytest.mark.parametrize('name', ['kd-one', 'letkd2-one', 'crd-one'])
def test_ddp_without_unused_parameter_search_and_with_a_static_graph(runs: dict[str, Path], name: str) -> None:
    rank0, _ = dumps(runs, name)
    assert rank0['ddp'] == {'find_unused_parameters': False, 'static_graph': True}


@pytest.fixture(scope='module')
def one_process_group(tmp_path_factory: pytest.TempPathFactory):
    """A gloo process group of one process (DDP builds its reducer and checks unused parameters as with more)."""
    store = dist.FileStore(str(tmp_path_factory.mktemp('store') / 'store'), 1)
    dist.init_process_group('gloo', store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope='module')
def cifar_small(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.fixtures_data import write_cifar100
    root = tmp_path_factory.mktemp('cifar_ddp')
    write_cifar100(root, n_train_per_class=3, n_test_per_class=1, num_classes=10)
    return str(root)


def _every_method():
    from distiller_zoo.registry import DISTILLERS
    return list(DISTILLERS)


@pytest.mark.parametrize('distill', _every_method())
def test_every_method_gives_every_parameter_a_gradient_in_every_step(distill, one_process_group, cifar_small,
                                                                     tmp_path) -> None:
    """Two DDP steps with find_unused_parameters=False (DDP raises in the second step when a parameter got no
    gradient in the first); a method that fails here needs ``find_unused_parameters = True`` on its class."""
    from dataset import get_dataloaders, set_epoch
    from distiller_zoo.registry import DISTILLERS
    from helper.distributed import _TrainStep
    from helper.loops import batch_extras, extra_names
    from models import create_model
    from tests.options import student_options
    torch.set_num_threads(1)
    method = DISTILLERS[distill]
    data = get_dataloaders('cifar100', cifar_small, 10, 0, mode=method.data_mode, nce_k=8, download=False)
    teacher_file = tmp_path / 'teacher' / 'ckpt.pth'
    teacher_file.parent.mkdir()
    opt = student_options(distill, model_s='resnet8', model_t='resnet8', dataset='cifar100', nce_k=8, init_epochs=1,
                          k_penult=8, k_inter=2, path_t=str(teacher_file))
    torch.manual_seed(0)
    distiller = method(create_model('resnet8', num_classes=10), create_model('resnet8', num_classes=10), opt,
                       data.info)
    if distiller.teacher is not None:
        torch.save({'model': distiller.teacher.state_dict()}, teacher_file)
    distiller.prepare(data, device=torch.device('cpu'), cache_dir=str(tmp_path / 'cache'), resumed=False)
    assert method.find_unused_parameters is False
    ddp = torch.nn.parallel.DistributedDataParallel(_TrainStep(distiller), broadcast_buffers=False,
                                                    find_unused_parameters=False)
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01)
    distiller.train()
    set_epoch(data, 1, 0)
    distiller.start_epoch(1)
    for step, batch in zip(range(3), data.train_loader):
        extras = batch_extras(batch, extra_names(distiller), torch.device('cpu'))   # as the loops name them
        _, losses = ddp(batch[0], batch[1], **extras)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        missing = [n for n, p in distiller.named_parameters()
                   if p.requires_grad and not n.startswith('teacher.') and p.grad is None]
        assert not missing, f'{distill}: no gradient in step {step + 1} for {missing[:5]}'
        optimizer.step()


def test_sync_bn_converts_the_trainable_modules_and_checkpoints_load_into_the_plain_model(tmp_path, capsys) -> None:
    """--sync_bn: the student's and the KD layers' BatchNorm become SyncBatchNorm (the same tensors), the teacher's
    stay; the keys do not change, so last.pth's distiller state and the deployable checkpoint load strictly
    into plain models. In one process ``wrap`` only prints a note."""
    import torch.nn as nn

    from dataset import DataInfo
    from distiller_zoo.deploy import load_deployed
    from distiller_zoo.letkd import LetKD2
    from helper.util import save_checkpoint
    from models import create_model
    from tests.fixtures_data import load_random_quantizers
    from tests.options import student_options

    def build() -> nn.Module:
        torch.manual_seed(0)
        opt = student_options('letkd2', model_s='resnet8', model_t='resnet8', dataset='cifar100', k_penult=8,
                              k_inter=2, sync_bn=True)
        distiller = LetKD2(create_model('resnet8', num_classes=10), create_model('resnet8', num_classes=10), opt,
                           DataInfo(num_classes=10, n_data=20, image_size=32))
        load_random_quantizers(distiller)
        return distiller

    distiller, plain = build(), build()
    keys = list(distiller.state_dict())
    params = [id(p) for p in distiller.parameters()]
    distributed.wrap(distiller, torch.device('cpu'))            # one process: a note, nothing converted
    assert 'no effect in a single process' in capsys.readouterr().out
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in distiller.modules())
    count = distributed.convert_sync_batchnorm(distiller)
    assert count > 0 and list(distiller.state_dict()) == keys and [id(p) for p in distiller.parameters()] == params
    bns = {name: type(m) for name, m in distiller.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert all(t is nn.SyncBatchNorm for name, t in bns.items() if not name.startswith('teacher.')), bns
    assert all(t is nn.BatchNorm2d for name, t in bns.items() if name.startswith('teacher.')), bns
    assert any(name.startswith('student.kd_layers.') for name in bns)       # letKD's KD layers are converted too
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
                   for m in distiller.deployable().modules())
    save_checkpoint({'model': distiller.deployable().state_dict(), 'deploy': distiller.deploy_spec()},
                    tmp_path / 'ckpt.pth')
    loaded = load_deployed(tmp_path / 'ckpt.pth')                          # strict
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in loaded.modules())
    plain.load_state_dict_without_teacher(distiller.state_dict_without_teacher())   # what --resume loads
