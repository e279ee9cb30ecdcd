"""The letKD/QUEST quantizer cache on GPUs and in sweeps: the k-means backend is recorded in a file but is not
part of its identity (a file built by any backend serves every run; files named the older way are still
found), faiss runs on the run's own GPU (emulated: no GPU here), the per-class k-means stay on the CPU, the
build runs on all allowed CPU threads, and runs that start together share one build under a file lock."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from helper import letkd_offline
from helper.letkd_offline import OfflineSettings, expected_meta, faiss_gpu_for, kmeans
from helper.util import load_checkpoint

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
    on_gpu = kmeans(x, 8, seed=0, gpu=2, backend='faiss')
    assert fake_faiss_gpus == [2]
    on_cpu = kmeans(x, 8, seed=0, backend='faiss')
    assert fake_faiss_gpus == [2]                                  # the CPU path builds no GPU index
    assert np.array_equal(on_gpu[0], on_cpu[0]) and np.array_equal(on_gpu[1], on_cpu[1])


def test_the_kmeans_backend_is_not_part_of_the_cache_key():
    common = dict(teacher_sha256='ab' * 32, teacher_arch='resnet8', dataset='cifar100', n_images=10,
                  num_classes=2, pool_size=(8, 8), settings=OfflineSettings())
    for role in ('penult', 'inter'):
        meta = expected_meta(role, **common)
        assert 'kmeans_backend' not in meta
        # a metadata dict that carries a backend (e.g. a file's own) names the same file
        for backend in ('faiss-cpu', 'faiss-gpu', 'torch-cuda'):
            assert letkd_offline.cache_path('c', {**meta, 'kmeans_backend': backend}) == letkd_offline.cache_path('c', meta)
        # the build settings are not part of the identity either
        other = OfflineSettings(kmeans_backend='torch', threads=3)
        assert other == OfflineSettings() and expected_meta(role, **{**common, 'settings': other}) == meta


def test_per_class_kmeans_stay_on_the_cpu_on_a_cuda_run(fake_faiss_gpus, monkeypatch):
    calls = []
    real = letkd_offline.kmeans

    def spy(x, k, seed, gpu=None, what='points', **kw):
        calls.append((gpu, kw['backend'], kw['device']))
        return real(x, k, seed, gpu, what, **kw)

    monkeypatch.setattr(letkd_offline, 'kmeans', spy)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    features = (rng.standard_normal((120, 6)) + labels[:, None] * 3).astype(np.float32)
    backend = letkd_offline.resolve_kmeans_backend('auto', torch.device('cuda', 2))
    assert (backend.name, backend.on_cpu().name) == ('faiss-gpu', 'faiss-cpu')
    # device 'cpu' for the tensor maths (no GPU here); what matters is where the per-class k-means run
    letkd_offline.build_subclasses(features, labels, 3, 2, 2, 0, torch.device('cpu'), backend=backend.family)
    assert calls == [(None, 'faiss', torch.device('cpu'))] * 3


def offline_argv(data_dir, teacher, save_dir, *extra):
    return ['--path_t', str(teacher), '--model_s', 'resnet8', '--data_folder', data_dir, '--save_dir', str(save_dir),
            '--num_workers', '0', '--device', 'cpu', '--k_penult', '16', '--k_inter', '2', '--max_positions', '3000',
            *extra]


def test_a_file_built_by_one_backend_serves_every_backend(tmp_path, data_dir, vanilla_teacher, capsys):
    teacher = vanilla_teacher('resnet8')
    assert letkd_offline.cli(offline_argv(data_dir, teacher, tmp_path, '--kmeans_backend', 'torch')) == 0
    assert 'k-means torch-cpu' in capsys.readouterr().out
    files = sorted((tmp_path / 'cache' / 'letkd').glob('*.pth'))
    inter, penult = (load_checkpoint(p)['meta'] for p in files)
    assert (penult['kmeans_backend'], inter['kmeans_backend']) == ('torch-cpu', 'torch-cpu')
    assert penult['torch_version'] == str(torch.__version__) and penult['faiss_version'] is None
    assert inter['lda_solver'] == 'scatter-eigh'
    # a faiss run (and an auto run) finds the torch-built files and says who built them
    for backend in ('faiss', 'auto'):
        assert letkd_offline.cli(offline_argv(data_dir, teacher, tmp_path, '--kmeans_backend', backend)) == 0
        out = capsys.readouterr().out
        assert 'building' not in out and out.count('(built with torch-cpu)') == 2, out
    assert sorted((tmp_path / 'cache' / 'letkd').glob('*.pth')) == files


def test_files_named_by_the_older_digest_are_still_found(tmp_path, data_dir, vanilla_teacher, capsys):
    """Before the backend left the identity, the digest hashed the metadata with ``kmeans_backend``: such a file
    (here a faiss-gpu penultimate codebook) is found under its name and reused."""
    teacher = vanilla_teacher('resnet8')
    argv = offline_argv(data_dir, teacher, tmp_path, '--layers', 'penult')
    assert letkd_offline.cli(argv) == 0
    (built,) = (tmp_path / 'cache' / 'letkd').glob('*.pth')
    ckpt = load_checkpoint(built)
    identity = {key: value for key, value in ckpt['meta'].items()
                if key not in ('kmeans_backend', 'n_positions', 'channels', 'torch_version', 'faiss_version')}
    old_meta = {**identity, 'kmeans_backend': 'faiss-gpu'}
    old_name = f"resnet8_penult_cifar100_k16_{hashlib.sha256(json.dumps(old_meta, sort_keys=True).encode()).hexdigest()[:12]}.pth"
    old = built.parent / old_name
    torch.save({'tensors': ckpt['tensors'], 'meta': {**old_meta, 'n_positions': 3000, 'channels': 64}}, old)
    built.unlink()
    capsys.readouterr()
    paths = letkd_offline.main(letkd_offline.get_args_parser().parse_args(argv))
    assert paths == {'penult': old}
    assert f'reusing {old} (built with faiss-gpu)' in capsys.readouterr().out
    assert not built.exists()


def test_the_build_runs_on_every_allowed_cpu_and_restores_the_threads(tmp_path, data_dir, vanilla_teacher,
                                                                      monkeypatch):
    """Under torchrun (OMP_NUM_THREADS=1) the build still uses every CPU the process may run on (faiss and
    torch), unless --offline_threads says otherwise; the caller's one thread comes back afterwards."""
    teacher = vanilla_teacher('resnet8')
    seen = []
    real = letkd_offline.build_codebook

    def spy(*args, **kwargs):
        seen.append((torch.get_num_threads(), faiss.omp_get_max_threads()))
        return real(*args, **kwargs)

    monkeypatch.setattr(letkd_offline, 'build_codebook', spy)
    monkeypatch.setattr(letkd_offline.os, 'sched_getaffinity', lambda pid: set(range(3)), raising=False)
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    try:
        torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)
        assert letkd_offline.cli(offline_argv(data_dir, teacher, tmp_path / 'a', '--layers', 'penult')) == 0
        assert letkd_offline.cli(offline_argv(data_dir, teacher, tmp_path / 'b', '--layers', 'penult',
                                              '--offline_threads', '2')) == 0
        after = torch.get_num_threads(), faiss.omp_get_max_threads()
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])
    assert seen == [(3, 3), (2, 2)] and after == (1, 1)


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
