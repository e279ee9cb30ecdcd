"""CUDA code paths checked without a GPU: resume loading, CPU checkpoints, deterministic pooling, launcher devices.

CUDA is emulated: spies on torch.load / torch.save / subprocess.Popen, fake CUDA tensors
(FakeTensorMode), a patched torch.cuda, and a dispatch mode that lists the aten ops that ran.
"""
from __future__ import annotations

import argparse
import random
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from distiller_zoo.FSP import FSP
from helper.run import LAST, RunConfig, fit
from helper.util import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from models.util import pool_to_smaller
from scripts import launch


# ---------------------------------------------------------------------------------------------- resume


class _Stop(BaseException):
    """Raised by the torch.load spy once it has seen the call (not an Exception: load_checkpoint catches those)."""


def test_resume_loads_last_pth_on_the_cpu_whatever_the_training_device(tmp_path, monkeypatch):
    """RNG states must come back as CPU tensors, so last.pth is read with map_location='cpu' even for CUDA runs."""
    (tmp_path / LAST).write_bytes(b'placeholder')
    seen: list[Any] = []

    def spy_load(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get('map_location'))
        raise _Stop

    monkeypatch.setattr(torch, 'load', spy_load)
    distiller = types.SimpleNamespace(trainable_parameters=lambda: [nn.Parameter(torch.zeros(1))])
    cfg = RunConfig(run_dir=tmp_path, model_name='m', epochs=1, learning_rate=0.1, lr_decay_epochs=[],
                    lr_decay_rate=0.1, weight_decay=0.0, momentum=0.9, nesterov=False, seed=0, resume=True)
    with pytest.raises(_Stop):
        fit(distiller, data=None, cfg=cfg, device=torch.device('cuda'))
    assert len(seen) == 1
    assert torch.device(seen[0]).type == 'cpu', f'last.pth loaded with map_location={seen[0]!r}'


def test_cuda_rng_states_are_saved_and_restored_for_the_visible_devices(tmp_path, monkeypatch):
    """CUDA generator states go into last.pth and come back (as CPU ByteTensors) for each GPU that is visible."""
    saved = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]   # a 2-GPU run
    restored: list[list[torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_rng_state_all', lambda: [s.clone() for s in saved])
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', lambda states: restored.append(list(states)))
    random.seed(0)
    np.random.seed(0)
    state = rng_state()
    assert 'cuda' in state
    save_checkpoint({'rng': state}, tmp_path / 'rng.pth')
    loaded = load_checkpoint(tmp_path / 'rng.pth')['rng']

    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    set_rng_state(loaded)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)    # resumed with one visible GPU
    set_rng_state(loaded)
    assert [len(r) for r in restored] == [2, 1]
    for states in restored:
        for got, want in zip(states, saved):
            assert got.device.type == 'cpu' and got.dtype == torch.uint8 and torch.equal(got, want)


# ---------------------------------------------------------------------------------------------- checkpoints


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _structure(obj: Any) -> Any:
    """The object with each tensor replaced by (shape, dtype): keys, types and plain values kept."""
    if isinstance(obj, torch.Tensor):
        return ('tensor', tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return (type(obj).__name__, [(k, _structure(v)) for k, v in obj.items()])
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [_structure(v) for v in obj])
    return obj


def test_checkpoints_are_written_with_cpu_tensors_only(tmp_path, monkeypatch):
    """Weights, optimizer state and RNG states held on the GPU are written as CPU tensors, keys unchanged."""
    with FakeTensorMode():           # tensors that claim to live on cuda:0, no GPU needed
        model = OrderedDict(weight=torch.ones(3, 2, device='cuda'), bias=torch.zeros(3, device='cuda'),
                            num_batches_tracked=torch.tensor(5, device='cuda'))
        model._metadata = OrderedDict({'': {'version': 2}})
        optimizer = {'state': {0: {'momentum_buffer': torch.ones(3, 2, device='cuda')}},
                     'param_groups': [{'lr': 0.05, 'params': [0, 1]}]}
        rng = {'python': (3, (1, 2), None), 'torch': torch.zeros(8, dtype=torch.uint8),
               'cuda': [torch.zeros(16, dtype=torch.uint8, device='cuda')]}
        ckpt = {'epoch': 3, 'model': model, 'accuracy': 12.5, 'optimizer': optimizer, 'rng': rng,
                'distiller': {'memory': [torch.ones(4, device='cuda')]}}
    assert any(t.device.type == 'cuda' for t in _tensors(ckpt))
    written: list[Any] = []
    monkeypatch.setattr(torch, 'save', lambda obj, f: written.append(obj))
    save_checkpoint(ckpt, tmp_path / 'ckpt.pth')

    (obj,) = written
    devices = {t.device.type for t in _tensors(obj)}
    assert devices == {'cpu'}, f'checkpoint written with tensors on {devices}'
    assert _structure(obj) == _structure(ckpt)                   # same keys, containers and plain values
    assert obj['model']._metadata == {'': {'version': 2}}       # load_state_dict still sees the versions
    assert all(t.device.type == 'cuda' for t in _tensors(ckpt['model']))   # the caller's state is untouched


# ---------------------------------------------------------------------------------------------- pooling


class _AtenOps(TorchDispatchMode):
    """Records the name of every aten op that runs inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('big, small', [((32, 32), (16, 16)), ((16, 16), (8, 8)), ((32, 32), (8, 8)),
                                        ((8, 6), (4, 3)), ((8, 8), (4, 2))])
@pytest.mark.parametrize('big_first', [True, False])
def test_pool_to_smaller_uses_deterministic_avg_pool_for_integer_ratios(big, small, big_first):
    """Same values as adaptive pooling, but through avg_pool2d (forward and backward), never adaptive pooling."""
    torch.manual_seed(0)
    large = torch.randn(2, 3, *big, requires_grad=True)
    other = torch.randn(2, 3, *small)
    with _AtenOps() as mode:
        a, b = pool_to_smaller(large, other) if big_first else pool_to_smaller(other, large)
        pooled = a if big_first else b
        pooled.square().sum().backward()
    assert 'avg_pool2d' in mode.ops and 'avg_pool2d_backward' in mode.ops
    assert not [op for op in mode.ops if 'adaptive' in op], mode.ops
    assert torch.allclose(pooled, F.adaptive_avg_pool2d(large, small), atol=1e-6)
    assert (b if big_first else a) is other


def test_pool_to_smaller_falls_back_to_adaptive_pooling_for_other_ratios():
    torch.manual_seed(0)
    large, other = torch.randn(1, 2, 7, 7), torch.randn(1, 2, 3, 3)
    with _AtenOps() as mode:
        pooled, _ = pool_to_smaller(large, other)
    assert '_adaptive_avg_pool2d' in mode.ops
    assert torch.equal(pooled, F.adaptive_avg_pool2d(large, (3, 3)))


def test_fsp_loss_backward_runs_no_adaptive_pooling():
    """FSP on 32/16/8 maps (resnet CIFAR stages): the ops that --deterministic on CUDA needs."""
    torch.manual_seed(0)
    shapes = [(2, 16, 32, 32), (2, 16, 16, 16), (2, 16, 8, 8)]
    g_s = [torch.randn(*s, requires_grad=True) for s in shapes]
    g_t = [torch.randn(*s) for s in shapes]
    with _AtenOps() as mode:
        sum(FSP(shapes, shapes)(g_s, g_t)).backward()
    assert 'avg_pool2d_backward' in mode.ops
    assert not [op for op in mode.ops if 'adaptive' in op]


# ---------------------------------------------------------------------------------------------- launcher


class _FakeProc:
    returncode = 0

    def poll(self) -> int:
        return 0


@pytest.fixture
def children(monkeypatch) -> list[dict[str, Any]]:
    """Every child the launcher starts, as {'argv', 'env'}; nothing really runs."""
    started: list[dict[str, Any]] = []

    def fake_popen(argv, **kwargs):  # noqa: ANN001
        started.append({'argv': list(argv), 'env': dict(kwargs['env'])})
        return _FakeProc()

    monkeypatch.setattr(launch.subprocess, 'Popen', fake_popen)
    return started


def _commands(tmp_path: Path, n: int, extra: str = '') -> str:
    lines = [f'python train_teacher.py --model resnet8 --trial {i} --save_dir {tmp_path / "save"} {extra}'
             for i in range(n)]
    path = tmp_path / 'commands.txt'
    path.write_text('\n'.join(lines) + '\n')
    return str(path)


def _main(tmp_path: Path, commands: str, *flags: str) -> int:
    return launch.main([commands, '--poll', '0', '--log_dir', str(tmp_path / 'logs'), *flags])


@pytest.mark.parametrize('parent, gpus, expected', [
    ('4,5', '1', ['5']),
    ('4,5', '0,1', ['4', '5']),
    ('GPU-0a1b,GPU-2c3d', '1', ['GPU-2c3d']),
    (None, '1', ['1']),
])
def test_launcher_maps_gpu_positions_through_the_parents_visible_devices(tmp_path, monkeypatch, children,
                                                                         parent, gpus, expected):
    if parent is None:
        monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    else:
        monkeypatch.setenv('CUDA_VISIBLE_DEVICES', parent)
    assert _main(tmp_path, _commands(tmp_path, len(expected)), '--gpus', gpus) == 0
    assert [c['env']['CUDA_VISIBLE_DEVICES'] for c in children] == expected


def test_launcher_default_uses_every_visible_gpu_by_its_real_id(tmp_path, monkeypatch, children):
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '4,5')
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    args = argparse.Namespace(gpus=None, jobs_per_gpu=2, jobs=1)
    assert launch.slots_from(args) == ['4', '4', '5', '5']


def test_launcher_refuses_a_gpu_position_that_is_not_visible(tmp_path, monkeypatch, children):
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '4,5')
    with pytest.raises(SystemExit, match='not a position'):
        _main(tmp_path, _commands(tmp_path, 1), '--gpus', '2')
    assert children == []


def test_launcher_cpu_slots_hide_the_gpus_and_ask_for_the_cpu(tmp_path, monkeypatch, children):
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '4,5')
    assert _main(tmp_path, _commands(tmp_path, 2), '--gpus', '', '--jobs', '2') == 0
    assert len(children) == 2
    for child in children:
        assert child['env']['CUDA_VISIBLE_DEVICES'] == ''
        assert child['argv'][-2:] == ['--device', 'cpu']


@pytest.mark.parametrize('device_flag', ['--device cpu', '--device=auto'])
def test_launcher_cpu_slots_keep_a_device_the_command_names(tmp_path, monkeypatch, children, device_flag):
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    assert _main(tmp_path, _commands(tmp_path, 1, device_flag), '--gpus', '') == 0
    (child,) = children
    assert child['env']['CUDA_VISIBLE_DEVICES'] == ''
    assert sum(a.startswith('--device') for a in child['argv']) == 1
