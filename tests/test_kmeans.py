"""The offline stage's k-means backends (helper/letkd_offline.py): the torch k-means against faiss on the CPU,
seeds reaching both backends, empty clusters, chunked distances, fp32 under TF32, backend choice, CPU threads,
and the training path on a machine without faiss, submitit and matplotlib."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from helper import letkd_offline
from helper.errors import UserError
from helper.letkd_offline import (KMEANS_ITERS, build_codebook, build_subclasses, kmeans, kmeans_torch,
                                  offline_threads, resolve_kmeans_backend)

faiss = pytest.importorskip('faiss')
ROOT = Path(__file__).resolve().parents[1]
CPU, CUDA = torch.device('cpu'), torch.device('cuda', 1)


def activations(n=20_000, dim=64, seed=0):
    """ReLU of an anisotropic Gaussian: a feature-like cloud without clear clusters (k-means optima of similar
    inertia whatever the start)."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.standard_normal((n, dim)) * np.linspace(3.0, 0.2, dim), 0).astype(np.float32)


def inertia(x, centroids, assignment):
    return float(((x - centroids[assignment]) ** 2).sum(dtype=np.float64))


def separated_clusters(k=8, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)) * 10
    truth = np.repeat(np.arange(k), rng.integers(100, 400, k))
    return (centers[truth] + rng.normal(size=(len(truth), dim))).astype(np.float32), truth


def faiss_kmeans_from(x, init):
    """faiss's Lloyd iterations from given initial centroids (faiss keeps preset centroids as its start)."""
    k, dim = init.shape
    clustering = faiss.Clustering(dim, k)
    clustering.niter, clustering.max_points_per_centroid = KMEANS_ITERS, -(-len(x) // k)
    faiss.copy_array_to_vector(np.ascontiguousarray(init).ravel(), clustering.centroids)
    index = faiss.IndexFlatL2(dim)
    clustering.train(x, index)
    centroids = faiss.vector_to_array(clustering.centroids).reshape(k, dim)
    index.reset()
    index.add(centroids)
    return centroids, index.search(x, 1)[1].ravel()


# ---------------------------------------------------------------------------------------------- against faiss

@pytest.mark.parametrize('seed', [0, 1, 2])
def test_torch_kmeans_inertia_is_within_one_percent_of_faiss(seed):
    x = activations()
    ratio = inertia(x, *kmeans(x, 64, seed, backend='torch')) / inertia(x, *kmeans(x, 64, seed, backend='faiss'))
    print(f'seed {seed}: torch / faiss inertia {ratio:.5f}')
    assert abs(ratio - 1) < 0.01


def test_from_the_same_start_torch_and_faiss_give_the_same_clustering():
    """Separated clusters, started from one point of each: both backends find the true clusters, with the
    same labels (same start) and the same centroids (the cluster means)."""
    x, truth = separated_clusters()
    init = x[np.searchsorted(truth, np.arange(8))]
    centroids_f, assign_f = faiss_kmeans_from(x, init)
    centroids_t, assign_t = kmeans_torch(x, 8, seed=0, init=torch.from_numpy(init))
    np.testing.assert_array_equal(assign_t, assign_f)
    np.testing.assert_array_equal(assign_t, truth)
    means = np.stack([x[truth == c].mean(0) for c in range(8)])
    np.testing.assert_allclose(centroids_t, means, atol=1e-4)
    np.testing.assert_allclose(centroids_t, centroids_f, atol=1e-4)


@pytest.mark.parametrize('backend', ['torch', 'faiss'])
def test_two_separated_clusters_are_found_from_any_seed(backend):
    """Random starts on two far-apart clusters of unequal sizes: the same partition (up to the label order)."""
    rng = np.random.default_rng(3)
    truth = np.repeat([0, 1], [700, 300])
    x = (np.where(truth[:, None] == 0, 0.0, 12.0) + rng.normal(size=(1000, 8))).astype(np.float32)
    for seed in range(5):
        _, assignment = kmeans(x, 2, seed, backend=backend)
        assert np.array_equal(assignment, truth) or np.array_equal(assignment, 1 - truth), seed


@pytest.mark.parametrize('backend', ['torch', 'faiss'])
def test_the_seed_reaches_the_kmeans(backend):
    x = activations(4000, 16)
    a, b, c = (build_codebook(x, 32, seed, backend=backend)['centroids'] for seed in (0, 0, 1))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize('backend', ['torch', 'faiss'])
def test_the_seed_reaches_the_per_class_kmeans_of_the_subclasses(backend):
    """The intermediate quantizer's per-class k-means (build_subclasses) get the seed too: the same seed rebuilds
    the same sub-class centroids, another seed other ones (clouds without clear clusters, 6 per class)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 300)
    x = (np.maximum(rng.standard_normal((900, 8)) * np.linspace(3, 0.5, 8), 0) + labels[:, None] * 0.5).astype(np.float32)
    a, b, c = (build_subclasses(x, labels, 3, 6, 2, seed, CPU, backend=backend)[0]['centroids'] for seed in (0, 0, 1))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_the_torch_start_is_a_seeded_sample_drawn_on_the_cpu():
    """Zero iterations return the start: the rows torch.randperm(N, CPU generator seeded with the seed) picks,
    so a seed starts from the same rows on any device."""
    x = activations(500, 4)
    centroids, _ = kmeans_torch(x, 7, seed=5, iters=0)
    expected = x[torch.randperm(500, generator=torch.Generator().manual_seed(5))[:7].numpy()]
    np.testing.assert_array_equal(centroids, expected)


# ---------------------------------------------------------------------------------------------- mechanics

def test_an_empty_cluster_takes_the_farthest_point_of_the_largest_cluster():
    """Two blobs (A: 60 points, wide along x; B: 40 points); the third start is far from everything, so its
    cluster is empty after the first assignment: it is re-seeded inside A, which the next iterations split.
    B stays one cluster, no cluster ends empty, and the inertia beats the two-cluster optimum."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 2)) * [4.0, 0.3]
    b = rng.normal(size=(40, 2)) * 0.3 + [30.0, 0.0]
    x = np.concatenate([a, b]).astype(np.float32)
    init = torch.tensor([[0.0, 0.0], [30.0, 0.0], [500.0, 500.0]])
    centroids, assignment = kmeans_torch(x, 3, seed=0, init=init)
    counts = np.bincount(assignment, minlength=3)
    assert counts.min() > 0 and counts.sum() == 100
    assert set(assignment[60:]) == {1} and 1 not in set(assignment[:60])
    two = inertia(x, np.stack([a.mean(0), b.mean(0)]).astype(np.float32), np.repeat([0, 1], [60, 40]))
    assert inertia(x, centroids, assignment) < 0.5 * two
    # after one iteration the empty cluster sits on A's point farthest from A's first centroid
    centroids_1, _ = kmeans_torch(x, 3, seed=0, init=init, iters=1)
    farthest = a[np.argmax(((a - [0.0, 0.0]) ** 2).sum(1))]
    np.testing.assert_allclose(centroids_1[2], farthest, rtol=1e-6)
    # four empty clusters at once: A (60) gives one, B (40) the next, then A again, then the cluster re-seeded
    # first (it owns no rows yet: it splits A's rows again); none ends empty
    far = torch.tensor([[500.0, 500.0], [-500.0, 500.0], [500.0, -500.0], [-500.0, -500.0]])
    centroids, assignment = kmeans_torch(x, 6, seed=0, init=torch.cat([init[:2], far]))
    counts = np.bincount(assignment, minlength=6)
    assert counts.min() > 0 and counts.sum() == 100
    assert len(set(assignment[60:]) & set(assignment[:60])) == 0


def test_distances_are_computed_in_bounded_chunks(monkeypatch):
    """No N x K distance matrix: each block is at most chunk_bytes / (4 K + 16 D) rows, and chunking does not
    change the result."""
    x = activations(5000, 8)
    blocks = []
    real = torch.addmm

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        blocks.append(tuple(out.shape))
        return out

    whole = kmeans_torch(x, 16, seed=0)
    monkeypatch.setattr(torch, 'addmm', spy)
    chunked = kmeans_torch(x, 16, seed=0, chunk_bytes=64 * (4 * 16 + 16 * 8))
    assert blocks and max(rows for rows, _ in blocks) == 64 and {k for _, k in blocks} == {16}
    assert len(blocks) == (KMEANS_ITERS + 1) * -(-5000 // 64)
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(chunked[1], whole[1])


def test_too_many_clusters_is_a_user_error_for_both_backends():
    for backend in ('torch', 'faiss'):
        with pytest.raises(UserError, match='k-means of 5 points into 6 clusters'):
            kmeans(np.zeros((5, 2), np.float32), 6, 0, backend=backend)


TF32_SCRIPT = """
import numpy as np, torch
from helper.letkd_offline import kmeans_torch
{switch_on}
seen = []
real = torch.addmm
def spy(*args, **kwargs):
    seen.append({read})
    return real(*args, **kwargs)
torch.addmm = spy
kmeans_torch(np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32), 3, seed=0)
print(sorted(set(seen)), {read})
"""


@pytest.mark.parametrize('switch_on, read, inside, after', [
    ('torch.backends.cuda.matmul.allow_tf32 = True', 'torch.get_float32_matmul_precision()', 'highest', 'high'),
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", 'torch.backends.cuda.matmul.fp32_precision', 'ieee',
     'tf32'),
])
def test_kmeans_gemms_run_in_fp32_when_the_caller_enabled_tf32(switch_on, read, inside, after):
    """Either of torch's TF32 switches (one per process: torch refuses a mix): off during the distance GEMMs,
    back on afterwards."""
    script = TF32_SCRIPT.format(switch_on=switch_on, read=read)
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"['{inside}']", after]


# ---------------------------------------------------------------------------------------------- backend choice

@pytest.fixture
def no_faiss(monkeypatch):
    """faiss not installed: 'import faiss' raises ImportError."""
    monkeypatch.setitem(sys.modules, 'faiss', None)


def test_auto_backend_choice(monkeypatch):
    # faiss-cpu installed (no GPU support): faiss on a CPU run, torch on the GPU of a CUDA run
    monkeypatch.setattr(faiss, 'get_num_gpus', lambda: 0, raising=False)
    assert resolve_kmeans_backend('auto', CPU).name == 'faiss-cpu'
    cuda = resolve_kmeans_backend('auto', CUDA)
    assert (cuda.name, cuda.device, cuda.family) == ('torch-cuda', CUDA, 'torch')
    assert resolve_kmeans_backend('faiss', CUDA).name == 'faiss-cpu'         # asked for: faiss on the CPU
    assert resolve_kmeans_backend('torch', CPU).name == 'torch-cpu'
    # faiss with GPU support: its flat index on the run's own GPU
    monkeypatch.setattr(faiss, 'get_num_gpus', lambda: 4, raising=False)
    gpu = resolve_kmeans_backend('auto', CUDA)
    assert (gpu.name, gpu.gpu, gpu.on_cpu().name) == ('faiss-gpu', 1, 'faiss-cpu')
    assert resolve_kmeans_backend('torch', CUDA).name == 'torch-cuda'


def test_without_faiss_auto_is_torch_and_faiss_is_a_user_error(no_faiss):
    assert resolve_kmeans_backend('auto', CPU).name == 'torch-cpu'
    assert resolve_kmeans_backend('auto', CUDA).name == 'torch-cuda'
    with pytest.raises(UserError, match='--kmeans_backend faiss needs the faiss package'):
        resolve_kmeans_backend('faiss', CPU)


def test_the_training_path_needs_no_faiss_submitit_or_matplotlib(tmp_path):
    """A bare GPU machine's packages: importing the training CLI, the methods and the offline module works
    with faiss, submitit and matplotlib unimportable; 'auto' becomes torch, a torch-built quantizer comes out,
    and --kmeans_backend faiss is a one-line UserError from the CLI."""
    script = textwrap.dedent(f"""
        import sys
        for name in ('faiss', 'submitit', 'matplotlib'):
            sys.modules[name] = None                      # 'import faiss' raises ImportError
        import numpy as np, torch
        import train_student, distiller_zoo
        from helper import letkd_offline as lo
        assert lo.resolve_kmeans_backend('auto', torch.device('cpu')).name == 'torch-cpu'
        rng = np.random.default_rng(0)
        labels = np.repeat(np.arange(3), 40)
        x = (rng.standard_normal((120, 6)) + labels[:, None] * 3).astype(np.float32)
        codebook = lo.build_codebook(x, 8, 0)
        tensors, extra = lo.build_subclasses(x, labels, 3, 2, 60, 0, torch.device('cpu'))
        assert codebook['centroids'].shape == (8, 6) and int(codebook['counts'].sum()) == 120
        assert tensors['scores'].shape == (6, 6) and extra == {{'n_comp': 2, 'lda_rank': 2}}
        assert not any(sys.modules.get(name) for name in ('faiss', 'submitit', 'matplotlib'))
        code = lo.cli(['--path_t', {str(tmp_path / 'x.pth')!r}, '--model_t', 'resnet8', '--model_s', 'resnet8',
                      '--kmeans_backend', 'faiss'])
        print('exit', code)
    """)
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == 'exit 2'
    assert out.stderr.strip().splitlines() == ['error: --kmeans_backend faiss needs the faiss package, which is not '
                                               'installed: pip install faiss-cpu (or faiss-gpu), or use '
                                               '--kmeans_backend torch']


# ---------------------------------------------------------------------------------------------- threads

def blas_threads():
    return sorted({info['num_threads'] for info in threadpool_info() if info['user_api'] == 'blas'})


@pytest.fixture
def one_thread():
    """The torchrun situation (OMP_NUM_THREADS=1): everything on one thread before the build."""
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1):
        torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)
        yield
    torch.set_num_threads(before[0])
    faiss.omp_set_num_threads(before[1])


def test_offline_threads_are_the_allowed_cpus_and_restored(one_thread, monkeypatch):
    monkeypatch.setattr(letkd_offline.os, 'sched_getaffinity', lambda pid: {0, 1, 2}, raising=False)
    with offline_threads() as n:
        assert n == 3
        assert (torch.get_num_threads(), faiss.omp_get_max_threads(), blas_threads()) == (3, 3, [3])
    assert (torch.get_num_threads(), faiss.omp_get_max_threads(), blas_threads()) == (1, 1, [1])
    with offline_threads(2) as n:                        # --offline_threads 2
        assert (n, torch.get_num_threads(), faiss.omp_get_max_threads(), blas_threads()) == (2, 2, 2, [2])
    with pytest.raises(RuntimeError), offline_threads():  # restored on error too
        raise RuntimeError
    assert (torch.get_num_threads(), faiss.omp_get_max_threads(), blas_threads()) == (1, 1, [1])
