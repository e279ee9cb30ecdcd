"""The offline quantizers of letKD and QUEST: a library (used by Distiller.prepare) and a CLI.

    python helper/letkd_offline.py --path_t save/models/resnet56_vanilla/ckpt_epoch_240.pth --model_s resnet20

Input: the teacher's maps at the KD places (models/facts.py, ``kd_sites``) over the whole training split
with the test transform, in order; every position is one sample; a map larger than the student's is
average-pooled to the student's size first. More than ``--max_positions`` positions: a seeded uniform
sample of that many. The layers are built one at a time (one teacher pass per missing layer): a layer's
features are gathered, its quantizer built and saved, and the features freed before the next layer's pass,
so the host holds one layer's features at a time (the peak is written out in ``offline_memory_bound``).

- penultimate: k-means, K = --k_penult, 20 Lloyd iterations, initialised with a seeded random sample of K
  distinct positions, nothing subsampled, no preprocessing -> ``centroids`` (K, D), ``counts`` (K,).
  ``--kmeans_backend`` chooses the implementation: ``faiss`` (a flat index on the run's own GPU with
  faiss-gpu, else on the CPU), ``torch`` (``kmeans_torch``: this module's k-means on the run's device, CPU or
  CUDA, in true fp32), ``auto`` (default: faiss-gpu on a CUDA run when faiss has GPU support, else torch on
  the GPU; on a CPU run faiss-cpu when faiss is installed, else torch). faiss is optional: it is imported
  only where it is used.
- intermediate: LDA on (feature, image label) -> ``xbar`` (D,), ``scalings`` (D, n_comp) with
  n_comp = min(--lda_dim, LDA rank). ``fit_lda`` computes what sklearn's
  ``LinearDiscriminantAnalysis(solver='svd')`` computes (same ``xbar_``, same ``scalings_`` up to the sign of
  each column), from per-class sums and the D x D within-class scatter accumulated in chunks, never from a
  copy of the (N, D) matrix. Per class, k-means (same backend family, on the CPU: a few hundred points each)
  with K_inter = --k_inter on that class's projected points -> ``centroids`` (classes*K_inter, n_comp);
  sub-class of a point = nearest centroid of its own class; ``prototypes`` = sub-class means; ``scores``
  s_T[s, s'] = share of the points of sub-class s whose nearest prototype (among all sub-classes) is s'.
  A sub-class that ends up without points keeps its centroid as prototype and the one-hot row of itself in
  s_T; ``counts`` (classes*K_inter,) records the sizes.

While building, faiss's, BLAS's (threadpoolctl) and torch's CPU threads are set to the CPUs this process may
use (``--offline_threads``, default 0 = all of them: torchrun sets OMP_NUM_THREADS=1) and restored afterwards;
CUDA matrix products run in full fp32 even when the caller enabled TF32.

Output: one file per teacher and layer, ``<save_dir>/cache/letkd/<arch>_<layer>_<dataset>_k<K>_<digest>.pth``
(the digest hashes the identity metadata), written atomically: ``{'tensors': {...}, 'meta': {...}}``. The
identity metadata (teacher checkpoint sha256, arch, layer, site, pooling size, K, lda_dim, dataset, image
count, classes, seed, max_positions, k-means iterations, format version) must match on load, else UserError.
How the file was built is recorded too but is not part of its identity: ``kmeans_backend`` ('faiss-gpu',
'faiss-cpu', 'torch-cuda', 'torch-cpu'), ``torch_version``, ``faiss_version``, ``lda_solver``; a file built by
any backend serves every run with the same teacher, data and settings (the reuse message names the backend).
Files written before the backend left the identity (their digest also hashed ``kmeans_backend``) are still
found under their old names. Same seed and backend on the CPU, same files.
Runs that start together (the trials of a sweep) share one build: the check-and-build runs under a file lock
per teacher checkpoint (``.build-<sha>.lock`` beside the files), the others wait and reuse the files.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from filelock import FileLock
from threadpoolctl import threadpool_limits
from torch import Tensor

from dataset import DATASETS, get_dataloaders
from helper.errors import UserError
from helper.numerics import float32_matmuls
from helper.options import run_cli, teacher_name_from_path
from helper.teachers import teacher_exists, teacher_identity
from helper.util import load_checkpoint, load_teacher, progress, resolve_device, save_checkpoint
from models import Site, create_model, model_facts, model_names, site_shapes, tap

FORMAT_VERSION = 1
KMEANS_ITERS = 20
CHUNK_BYTES = 256 * 2**20    # working memory of one chunk of a large distance / scatter computation
ROLES = ('inter', 'penult')      # the two KD-layer places, in forward order
DEFAULT_MAX_POSITIONS = 3_200_000  # offline sample bound: all of CIFAR-100's 50,000 x 8x8 positions
KMEANS_BACKENDS = ('auto', 'faiss', 'torch')
NOT_IDENTITY = ('kmeans_backend',)   # recorded in a file's metadata, but not part of its name or its match check
LDA_TOL = 1e-4      # sklearn's default ``tol`` of LinearDiscriminantAnalysis(solver='svd')


# ---------------------------------------------------------------------------------------------- options

def add_quantizer_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The flags that define the quantizer files (shared by train_student.py and this CLI), and, in a second
    group, the flags that only say how they are built. Returns the first group."""
    g = parser.add_argument_group('letKD / QUEST quantizers')
    g.add_argument('--k_penult', type=int, default=4096, help='words of the penultimate codebook (k-means K)')
    g.add_argument('--k_inter', type=int, default=8, help='sub-classes per class at the intermediate layer (letkd2)')
    g.add_argument('--lda_dim', type=int, default=60,
                   help='LDA components kept at the intermediate layer (fewer if the rank is smaller)')
    g.add_argument('--quantizer_seed', type=int, default=0,
                   help='seed of the offline quantizers (k-means, position sampling); the same for every trial')
    g.add_argument('--max_positions', type=int, default=DEFAULT_MAX_POSITIONS,
                   help='offline quantizers sample at most this many teacher positions per layer '
                        '(default: all of CIFAR-100 at 8x8)')
    build = parser.add_argument_group('letKD / QUEST quantizer build (not part of the files\' identity)')
    build.add_argument('--kmeans_backend', default='auto', choices=KMEANS_BACKENDS,
                       help='k-means implementation: faiss (faiss-gpu on a CUDA run when it has GPU support, else '
                            'faiss-cpu), torch (on the run\'s device), auto (faiss-gpu, else torch on a CUDA run; '
                            'faiss-cpu, else torch on a CPU run)')
    build.add_argument('--offline_threads', type=int, default=0,
                       help='CPU threads of faiss, BLAS and torch while the quantizers are built '
                            '(0: every CPU this process may use; restored afterwards)')
    return g


def check_quantizer_options(opt: argparse.Namespace) -> None:
    """UserError for unusable quantizer flags (also: --kmeans_backend faiss without faiss installed)."""
    for flag in ('k_penult', 'k_inter', 'lda_dim', 'max_positions'):
        if getattr(opt, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(opt, flag)}")
    if getattr(opt, 'offline_threads', 0) < 0:
        raise UserError(f"--offline_threads must be 0 (all allowed CPUs) or more, got {opt.offline_threads}")
    if getattr(opt, 'kmeans_backend', 'auto') == 'faiss':
        import_faiss(required_by='--kmeans_backend faiss')


@dataclass(frozen=True)
class OfflineSettings:
    """The settings that define a quantizer file (besides the teacher and the data), then how it is built
    (``kmeans_backend``, ``threads``: not part of the file's identity)."""

    k_penult: int = 4096
    k_inter: int = 8
    lda_dim: int = 60
    seed: int = 0
    max_positions: int = DEFAULT_MAX_POSITIONS
    kmeans_backend: str = field(default='auto', compare=False)
    threads: int = field(default=0, compare=False)

    @classmethod
    def from_opt(cls, opt: argparse.Namespace) -> 'OfflineSettings':
        """From the flags of ``add_quantizer_arguments`` (``--quantizer_seed`` is the seed)."""
        return cls(opt.k_penult, opt.k_inter, opt.lda_dim, opt.quantizer_seed, opt.max_positions,
                   getattr(opt, 'kmeans_backend', 'auto'), getattr(opt, 'offline_threads', 0))


# ---------------------------------------------------------------------------------------------- places and maps

def kd_sites(model_name: str, roles: tuple[str, ...] = ROLES, dataset: str | None = None) -> dict[str, Site]:
    """The KD-layer places (models/facts.py) of a model of the zoo (as named for ``dataset``), for ``roles``;
    UserError for another name."""
    if model_name not in model_names():
        raise UserError(f"letKD/QUEST know no KD-layer places for model {model_name!r}; "
                        f"supported: {', '.join(model_names())}")
    sites = model_facts(model_name, dataset).kd_sites
    return {role: sites[role] for role in roles}


def pair_shapes(student: nn.Module, teacher: nn.Module, model_s: str, model_t: str, roles: tuple[str, ...],
                image_size: int, dataset: str | None = None
                ) -> tuple[dict[str, tuple[int, int, int]], dict[str, tuple[int, int, int]]]:
    """(student, teacher) site shapes; UserError when a teacher map is smaller than the student's
    (the teacher is average-pooled down to the student's size, never up)."""
    shapes_s = site_shapes(student, kd_sites(model_s, roles, dataset), image_size)
    shapes_t = site_shapes(teacher, kd_sites(model_t, roles, dataset), image_size)
    for role in roles:
        (_, hs, ws), (_, ht, wt) = shapes_s[role], shapes_t[role]
        if ht < hs or wt < ws:
            raise UserError(f"{model_t} -> {model_s}: the teacher's {role} map is {ht}x{wt}, smaller than the "
                            f"student's {hs}x{ws}; letKD/QUEST need a teacher map at least as large")
    return shapes_s, shapes_t


def pool_teacher_to(t: Tensor, size: tuple[int, int]) -> Tensor:
    """Average-pool a teacher map (B, D, H, W) down to ``size`` (e.g. 8x8 -> 4x4 is 2x2 / stride 2)."""
    return t if tuple(t.shape[2:]) == tuple(size) else F.adaptive_avg_pool2d(t, tuple(size))


def flatten_positions(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B*H*W, C): one row per position, ordered image, row, column."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


# ---------------------------------------------------------------------------------------------- quantizer maths

def codebook_targets(t: Tensor, centroids: Tensor, tau: float) -> Tensor:
    """``softmax_k(-tau * ||t_n - rho_k||^2)`` for rows t (N, D) and centroids rho (K, D) -> (N, K)."""
    # ||t_n||^2 is the same for every k and cancels in the softmax; leaving it out avoids cancellation error
    logits = tau * (2.0 * t @ centroids.t() - centroids.pow(2).sum(1))
    return logits.softmax(dim=1)


def lda_project(t: Tensor, xbar: Tensor, scalings: Tensor, matmul: Any = torch.matmul) -> Tensor:
    """The teacher's LDA projection ``(t - xbar) @ scalings``: (N, D) -> (N, n_comp); ``matmul`` computes the
    product (the training step passes helper.numerics.fp32_matmul: float32-accurate under TF32)."""
    return matmul(t - xbar, scalings)


def nearest_subclass_of_class(z: Tensor, labels: Tensor, centroids: Tensor, k_inter: int) -> Tensor:
    """Global index of the nearest of the ``k_inter`` centroids of class ``labels[n]`` for each row z_n.

    z (N, n_comp); labels (N,); centroids (classes * k_inter, n_comp), sub-class j belonging to class
    j // k_inter. Returns (N,) long.
    """
    own = centroids.view(-1, k_inter, centroids.shape[1])[labels]            # (N, k_inter, n_comp)
    return labels * k_inter + (z.unsqueeze(1) - own).pow(2).sum(2).argmin(1)


# ---------------------------------------------------------------------------------------------- features

class _PositionSink:
    """Collects the rows of one site over the data set, keeping a fixed seeded sample of at most
    ``max_positions`` positions (all of them when there are fewer)."""

    def __init__(self, total: int, dim: int, max_positions: int, rng: np.random.Generator) -> None:
        self.total = total
        self.keep = None if total <= max_positions else \
            np.sort(rng.choice(total, max_positions, replace=False, shuffle=False))
        size = total if self.keep is None else max_positions
        self.features = np.empty((size, dim), np.float32)
        self.labels = np.empty(size, np.int64)
        self.filled = 0
        self.seen = 0

    def add(self, rows: np.ndarray, labels: np.ndarray) -> None:
        start, self.seen = self.seen, self.seen + len(rows)
        if self.keep is not None:
            lo, hi = np.searchsorted(self.keep, [start, self.seen])
            picked = self.keep[lo:hi] - start
            rows, labels = rows[picked], labels[picked]
        self.features[self.filled:self.filled + len(rows)] = rows
        self.labels[self.filled:self.filled + len(rows)] = labels
        self.filled += len(rows)


@torch.no_grad()
def collect_features(teacher: nn.Module, teacher_arch: str, roles: tuple[str, ...],
                     pool_sizes: dict[str, tuple[int, int]], loader: Iterable, n_images: int, *,
                     max_positions: int, seed: int, device: torch.device, dataset: str | None = None
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per role: (features (N, D) float32, image label of each row (N,)) of the teacher's pooled maps."""
    teacher.eval()
    sinks: dict[str, _PositionSink] = {}
    with tap(teacher, kd_sites(teacher_arch, roles, dataset)) as maps:
        for batch in progress(loader, 'teacher features'):
            teacher(batch[0].to(device))
            for role in roles:
                t = pool_teacher_to(maps[role], pool_sizes[role])
                per_image = t.shape[2] * t.shape[3]
                if role not in sinks:
                    rng = np.random.default_rng([seed, ROLES.index(role)])
                    sinks[role] = _PositionSink(n_images * per_image, t.shape[1], max_positions, rng)
                sinks[role].add(flatten_positions(t).float().cpu().numpy(),
                                np.repeat(batch[1].numpy().astype(np.int64), per_image))
    for role in roles:
        if role not in sinks or sinks[role].seen != sinks[role].total:
            raise UserError(f"the training loader did not yield the {n_images} images of its dataset")
    return {role: (sink.features, sink.labels) for role, sink in sinks.items()}


# ---------------------------------------------------------------------------------------------- build environment

def import_faiss(required_by: str | None = None) -> Any:
    """The faiss module, or None when it is not installed; UserError when ``required_by`` (a flag) needs it."""
    try:
        import faiss
    except ImportError:
        if required_by is not None:
            raise UserError(f"{required_by} needs the faiss package, which is not installed: "
                            f"pip install faiss-cpu (or faiss-gpu), or use --kmeans_backend torch") from None
        return None
    return faiss


def allowed_cpus() -> int:
    """How many CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:      # macOS, Windows
        return os.cpu_count() or 1


@contextlib.contextmanager
def offline_threads(limit: int = 0) -> Iterator[int]:
    """For the duration: ``limit`` CPU threads (0: ``allowed_cpus()``) for BLAS and OpenMP libraries
    (threadpoolctl), faiss (when it is imported) and torch's intra-op pool; the previous values are restored
    afterwards, also on error. Yields the thread count."""
    n = limit if limit > 0 else allowed_cpus()
    faiss = sys.modules.get('faiss')
    torch_before = torch.get_num_threads()
    faiss_before = faiss.omp_get_max_threads() if faiss is not None else None
    with threadpool_limits(limits=n):
        try:
            torch.set_num_threads(n)
            if faiss is not None:
                faiss.omp_set_num_threads(n)
            yield n
        finally:
            torch.set_num_threads(torch_before)
            if faiss is not None:
                faiss.omp_set_num_threads(faiss_before)


# ---------------------------------------------------------------------------------------------- clustering

@dataclass(frozen=True)
class KMeansBackend:
    """A resolved k-means backend: ``name`` is what a file's metadata records ('faiss-gpu', 'faiss-cpu',
    'torch-cuda', 'torch-cpu'); ``gpu`` the GPU of faiss-gpu's flat index; ``device`` where torch computes."""

    name: str
    gpu: int | None = None
    device: torch.device = torch.device('cpu')

    @property
    def family(self) -> str:
        """'faiss' or 'torch' (the ``backend`` argument of ``kmeans``)."""
        return self.name.split('-')[0]

    def on_cpu(self) -> 'KMeansBackend':
        """The same implementation on the CPU (the per-class k-means of a few hundred points each)."""
        return KMeansBackend(f'{self.family}-cpu')


def faiss_gpu_for(device: torch.device) -> int | None:
    """The GPU the penultimate faiss k-means runs on: the run's own CUDA device when faiss is installed with
    GPU support, else None."""
    if device.type != 'cuda':
        return None
    faiss = import_faiss()
    if faiss is None or getattr(faiss, 'get_num_gpus', lambda: 0)() == 0:
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def kmeans_backend(gpu: int | None) -> str:
    """The metadata name of faiss's k-means on ``gpu`` (None: the CPU)."""
    return 'faiss-cpu' if gpu is None else 'faiss-gpu'


def resolve_kmeans_backend(choice: str, device: torch.device) -> KMeansBackend:
    """``--kmeans_backend`` for a run on ``device``: 'faiss' -> faiss-gpu on the run's GPU when faiss has GPU
    support, else faiss-cpu (UserError without faiss); 'torch' -> torch on ``device``; 'auto' -> faiss-gpu,
    else faiss-cpu on a CPU run when faiss is installed, else torch on ``device`` (so a CUDA run without
    faiss-gpu clusters on its GPU)."""
    if choice not in KMEANS_BACKENDS:
        raise UserError(f"--kmeans_backend must be one of {', '.join(KMEANS_BACKENDS)}, got {choice!r}")
    if choice in ('auto', 'faiss'):
        faiss = import_faiss(required_by='--kmeans_backend faiss' if choice == 'faiss' else None)
        if faiss is not None:
            gpu = faiss_gpu_for(device)
            if gpu is not None:
                return KMeansBackend('faiss-gpu', gpu=gpu)
            if choice == 'faiss' or device.type != 'cuda':
                return KMeansBackend('faiss-cpu')
    return KMeansBackend(f'torch-{device.type}', device=device)


def kmeans(x: np.ndarray, k: int, seed: int, gpu: int | None = None, what: str = 'points', *,
           backend: str = 'auto', device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k-means of the rows of x (N, D) float32 into k clusters: 20 Lloyd iterations, initialised with a seeded
    random sample of k distinct rows, nothing subsampled -> (centroids (k, D) float32, assignment (N,) int64 to
    the final centroids).

    ``backend``: 'faiss' (``gpu``: the index of the one GPU whose flat index does the assignments, None: the
    CPU; faiss.Kmeans(gpu=True) would spread the work over every visible GPU instead of the run's device),
    'torch' (``kmeans_torch`` on ``device``, default the CPU) or 'auto' (faiss when installed, else torch).
    """
    n = len(x)
    if n < k:
        raise UserError(f"k-means of {n} {what} into {k} clusters is impossible: lower K or use more data")
    if backend == 'auto':
        backend = 'faiss' if import_faiss() is not None else 'torch'
    if backend == 'faiss':
        return _kmeans_faiss(x, k, seed, gpu)
    if backend == 'torch':
        return kmeans_torch(x, k, seed, device=device if device is not None else torch.device('cpu'))
    raise ValueError(f"unknown k-means backend {backend!r}")


def _kmeans_faiss(x: np.ndarray, k: int, seed: int, gpu: int | None) -> tuple[np.ndarray, np.ndarray]:
    faiss = import_faiss(required_by='--kmeans_backend faiss')
    n, dim = x.shape
    x = np.ascontiguousarray(x, dtype=np.float32)
    clustering = faiss.Clustering(dim, k)
    clustering.niter, clustering.seed, clustering.verbose = KMEANS_ITERS, seed, False
    clustering.max_points_per_centroid, clustering.min_points_per_centroid = -(-n // k), 1
    if gpu is None:
        index = faiss.IndexFlatL2(dim)
    else:
        config = faiss.GpuIndexFlatConfig()
        config.device = gpu
        index = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), dim, config)
    clustering.train(x, index)
    centroids = faiss.vector_to_array(clustering.centroids).reshape(k, dim)
    index.reset()
    index.add(centroids)
    _, assignment = index.search(x, 1)
    return centroids.copy(), assignment.ravel().astype(np.int64)


def _chunk_rows(bytes_per_row: int, chunk_bytes: int | None = None) -> int:
    """Rows per chunk so that a chunk's working memory stays within ``chunk_bytes`` (default ``CHUNK_BYTES``)."""
    return max(1, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // max(1, bytes_per_row))


def _resident(x: Tensor, device: torch.device) -> bool:
    """Whether the points can live on ``device`` for the whole k-means (CUDA: at most half its free memory)."""
    if device.type != 'cuda':
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return x.numel() * x.element_size() <= free // 2


@torch.no_grad()
def kmeans_torch(x: np.ndarray | Tensor, k: int, seed: int, *, device: torch.device = torch.device('cpu'),
                 iters: int = KMEANS_ITERS, init: Tensor | None = None, chunk_bytes: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """k-means in torch on ``device`` (CPU or CUDA): the ``kmeans`` contract, no faiss needed.

    - Initialisation: the rows ``torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:k]``, i.e.
      a seeded random sample of k distinct rows, as faiss does. The generator lives on the CPU, so a seed picks
      the same rows on every device. k-means++ was not chosen: it needs k sequential passes over the data
      (4096 passes of millions of points, the cost of ~200 Lloyd iterations), and the spec's reference is
      faiss's random sample. ``init`` (k, D) replaces the sample (tests).
    - ``iters`` Lloyd iterations (assign every row to its nearest centroid, move each centroid to the mean of
      its rows), then a final assignment to the final centroids. Squared L2 distances are
      ``||x||^2 - 2 x.c + ||c||^2`` in fp32 (TF32 off, ``float32_matmuls``), ties to the lower index;
      centroid sums accumulate in float64.
    - Empty clusters (no row assigned after an iteration): each, in index order, is re-seeded at the row of
      the currently largest cluster that lies farthest from the centroid it was assigned to, and the two share
      the larger cluster's count for the next pick (so several empty clusters split several large ones). The
      next iteration then divides that cluster between the two centroids. faiss instead copies a randomly chosen
      (large-biased) cluster's centroid with a small perturbation; ours needs no randomness and splits along
      the cluster's widest point.
    - Memory: the rows are read in chunks of at most ``chunk_bytes`` (default ``CHUNK_BYTES``) of working
      memory (a chunk's distance block chunk x k fp32, its float64 copy for the sums), never an N x k matrix;
      beyond x itself only the assignment (N int64) and each row's distance (N fp32), plus 2 k x D for
      centroids and sums. On CUDA the rows move to the GPU once when they take at most half its free memory,
      else chunk by chunk every pass.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    x = x.float().contiguous()
    n, dim = x.shape
    if n < k:
        raise UserError(f"k-means of {n} points into {k} clusters is impossible: lower K or use more data")
    if init is None:
        init = x[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]]
    centroids = init.to(device, torch.float32).clone()
    data = x.to(device) if _resident(x, device) else x
    if device.type == 'cpu':       # numpy-owned, so tracemalloc sees them (tests/test_offline_scale.py)
        assignment = np.empty(n, np.int64)
        assign, dist = torch.from_numpy(assignment), torch.from_numpy(np.empty(n, np.float32))
    else:
        assign = torch.empty(n, dtype=torch.int64, device=device)
        dist = torch.empty(n, dtype=torch.float32, device=device)
    rows = _chunk_rows(4 * k + 16 * dim, chunk_bytes)
    with float32_matmuls():
        for _ in range(iters):
            sums = torch.zeros(k, dim, dtype=torch.float64, device=device)
            counts = torch.zeros(k, dtype=torch.int64, device=device)
            _assign_rows(data, centroids, rows, assign, dist, sums, counts)
            centroids = (sums / counts.clamp_min(1).unsqueeze(1)).float()
            empty = (counts == 0).nonzero().flatten().tolist()
            if empty:
                _split_largest(centroids, counts, empty, data, assign, dist)
        _assign_rows(data, centroids, rows, assign, dist)
    return centroids.cpu().numpy(), assign.cpu().numpy() if device.type != 'cpu' else assignment


def _assign_rows(data: Tensor, centroids: Tensor, rows: int, assign: Tensor, dist: Tensor,
                 sums: Tensor | None = None, counts: Tensor | None = None) -> None:
    """Nearest centroid and its squared distance for every row (chunked), optionally accumulating the
    per-cluster sums and counts of the update."""
    device = centroids.device
    c_sq = centroids.pow(2).sum(1)
    for i in range(0, len(data), rows):
        xc = data[i:i + rows].to(device, non_blocking=True)
        value, index = torch.addmm(c_sq, xc, centroids.t(), alpha=-2.0).min(1)
        dist[i:i + rows] = (value + xc.pow(2).sum(1)).clamp_min_(0).to(dist.device)
        assign[i:i + rows] = index.to(assign.device)
        if sums is not None:
            sums.index_add_(0, index, xc.double())
            counts += torch.bincount(index, minlength=len(centroids))


def _split_largest(centroids: Tensor, counts: Tensor, empty: list[int], data: Tensor, assign: Tensor,
                   dist: Tensor) -> None:
    """Re-seed each empty cluster at the farthest row of the currently largest cluster (see kmeans_torch). A
    cluster re-seeded here owns no rows yet: when it is the largest, its rows are those of the cluster it came
    from."""
    counts = counts.clone()
    origin: dict[int, int] = {}
    for e in empty:
        j = int(counts.argmax())
        source = origin.get(j, j)
        members = (assign == source).nonzero().flatten()
        far = members[dist[members].argmax()]
        centroids[e] = data[far.to(data.device)].to(centroids.device)
        dist[far] = -1.0                # not picked twice
        origin[e] = source
        counts[e] = counts[j] // 2
        counts[j] -= counts[e]


def build_codebook(features: np.ndarray, k: int, seed: int, gpu: int | None = None, *, backend: str = 'auto',
                   device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The penultimate codebook: ``centroids`` (k, D) and cluster sizes ``counts`` (k,) (see ``kmeans``)."""
    centroids, assignment = kmeans(features, k, seed, gpu, what='teacher positions', backend=backend, device=device)
    return {'centroids': torch.from_numpy(centroids), 'counts': torch.from_numpy(np.bincount(assignment, minlength=k))}


# ---------------------------------------------------------------------------------------------- LDA

@torch.no_grad()
def fit_lda(features: np.ndarray, labels: np.ndarray, num_classes: int, device: torch.device = torch.device('cpu'),
            *, tol: float = LDA_TOL, chunk_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """LDA of rows ``features`` (N, D) with class ``labels`` (N,) -> (``xbar`` (D,), ``scalings`` (D, rank)),
    float64: what ``LinearDiscriminantAnalysis(solver='svd', tol=tol).fit(features, labels)`` gives as
    ``xbar_`` and ``scalings_`` (the latter up to the sign of each column), without copying the (N, D) matrix.

    Two chunked passes over the rows on ``device`` (float64): per-class sums and counts, then the within-class
    scatter S_w = sum_n (x_n - m_y)(x_n - m_y)^T (D x D). Then, as sklearn's svd solver does:
    - ``xbar`` = the class means weighted by the empirical priors n_c / N (= the mean of all rows);
    - with s_j = sqrt(S_w[j, j] / N) (1 where 0), the eigendecomposition of the within-class correlation
      S_w / N / (s s^T) = V diag(sigma^2) V^T (sklearn takes the SVD of the scaled centred rows, whose singular
      values are these sigma); directions with sigma <= tol are dropped (this is the guard for a singular
      S_w: its null space is not inverted, as in sklearn); W = diag(1/s) V_r diag(1/sigma_r) whitens the
      within-class covariance estimate S_w / N;
    - the class means' deviations, weighted by sqrt(n_c / (C - 1)), in the whitened space: their SVD
      U S2 V2^T; components with S2 > tol * S2[0] are kept: ``scalings`` = W V2.
    This solves the generalized eigenproblem S_b v = lambda S_w v on the range of S_w. Scale convention
    (sklearn >= 1.9, which divides by N; earlier versions by N - C, a factor sqrt((N - C) / N) on every
    component): the projected rows ``(x - xbar) @ scalings`` have identity within-class covariance
    S_w / N and decreasing between-class variance per component. Signs: the largest-magnitude entry of each
    column is made positive (sklearn's signs are whatever its LAPACK returns).
    """
    n, dim = features.shape
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    rows = _chunk_rows(28 * dim, chunk_bytes)
    sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
    for i in range(0, n, rows):
        sums.index_add_(0, y[i:i + rows].to(device), x[i:i + rows].to(device, torch.float64))
    counts = torch.bincount(y, minlength=num_classes).to(device)
    means = sums / counts.clamp_min(1).unsqueeze(1)
    within = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    for i in range(0, n, rows):
        centred = x[i:i + rows].to(device, torch.float64) - means[y[i:i + rows].to(device)]
        within.addmm_(centred.t(), centred)
    sums, within, means, counts = sums.cpu(), within.cpu(), means.cpu(), counts.cpu()
    xbar = sums.sum(0) / n

    std = (within.diagonal() / n).sqrt()
    std[std == 0] = 1.0
    eigenvalues, eigenvectors = torch.linalg.eigh(within / n / torch.outer(std, std))
    sigma = eigenvalues.flip(0).clamp_min(0).sqrt()
    eigenvectors = eigenvectors.flip(1)
    rank = int((sigma > tol).sum())
    if rank == 0:
        raise UserError("LDA at the intermediate layer: the teacher features do not vary within the classes")
    whiten = eigenvectors[:, :rank] / std.unsqueeze(1) / sigma[:rank]

    present = counts > 0
    n_classes = int(present.sum())
    fac = 1.0 if n_classes == 1 else 1.0 / (n_classes - 1)
    weights = (counts[present].double() * fac).sqrt().unsqueeze(1)
    _, s2, v2t = torch.linalg.svd(weights * (means[present] - xbar) @ whiten, full_matrices=False)
    keep = int((s2 > tol * s2[0]).sum()) if len(s2) and s2[0] > 0 else 0
    if keep == 0:
        raise UserError("LDA at the intermediate layer: the classes' mean teacher features are all equal")
    scalings = whiten @ v2t[:keep].t()
    peak = scalings.abs().argmax(0)
    scalings *= torch.sign(scalings[peak, torch.arange(keep)]).unsqueeze(0)
    return xbar.numpy(), scalings.numpy()


# ---------------------------------------------------------------------------------------------- sub-classes

def _as_numpy(a: np.ndarray | Tensor) -> np.ndarray:
    return a.numpy() if isinstance(a, Tensor) else np.asarray(a)


def _nearest_rows(z: np.ndarray, prototypes: torch.Tensor, device: torch.device) -> np.ndarray:
    """Index of the nearest prototype (squared L2) of every row of z, computed in chunks on ``device``."""
    protos = prototypes.to(device)
    sq_norms = protos.pow(2).sum(1)
    zt = torch.from_numpy(z)
    out = np.empty(len(z), np.int64)
    rows = _chunk_rows(12 * len(protos) + 8 * z.shape[1])
    for i in range(0, len(z), rows):
        out[i:i + rows] = (sq_norms - 2.0 * zt[i:i + rows].to(device) @ protos.t()).argmin(1).cpu().numpy()
    return out


def subclass_prototypes(z: np.ndarray | Tensor, subclass: np.ndarray | Tensor, centroids: Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each sub-class's rows (an empty sub-class keeps its centroid) and the sub-class sizes."""
    z, subclass = torch.as_tensor(z), torch.as_tensor(subclass)
    num = centroids.shape[0]
    counts = torch.bincount(subclass, minlength=num)
    sums = torch.zeros(num, z.shape[1], dtype=torch.float64)
    rows = _chunk_rows(8 * z.shape[1])
    for i in range(0, len(z), rows):
        sums.index_add_(0, subclass[i:i + rows], z[i:i + rows].double())
    means = sums / counts.clamp_min(1).unsqueeze(1)
    return torch.where(counts.unsqueeze(1) > 0, means, centroids.double()).float(), counts


def subclass_score_matrix(subclass: np.ndarray | Tensor, nearest: np.ndarray | Tensor, num_subclasses: int
                          ) -> torch.Tensor:
    """s_T[s, s'] = share of the points of sub-class s whose nearest prototype is s' (rows sum to 1).

    A sub-class without points gets the one-hot row of itself. Counts only the (sub-class, nearest) pairs that
    occur, so the memory is O(points) besides the float32 result (not a num_subclasses^2 int64 histogram).
    """
    subclass = _as_numpy(subclass).astype(np.int64, copy=False)
    pairs, pair_counts = np.unique(subclass * num_subclasses + _as_numpy(nearest), return_counts=True)
    rows, cols = np.divmod(pairs, num_subclasses)
    totals = np.bincount(subclass, minlength=num_subclasses)
    scores = np.zeros((num_subclasses, num_subclasses), np.float32)
    scores[rows, cols] = pair_counts / totals[rows]          # float64 division, rounded once to float32
    empty = np.flatnonzero(totals == 0)
    scores[empty, empty] = 1.0
    return torch.from_numpy(scores)


@float32_matmuls()      # the projection and the nearest-centroid distances in fp32 on CUDA too
def build_subclasses(features: np.ndarray, labels: np.ndarray, num_classes: int, k_inter: int, lda_dim: int,
                     seed: int, device: torch.device, *, backend: str = 'auto'
                     ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The intermediate quantizer (see the module docstring). Returns (tensors, {'n_comp', 'lda_rank'}).

    ``device`` runs the LDA's scatter, the projection and the nearest-prototype search; the per-class k-means
    (``backend`` 'faiss', 'torch' or 'auto', as ``kmeans``) run on the CPU: a few hundred points each.
    Besides ``features`` the host holds the projected rows (N x n_comp float32) and three N int64 arrays.
    """
    per_class = np.bincount(labels, minlength=num_classes)
    if per_class.min() < k_inter:
        c = int(per_class.argmin())
        raise UserError(f"class {c} has {per_class[c]} teacher positions, fewer than --k_inter {k_inter}")
    xbar64, scalings64 = fit_lda(features, labels, num_classes, device)
    rank = scalings64.shape[1]
    n_comp = min(lda_dim, rank)
    scalings = torch.from_numpy(np.ascontiguousarray(scalings64[:, :n_comp])).float()
    xbar = torch.from_numpy(xbar64).float()

    feats = torch.from_numpy(features)
    z = np.empty((len(features), n_comp), np.float32)
    dev_xbar, dev_scalings = xbar.to(device), scalings.to(device)
    rows = _chunk_rows(8 * features.shape[1] + 4 * n_comp)
    for i in range(0, len(z), rows):
        z[i:i + rows] = lda_project(feats[i:i + rows].to(device), dev_xbar, dev_scalings).cpu().numpy()

    centroids = torch.zeros(num_classes * k_inter, n_comp)
    for c in progress(range(num_classes), 'sub-class k-means'):
        class_centroids, _ = kmeans(z[labels == c], k_inter, seed, backend=backend, device=torch.device('cpu'))
        centroids[c * k_inter:(c + 1) * k_inter] = torch.from_numpy(class_centroids)

    dev_centroids = centroids.to(device)
    zt, labels_t = torch.from_numpy(z), torch.from_numpy(labels)
    subclass = np.empty(len(z), np.int64)
    rows = _chunk_rows(12 * k_inter * n_comp + 8)
    for i in range(0, len(z), rows):
        subclass[i:i + rows] = nearest_subclass_of_class(zt[i:i + rows].to(device), labels_t[i:i + rows].to(device),
                                                         dev_centroids, k_inter).cpu().numpy()
    prototypes, counts = subclass_prototypes(z, subclass, centroids)
    nearest = _nearest_rows(z, prototypes, device)
    tensors = {'scalings': scalings, 'xbar': xbar, 'centroids': centroids, 'prototypes': prototypes,
               'scores': subclass_score_matrix(subclass, nearest, len(centroids)), 'counts': counts}
    return tensors, {'n_comp': n_comp, 'lda_rank': rank}


# ---------------------------------------------------------------------------------------------- memory

def offline_memory_bound(n_positions: int, channels: int, *, total_positions: int = 0, batch_rows: int = 0,
                         k_penult: int = 0, n_comp: int = 0, num_classes: int = 0, num_subclasses: int = 0,
                         faiss: bool = False, chunk_bytes: int | None = None) -> int:
    """Upper bound (bytes) of the host memory the offline build allocates for one layer, S = ``n_positions``
    sampled rows of D = ``channels``: each layer is gathered, built and freed before the next, so building both
    layers peaks at the larger of their two bounds (the intermediate's, for equal S and D).

    - held through the layer's build: its rows S x 4D and their labels 8S, and the intermediate's score matrix
      4 P^2 (P = ``num_subclasses`` = classes x K_inter) once built;
    - plus the largest of the phases:
      gathering: the sorted sample indices 8S, numpy's draw of the sample (8 x ``total_positions``, while it
      runs), a batch's rows and its kept copy (2 ``batch_rows`` x (4D + 8));
      penultimate k-means (``k_penult`` > 0): the assignment 8S and each row's distance 4S (torch); faiss
      also 20S for its search output and 12S inside ``Clustering.train`` (``faiss``), centroids and float64
      sums 12 K D;
      intermediate (``num_subclasses`` > 0): the projected rows 4 S n_comp, the sub-class and
      nearest-prototype indices 16S, the pair counting of s_T (np.unique: 41S at most), the LDA's float64
      D x D matrices (4 of them) and class sums;
    - plus ``chunk_bytes`` (default ``CHUNK_BYTES``) of chunk working memory and 4 MiB of slack.
    numpy's arrays are visible to tracemalloc; torch's chunk working memory and faiss's own arrays are not
    (tests/test_offline_scale.py checks the bound with ``chunk_bytes=0``).
    """
    s, d = n_positions, channels
    held = s * (4 * d + 8) + 4 * num_subclasses ** 2
    phases = [8 * s + 8 * total_positions + 2 * batch_rows * (4 * d + 8)]
    if k_penult:
        phases.append((44 if faiss else 12) * s + 12 * k_penult * d)
    if num_subclasses:
        phases.append(s * (4 * n_comp + 16 + 41) + 8 * (4 * d * d + num_classes * d))
    return held + max(phases) + (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) + 4 * 2**20


# ---------------------------------------------------------------------------------------------- cache

def expected_meta(role: str, *, teacher_sha256: str, teacher_arch: str, dataset: str, n_images: int,
                  num_classes: int, pool_size: tuple[int, int], settings: OfflineSettings) -> dict[str, Any]:
    """The identity metadata a quantizer file must carry to be used for this teacher, data and settings
    (how it was built, e.g. ``kmeans_backend``, is recorded in the file but is not part of this)."""
    meta: dict[str, Any] = {
        'format_version': FORMAT_VERSION, 'layer': role, 'teacher_sha256': teacher_sha256,
        'teacher_arch': teacher_arch, 'site': kd_sites(teacher_arch, (role,), dataset)[role].module, 'dataset': dataset,
        'n_images': n_images, 'num_classes': num_classes, 'pool_size': [int(s) for s in pool_size],
        'seed': settings.seed, 'max_positions': settings.max_positions, 'kmeans_iters': KMEANS_ITERS,
    }
    if role == 'penult':
        meta.update(k=settings.k_penult)
    else:
        meta.update(k=settings.k_inter, lda_dim=settings.lda_dim)
    return meta


def _digest(meta: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]


def _file_name(meta: dict[str, Any], digest: str) -> str:
    return f"{meta['teacher_arch']}_{meta['layer']}_{meta['dataset']}_k{meta['k']}_{digest}.pth"


def cache_path(cache_dir: str | Path, meta: dict[str, Any]) -> Path:
    """``<cache_dir>/letkd/<arch>_<layer>_<dataset>_k<K>_<digest>.pth``; the digest hashes ``meta`` without the
    keys that are not part of a file's identity (``kmeans_backend``)."""
    identity = {key: value for key, value in meta.items() if key not in NOT_IDENTITY}
    return Path(cache_dir) / 'letkd' / _file_name(identity, _digest(identity))


def legacy_cache_paths(cache_dir: str | Path, meta: dict[str, Any]) -> list[Path]:
    """Where format-1 files written before the backend left the identity lie: their digest hashed the
    metadata with ``kmeans_backend`` ('faiss-cpu' or 'faiss-gpu' for the penultimate layer, 'faiss-cpu' for
    the intermediate one)."""
    identity = {key: value for key, value in meta.items() if key not in NOT_IDENTITY}
    if identity.get('format_version') != 1:
        return []
    backends = ('faiss-cpu', 'faiss-gpu') if identity['layer'] == 'penult' else ('faiss-cpu',)
    return [Path(cache_dir) / 'letkd' / _file_name(identity, _digest({**identity, 'kmeans_backend': backend}))
            for backend in backends]


def find_quantizer_file(cache_dir: str | Path, meta: dict[str, Any]) -> Path | None:
    """The existing file for ``meta``: its own name, else an older name (``legacy_cache_paths``); None."""
    for path in (cache_path(cache_dir, meta), *legacy_cache_paths(cache_dir, meta)):
        if path.is_file():
            return path
    return None


def read_quantizer_file(path: str | Path, meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, the file's metadata); UserError unless its identity metadata matches ``meta``."""
    ckpt = load_checkpoint(path)
    found = ckpt.get('meta')
    if not isinstance(found, dict) or not isinstance(ckpt.get('tensors'), dict):
        raise UserError(f"{path} is not a letKD quantizer file; delete it to rebuild")
    for key, value in meta.items():
        if key not in NOT_IDENTITY and found.get(key) != value:
            raise UserError(f"cached quantizer {path} does not match ({key}: file {found.get(key)!r}, "
                            f"expected {value!r}); delete it to rebuild")
    return ckpt['tensors'], found


def load_cached(path: str | Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a quantizer file; UserError unless its identity metadata matches ``meta``."""
    return read_quantizer_file(path, meta)[0]


def quantizer_files(*, teacher_arch: str, teacher_path: str | Path, roles: tuple[str, ...],
                    pool_sizes: dict[str, tuple[int, int]], dataset: str, n_images: int, num_classes: int,
                    settings: OfflineSettings, cache_dir: str | Path
                    ) -> tuple[dict[str, dict[str, Any]], dict[str, Path]]:
    """(expected identity metadata, file path for a new build) per role."""
    if not teacher_exists(teacher_path):
        raise UserError(f"letKD/QUEST need the teacher checkpoint file to identify the quantizers: {teacher_path}")
    sha = teacher_identity(teacher_path)
    metas = {role: expected_meta(role, teacher_sha256=sha, teacher_arch=teacher_arch, dataset=dataset,
                                 n_images=n_images, num_classes=num_classes, pool_size=pool_sizes[role],
                                 settings=settings) for role in roles}
    return metas, {role: cache_path(cache_dir, metas[role]) for role in roles}


def ensure_quantizers(teacher: nn.Module, *, teacher_arch: str, teacher_path: str | Path, roles: tuple[str, ...],
                      pool_sizes: dict[str, tuple[int, int]], loader: Any, dataset: str, num_classes: int,
                      settings: OfflineSettings, cache_dir: str | Path, device: torch.device
                      ) -> dict[str, dict[str, torch.Tensor]]:
    """The quantizer tensors per role: cached files that match are reused (whichever backend built them),
    missing ones built (k-means backend ``settings.kmeans_backend`` resolved for ``device``, CPU threads
    ``settings.threads``) and saved.

    Runs that need the same files (the trials of a sweep start together) share one build: the check and the
    build happen under a file lock per teacher checkpoint, so the second run waits and then reuses the files.
    """
    n_images = len(loader.dataset)
    metas, paths = quantizer_files(teacher_arch=teacher_arch, teacher_path=teacher_path, roles=roles,
                                   pool_sizes=pool_sizes, dataset=dataset, n_images=n_images,
                                   num_classes=num_classes, settings=settings, cache_dir=cache_dir)
    lock_dir = Path(cache_dir) / 'letkd'
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / f".build-{metas[roles[0]]['teacher_sha256'][:16]}.lock")):
        return _load_or_build(teacher, metas, paths, teacher_arch=teacher_arch, roles=roles, pool_sizes=pool_sizes,
                              loader=loader, n_images=n_images, num_classes=num_classes, settings=settings,
                              device=device, cache_dir=cache_dir, dataset=dataset)


def _load_or_build(teacher: nn.Module, metas: dict[str, dict[str, Any]], paths: dict[str, Path], *,
                   teacher_arch: str, roles: tuple[str, ...], pool_sizes: dict[str, tuple[int, int]], loader: Any,
                   n_images: int, num_classes: int, settings: OfflineSettings, device: torch.device,
                   cache_dir: str | Path, dataset: str | None = None
                   ) -> dict[str, dict[str, torch.Tensor]]:
    result: dict[str, dict[str, torch.Tensor]] = {}
    for role in roles:
        found = find_quantizer_file(cache_dir, metas[role])
        if found is not None:
            result[role], meta = read_quantizer_file(found, metas[role])
            print(f"==> letKD {role} quantizer: reusing {found} (built with {meta.get('kmeans_backend', 'unknown')})")
    missing = tuple(role for role in roles if role not in result)
    if not missing:
        return result

    backend = resolve_kmeans_backend(settings.kmeans_backend, device)
    with offline_threads(settings.threads) as threads, float32_matmuls():
        print(f"==> letKD quantizers: building {', '.join(missing)} from {teacher_arch} features of {n_images} "
              f"images (k-means {backend.name}, {threads} CPU threads, one teacher pass per layer)")
        for role in missing:       # one layer at a time: its features are freed before the next layer's pass
            ((feats, labels),) = collect_features(teacher, teacher_arch, (role,), pool_sizes, loader, n_images,
                                                  max_positions=settings.max_positions, seed=settings.seed,
                                                  device=device, dataset=dataset).values()
            built = {'n_positions': len(feats), 'channels': int(feats.shape[1]), 'torch_version': str(torch.__version__)}
            if role == 'penult':
                tensors = build_codebook(feats, settings.k_penult, settings.seed, backend.gpu, backend=backend.family,
                                         device=backend.device)
                built['kmeans_backend'] = backend.name
            else:
                tensors, extra = build_subclasses(feats, labels, num_classes, settings.k_inter, settings.lda_dim,
                                                  settings.seed, device, backend=backend.family)
                built.update(extra, kmeans_backend=backend.on_cpu().name, lda_solver='scatter-eigh')
            del feats, labels
            faiss = sys.modules.get('faiss') if backend.family == 'faiss' else None
            built['faiss_version'] = str(faiss.__version__) if faiss is not None else None
            paths[role].parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint({'tensors': tensors, 'meta': {**metas[role], **built}}, paths[role])
            print(f"==> letKD {role} quantizer: {built['n_positions']:,} positions -> {paths[role]}")
            result[role] = tensors
    return result


# ---------------------------------------------------------------------------------------------- CLI

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Build letKD/QUEST's offline quantizers for a teacher.")
    parser.add_argument('--path_t', required=True, help='teacher checkpoint')
    parser.add_argument('--model_t', default=None, help="teacher architecture; default: parsed from --path_t's folder")
    parser.add_argument('--model_s', required=True,
                        help="the student (only its map sizes matter: a larger teacher map is pooled to them)")
    parser.add_argument('--dataset', default='cifar100', choices=DATASETS)
    parser.add_argument('--data_folder', default='./data')
    parser.add_argument('--no_download', dest='download', action='store_false', help='never download CIFAR-100')
    parser.add_argument('--layers', nargs='+', default=list(ROLES), choices=ROLES,
                        help='which quantizers: penult (letKD-1, QUEST) and/or inter (letKD-2)')
    group = add_quantizer_arguments(parser)
    group.add_argument('--seed', dest='quantizer_seed', type=int, help='the same as --quantizer_seed')
    parser.add_argument('--batch_size', type=int, default=64)
    parser.add_argument('--num_workers', type=int, default=8)
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    parser.add_argument('--save_dir', default='./save', help='files go to <save_dir>/cache/letkd/')
    parser.add_argument('--trust_checkpoint', action='store_true',
                        help='allow checkpoints that need arbitrary pickled objects')
    return parser


def main(opt: argparse.Namespace) -> dict[str, Path]:
    """Build (or verify) the quantizer files; returns role -> file path (the one used)."""
    model_t = opt.model_t or teacher_name_from_path(opt.path_t)
    for flag, name in (('--model_t', model_t), ('--model_s', opt.model_s)):
        if name not in model_names():
            raise UserError(f"unknown {flag} {name!r}; choose one of: {', '.join(model_names())}")
    check_quantizer_options(opt)
    if opt.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {opt.batch_size}")
    if not teacher_exists(opt.path_t):
        raise UserError(f"teacher checkpoint not found: {opt.path_t}")
    roles = tuple(role for role in ROLES if role in opt.layers)
    device = resolve_device(opt.device)
    data = get_dataloaders(opt.dataset, opt.data_folder, opt.batch_size, opt.num_workers, mode='plain',
                           download=opt.download, test_batch_size=opt.batch_size, pin_memory=device.type == 'cuda')
    teacher = load_teacher(opt.path_t, model_t, data.num_classes, opt.trust_checkpoint,
                           dataset=opt.dataset).to(device).eval()
    student = create_model(opt.model_s, num_classes=data.num_classes, dataset=opt.dataset).to(device)
    shapes_s, _ = pair_shapes(student, teacher, opt.model_s, model_t, roles, data.image_size, opt.dataset)
    pool_sizes = {role: shapes_s[role][1:] for role in roles}
    settings = OfflineSettings.from_opt(opt)
    cache_dir = Path(opt.save_dir) / 'cache'
    ensure_quantizers(teacher, teacher_arch=model_t, teacher_path=opt.path_t, roles=roles, pool_sizes=pool_sizes,
                      loader=data.train_eval_loader, dataset=opt.dataset, num_classes=data.num_classes,
                      settings=settings, cache_dir=cache_dir, device=device)
    metas, paths = quantizer_files(teacher_arch=model_t, teacher_path=opt.path_t, roles=roles, pool_sizes=pool_sizes,
                                   dataset=opt.dataset, n_images=data.n_data, num_classes=data.num_classes,
                                   settings=settings, cache_dir=cache_dir)
    return {role: find_quantizer_file(cache_dir, metas[role]) or paths[role] for role in roles}


def cli(argv: list[str] | None = None) -> int:
    return run_cli(get_args_parser(), main, argv)


if __name__ == '__main__':
    sys.exit(cli())
