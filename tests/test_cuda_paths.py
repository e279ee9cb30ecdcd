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

import helper.run as run_module
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
