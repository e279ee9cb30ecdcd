"""The letKD/QUEST quantizer cache on GPUs and in sweeps: the k-means backend is part of the key, faiss runs on
the run's own GPU (emulated: no GPU here), the per-class k-means stay on the CPU, and runs that start together
share one build under a file lock."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from helper import letkd_offline
from helper.letkd_offline import OfflineSettings, expected_meta, faiss_gpu_for, kmeans

ROOT = Path(__file__).resolve().parents[1]


class FakeConfig:
    device = -1


@pytest.fixture
def fake_faiss_gpus(monkeypatch):
    """faiss with 4 'GPUs': a GPU flat index records the device it is built for and computes on the CPU."""
    devices: list[int] = []

    def gpu_index(resources, dim, config):
        devices.append(config.device)
        return faiss.IndexFlatL2(dim)

    monkeypatch.setattr(faiss, 'get_num_gpus', lambda: 4, raising=False)
    monkeypatch.setattr(faiss, 'StandardGpuResources', lambda: object(), raising=False)
    monkeypatch.setattr(faiss, 'GpuIndexFlatConfig', FakeConfig, raising=False)
    monkeypatch.setattr(faiss, 'GpuIndexFlatL2', gpu_index, raising=False)
    return devices


def test_the_penultimate_kmeans_runs_on_the_runs_own_gpu(fake_faiss_gpus):
    assert faiss_gpu_for(torch.device('cpu')) is None
    assert faiss_gpu_for(torch.device('cuda', 2)) == 2            # not every visible GPU, not GPU 0
    x = np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32)
    on_gpu = kmeans(x, 8, seed=0, gpu=2)
    assert fake_faiss_gpus == [2]
    on_cpu = kmeans(x, 8, seed=0)
    assert fake_faiss_gpus == [2]                                  # the CPU path builds no GPU index
    assert np.array_equal(on_gpu[0], on_cpu[0]) and np.array_equal(on_gpu[1], on_cpu[1])


def test_the_kmeans_backend_is_part_of_the_cache_key():
    common = dict(teacher_sha256='ab' * 32, teacher_arch='resnet8', dataset='cifar100', n_images=10,
                  num_classes=2, pool_size=(8, 8), settings=OfflineSettings())
    cpu = expected_meta('penult', **common, backend='faiss-cpu')
    gpu = expected_meta('penult', **common, backend='faiss-gpu')
    assert cpu['kmeans_backend'] == 'faiss-cpu' and gpu['kmeans_backend'] == 'faiss-gpu'
    assert letkd_offline.cache_path('c', cpu) != letkd_offline.cache_path('c', gpu)
    # the intermediate quantizer's per-class k-means always run on the CPU, whatever the device
    assert expected_meta('inter', **common, backend='faiss-gpu')['kmeans_backend'] == 'faiss-cpu'


def test_per_class_kmeans_stay_on_the_cpu_on_a_cuda_run(fake_faiss_gpus, monkeypatch):
    calls = []
    real = letkd_offline.kmeans

    def spy(x, k, seed, gpu=None, what='points'):
        calls.append(gpu)
        return real(x, k, seed, gpu, what)

    monkeypatch.setattr(letkd_offline, 'kmeans', spy)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    features = (rng.standard_normal((120, 6)) + labels[:, None] * 3).astype(np.float32)
    # device 'meta' would break the tensor maths; the choice of backend is what matters: cpu tensors here
    letkd_offline.build_subclasses(features, labels, 3, 2, 2, 0, torch.device('cpu'))
    assert calls == [None, None, None]


def test_runs_that_start_together_share_one_build(tmp_path, data_dir, vanilla_teacher):
    """Two offline builds of the same quantizers at once: one builds, the other waits and reuses the files."""
    teacher = vanilla_teacher('resnet8')
    argv = [sys.executable, str(ROOT / 'helper' / 'letkd_offline.py'), '--path_t', str(teacher), '--model_s',
            'resnet8', '--data_folder', data_dir, '--save_dir', str(tmp_path), '--num_workers', '0', '--device',
            'cpu', '--k_penult', '16', '--k_inter', '2']
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    text = '\n'.join(outputs)
    assert text.count('letKD quantizers: building') == 1, text
    assert text.count('quantizer: reusing') == 2, text            # the waiting run reuses both files
    assert len(list((tmp_path / 'cache' / 'letkd').glob('*.pth'))) == 2
