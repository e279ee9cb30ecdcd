"""The offline quantizers of letKD and QUEST: a library (used by Distiller.prepare) and a CLI.

    python helper/letkd_offline.py --path_t save/models/resnet56_vanilla/ckpt_epoch_240.pth --model_s resnet20

Input: the teacher's maps at the KD places (models/facts.py, ``kd_sites``) over the whole training split
with the test transform, in order; every position is one sample; a map larger than the student's is
average-pooled to the student's size first. More than ``--max_positions`` positions: a seeded uniform
sample of that many (memory: max_positions x channels x 4 bytes).

- penultimate: faiss k-means, K = --k_penult, 20 iterations, random init from the data, nothing subsampled,
  no preprocessing -> ``centroids`` (K, D), ``counts`` (K,). On a CUDA run with faiss-gpu installed the
  assignments use a flat index on the run's own GPU (``kmeans_backend`` 'faiss-gpu' in the metadata: GPU and
  CPU give slightly different codebooks, so they are different files); otherwise on the CPU.
- intermediate: sklearn LinearDiscriminantAnalysis(solver='svd') on (feature, image label) -> ``xbar`` (D,),
  ``scalings`` (D, n_comp) with n_comp = min(--lda_dim, LDA rank); per class faiss k-means with
  K_inter = --k_inter on that class's projected points, always on the CPU -> ``centroids`` (classes*K_inter, n_comp);
  sub-class of a point = nearest centroid of its own class; ``prototypes`` = sub-class means;
  ``scores`` s_T[s, s'] = share of the points of sub-class s whose nearest prototype (among all
  sub-classes) is s'. A sub-class that ends up without points keeps its centroid as prototype and
  the one-hot row of itself in s_T; ``counts`` (classes*K_inter,) records the sizes.

Output: one file per teacher and layer, ``<save_dir>/cache/letkd/<arch>_<layer>_<dataset>_k<K>_<digest>.pth``
(the digest hashes the metadata), written atomically: ``{'tensors': {...}, 'meta': {...}}``. The metadata
(teacher checkpoint sha256, arch, layer, site, pooling size, K, lda_dim, dataset, image count, classes, seed,
max_positions, k-means backend, format version) must match on load, else UserError. Same seed, same files.
Runs that start together (the trials of a sweep) share one build: the check-and-build runs under a file lock
per teacher checkpoint (``.build-<sha>.lock`` beside the files), the others wait and reuse the files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import faiss
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from filelock import FileLock
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from torch import Tensor

from dataset import DATASETS, get_dataloaders
from helper.errors import UserError
from helper.options import run_cli, teacher_name_from_path
from helper.teachers import teacher_exists, teacher_identity
from helper.util import load_checkpoint, load_teacher, progress, resolve_device, save_checkpoint
from models import Site, create_model, model_facts, model_names, site_shapes, tap

FORMAT_VERSION = 1
KMEANS_ITERS = 20
CHUNK = 65_536      # rows per distance computation
ROLES = ('inter', 'penult')      # the two KD-layer places, in forward order
DEFAULT_MAX_POSITIONS = 3_200_000  # offline sample bound: all of CIFAR-100's 50,000 x 8x8 positions


# ---------------------------------------------------------------------------------------------- options

def add_quantizer_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The flags that define the quantizer files (shared by train_student.py and this CLI)."""
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
    return g


def check_quantizer_options(opt: argparse.Namespace) -> None:
    """UserError for unusable quantizer flags."""
    for flag in ('k_penult', 'k_inter', 'lda_dim', 'max_positions'):
        if getattr(opt, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(opt, flag)}")


@dataclass(frozen=True)
class OfflineSettings:
    """The settings that define a quantizer file (besides the teacher and the data)."""

    k_penult: int = 4096
    k_inter: int = 8
    lda_dim: int = 60
    seed: int = 0
    max_positions: int = DEFAULT_MAX_POSITIONS

    @classmethod
    def from_opt(cls, opt: argparse.Namespace) -> 'OfflineSettings':
        """From the flags of ``add_quantizer_arguments`` (``--quantizer_seed`` is the seed)."""
        return cls(opt.k_penult, opt.k_inter, opt.lda_dim, opt.quantizer_seed, opt.max_positions)


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


# ---------------------------------------------------------------------------------------------- clustering

def faiss_gpu_for(device: torch.device) -> int | None:
    """The GPU the penultimate k-means runs on: the run's own CUDA device when faiss has GPU support, else None."""
    if device.type != 'cuda' or faiss.get_num_gpus() == 0:
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def kmeans_backend(gpu: int | None) -> str:
    """The name recorded in a quantizer file's metadata: faiss on GPU and on CPU give different codebooks."""
    return 'faiss-cpu' if gpu is None else 'faiss-gpu'


def kmeans(x: np.ndarray, k: int, seed: int, gpu: int | None = None, what: str = 'points'
           ) -> tuple[np.ndarray, np.ndarray]:
    """faiss k-means: 20 Lloyd iterations, random init from the data, nothing subsampled.

    x (N, D) float32 -> (centroids (k, D) float32, assignment (N,) int64). ``gpu``: the index of the one
    GPU whose flat index does the assignments (None: CPU); faiss.Kmeans(gpu=True) would spread the work
    over every visible GPU instead of the run's device.
    """
    n, dim = x.shape
    if n < k:
        raise UserError(f"k-means of {n} {what} into {k} clusters is impossible: lower K or use more data")
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


def build_codebook(features: np.ndarray, k: int, seed: int, gpu: int | None = None) -> dict[str, torch.Tensor]:
    """The penultimate codebook: ``centroids`` (k, D) and cluster sizes ``counts`` (k,)."""
    centroids, assignment = kmeans(features, k, seed, gpu, what='teacher positions')
    return {'centroids': torch.from_numpy(centroids), 'counts': torch.from_numpy(np.bincount(assignment, minlength=k))}


def _nearest_rows(z: torch.Tensor, prototypes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Index of the nearest prototype (squared L2) of every row of z, computed in chunks on ``device``."""
    protos = prototypes.to(device)
    sq_norms = protos.pow(2).sum(1)
    out = [(sq_norms - 2.0 * z[i:i + CHUNK].to(device) @ protos.t()).argmin(1).cpu() for i in range(0, len(z), CHUNK)]
    return torch.cat(out)


def subclass_prototypes(z: torch.Tensor, subclass: torch.Tensor, centroids: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each sub-class's rows (an empty sub-class keeps its centroid) and the sub-class sizes."""
    num = centroids.shape[0]
    counts = torch.bincount(subclass, minlength=num)
    sums = torch.zeros(num, z.shape[1], dtype=torch.float64).index_add_(0, subclass, z.double())
    means = sums / counts.clamp_min(1).unsqueeze(1)
    return torch.where(counts.unsqueeze(1) > 0, means, centroids.double()).float(), counts


def subclass_score_matrix(subclass: torch.Tensor, nearest: torch.Tensor, num_subclasses: int) -> torch.Tensor:
    """s_T[s, s'] = share of the points of sub-class s whose nearest prototype is s' (rows sum to 1).

    A sub-class without points gets the one-hot row of itself.
    """
    pairs = torch.bincount(subclass * num_subclasses + nearest, minlength=num_subclasses ** 2)
    pairs = pairs.view(num_subclasses, num_subclasses).double()
    rows = pairs.sum(1, keepdim=True)
    eye = torch.eye(num_subclasses, dtype=torch.float64)
    return torch.where(rows > 0, pairs / rows.clamp_min(1), eye).float()


def build_subclasses(features: np.ndarray, labels: np.ndarray, num_classes: int, k_inter: int, lda_dim: int,
                     seed: int, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The intermediate quantizer (see the module docstring). Returns (tensors, {'n_comp', 'lda_rank'})."""
    per_class = np.bincount(labels, minlength=num_classes)
    if per_class.min() < k_inter:
        c = int(per_class.argmin())
        raise UserError(f"class {c} has {per_class[c]} teacher positions, fewer than --k_inter {k_inter}")
    lda = LinearDiscriminantAnalysis(solver='svd').fit(features, labels)
    rank = lda.scalings_.shape[1]
    n_comp = min(lda_dim, rank)
    scalings = torch.from_numpy(np.ascontiguousarray(lda.scalings_[:, :n_comp])).float()
    xbar = torch.from_numpy(lda.xbar_).float()
    feats = torch.from_numpy(features)
    z = torch.cat([lda_project(feats[i:i + CHUNK], xbar, scalings) for i in range(0, len(feats), CHUNK)])

    labels_t = torch.from_numpy(labels)
    centroids = torch.zeros(num_classes * k_inter, n_comp)
    for c in progress(range(num_classes), 'sub-class k-means'):
        # a few hundred points into K_inter clusters: always on the CPU (a GPU index costs more than it saves)
        class_centroids, _ = kmeans(z[labels_t == c].numpy(), k_inter, seed)
        centroids[c * k_inter:(c + 1) * k_inter] = torch.from_numpy(class_centroids)

    dev_centroids = centroids.to(device)
    subclass = torch.cat([nearest_subclass_of_class(z[i:i + CHUNK].to(device), labels_t[i:i + CHUNK].to(device),
                                                    dev_centroids, k_inter).cpu() for i in range(0, len(z), CHUNK)])
    prototypes, counts = subclass_prototypes(z, subclass, centroids)
    nearest = _nearest_rows(z, prototypes, device)
    tensors = {'scalings': scalings, 'xbar': xbar, 'centroids': centroids, 'prototypes': prototypes,
               'scores': subclass_score_matrix(subclass, nearest, len(centroids)), 'counts': counts}
    return tensors, {'n_comp': n_comp, 'lda_rank': rank}


# ---------------------------------------------------------------------------------------------- cache

def expected_meta(role: str, *, teacher_sha256: str, teacher_arch: str, dataset: str, n_images: int,
                  num_classes: int, pool_size: tuple[int, int], settings: OfflineSettings,
                  backend: str = 'faiss-cpu') -> dict[str, Any]:
    """The metadata a quantizer file must carry to be used for this teacher, data and settings."""
    meta: dict[str, Any] = {
        'format_version': FORMAT_VERSION, 'layer': role, 'teacher_sha256': teacher_sha256,
        'teacher_arch': teacher_arch, 'site': kd_sites(teacher_arch, (role,), dataset)[role].module, 'dataset': dataset,
        'n_images': n_images, 'num_classes': num_classes, 'pool_size': [int(s) for s in pool_size],
        'seed': settings.seed, 'max_positions': settings.max_positions, 'kmeans_iters': KMEANS_ITERS,
    }
    if role == 'penult':
        meta.update(k=settings.k_penult, kmeans_backend=backend)
    else:   # the per-class k-means always runs on the CPU
        meta.update(k=settings.k_inter, lda_dim=settings.lda_dim, kmeans_backend='faiss-cpu')
    return meta


def cache_path(cache_dir: str | Path, meta: dict[str, Any]) -> Path:
    """``<cache_dir>/letkd/<arch>_<layer>_<dataset>_k<K>_<digest of meta>.pth``."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{meta['teacher_arch']}_{meta['layer']}_{meta['dataset']}_k{meta['k']}_{digest}.pth"
    return Path(cache_dir) / 'letkd' / name


def load_cached(path: str | Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a quantizer file; UserError unless its metadata matches ``meta``."""
    ckpt = load_checkpoint(path)
    found = ckpt.get('meta')
    if not isinstance(found, dict) or not isinstance(ckpt.get('tensors'), dict):
        raise UserError(f"{path} is not a letKD quantizer file; delete it to rebuild")
    for key, value in meta.items():
        if found.get(key) != value:
            raise UserError(f"cached quantizer {path} does not match ({key}: file {found.get(key)!r}, "
                            f"expected {value!r}); delete it to rebuild")
    return ckpt['tensors']


def quantizer_files(*, teacher_arch: str, teacher_path: str | Path, roles: tuple[str, ...],
                    pool_sizes: dict[str, tuple[int, int]], dataset: str, n_images: int, num_classes: int,
                    settings: OfflineSettings, cache_dir: str | Path, backend: str = 'faiss-cpu'
                    ) -> tuple[dict[str, dict[str, Any]], dict[str, Path]]:
    """(expected metadata, file path) per role; ``backend`` is the penultimate k-means' (``kmeans_backend``)."""
    if not teacher_exists(teacher_path):
        raise UserError(f"letKD/QUEST need the teacher checkpoint file to identify the quantizers: {teacher_path}")
    sha = teacher_identity(teacher_path)
    metas = {role: expected_meta(role, teacher_sha256=sha, teacher_arch=teacher_arch, dataset=dataset,
                                 n_images=n_images, num_classes=num_classes, pool_size=pool_sizes[role],
                                 settings=settings, backend=backend) for role in roles}
    return metas, {role: cache_path(cache_dir, metas[role]) for role in roles}


def ensure_quantizers(teacher: nn.Module, *, teacher_arch: str, teacher_path: str | Path, roles: tuple[str, ...],
                      pool_sizes: dict[str, tuple[int, int]], loader: Any, dataset: str, num_classes: int,
                      settings: OfflineSettings, cache_dir: str | Path, device: torch.device
                      ) -> dict[str, dict[str, torch.Tensor]]:
    """The quantizer tensors per role: cached files that match are reused, missing ones built and saved.

    Runs that need the same files (the trials of a sweep start together) share one build: the check and the
    build happen under a file lock per teacher checkpoint, so the second run waits and then reuses the files.
    """
    n_images = len(loader.dataset)
    gpu = faiss_gpu_for(device)
    metas, paths = quantizer_files(teacher_arch=teacher_arch, teacher_path=teacher_path, roles=roles,
                                   pool_sizes=pool_sizes, dataset=dataset, n_images=n_images,
                                   num_classes=num_classes, settings=settings, cache_dir=cache_dir,
                                   backend=kmeans_backend(gpu))
    lock_dir = Path(cache_dir) / 'letkd'
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / f".build-{metas[roles[0]]['teacher_sha256'][:16]}.lock")):
        return _load_or_build(teacher, metas, paths, teacher_arch=teacher_arch, roles=roles, pool_sizes=pool_sizes,
                              loader=loader, n_images=n_images, num_classes=num_classes, settings=settings,
                              device=device, gpu=gpu, dataset=dataset)


def _load_or_build(teacher: nn.Module, metas: dict[str, dict[str, Any]], paths: dict[str, Path], *,
                   teacher_arch: str, roles: tuple[str, ...], pool_sizes: dict[str, tuple[int, int]], loader: Any,
                   n_images: int, num_classes: int, settings: OfflineSettings, device: torch.device,
                   gpu: int | None, dataset: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    result: dict[str, dict[str, torch.Tensor]] = {}
    for role in roles:
        if paths[role].is_file():
            result[role] = load_cached(paths[role], metas[role])
            print(f'==> letKD {role} quantizer: reusing {paths[role]}')
    missing = tuple(role for role in roles if role not in result)
    if not missing:
        return result

    print(f"==> letKD quantizers: building {', '.join(missing)} from {teacher_arch} features of {n_images} images")
    features = collect_features(teacher, teacher_arch, missing, pool_sizes, loader, n_images,
                                max_positions=settings.max_positions, seed=settings.seed, device=device,
                                dataset=dataset)
    for role in missing:
        feats, labels = features[role]
        if role == 'penult':
            tensors = build_codebook(feats, settings.k_penult, settings.seed, gpu)
            extra: dict[str, int] = {}
        else:
            tensors, extra = build_subclasses(feats, labels, num_classes, settings.k_inter, settings.lda_dim,
                                              settings.seed, device)
        meta = {**metas[role], **extra, 'n_positions': len(feats), 'channels': int(feats.shape[1])}
        paths[role].parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint({'tensors': tensors, 'meta': meta}, paths[role])
        print(f'==> letKD {role} quantizer: {len(feats):,} positions -> {paths[role]}')
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
    """Build (or verify) the quantizer files; returns role -> file path."""
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
    _, paths = quantizer_files(teacher_arch=model_t, teacher_path=opt.path_t, roles=roles, pool_sizes=pool_sizes,
                               dataset=opt.dataset, n_images=data.n_data, num_classes=data.num_classes,
                               settings=settings, cache_dir=cache_dir, backend=kmeans_backend(faiss_gpu_for(device)))
    return paths


def cli(argv: list[str] | None = None) -> int:
    return run_cli(get_args_parser(), main, argv)


if __name__ == '__main__':
    sys.exit(cli())
