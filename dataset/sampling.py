"""Index-returning and CRD-sampling views of any labelled dataset.

CRD (contrastive representation distillation) needs, for every training sample, the index of a
positive and of k negatives from *other* classes; the loss looks their features up in a memory
bank. `ContrastiveIndexSampler` draws those indices for any integer label vector and
`ContrastiveSampleDataset` attaches them to the items of any dataset that exposes `targets`.

Reproducibility: the draw for item `index` uses `np.random.default_rng([seed, epoch, index])`,
so it depends only on (seed, epoch, index), never on the worker that loads the item or on the
order of the batches. Call `set_epoch(epoch)` before iterating to get new negatives each epoch.
The per-class index arrays are int32 when the data set allows it (ImageNet: 1000 classes x 1.28M
negatives are 5 GB as int32, 10 GB as int64, per process); the drawn indices are the same.

`EpochKeyedSampler` + `SeededItems`: augmentation that is a pure function of (the epoch's seed, index), for
loaders whose worker processes persist between epochs (ImageNet). Such workers draw their RNG seeds once,
when they start, so without this the augmentation of epoch e would depend on whether the workers were
started in epoch 1 or in epoch e (a resumed run). The sampler runs in the main process and tags every index
with the epoch and its seed; the dataset wrapper, in the worker, seeds torch, `random` and NumPy from
(seed, index) before loading the item and passes the epoch on (CRD's negatives).
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

MODES = ("exact", "relax")

# Fourth seed word of the one-off pool subsampling (item draws use three words, so the two
# streams never share a SeedSequence).
_POOL_STREAM = 1


class ContrastiveIndexSampler:
    """Draws [positive] + k negative indices for a labelled set of n samples.

    targets: n integer class labels. k: negatives per item. mode: 'exact' (positive = the item
    itself) or 'relax' (positive = a random sample of the same class). percent in (0, 1]: keep
    only this fraction of each class's negative pool, chosen once here from `seed`.
    Negatives are drawn without replacement from the pool, or with replacement when k exceeds it.
    """

    def __init__(
        self,
        targets: Sequence[int] | np.ndarray,
        k: int = 4096,
        mode: str = "exact",
        percent: float = 1.0,
        seed: int = 0,
        num_classes: int | None = None,
    ) -> None:
        labels = np.asarray(targets, dtype=np.int64)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError("targets must be a non-empty 1-d sequence of class indices")
        if labels.min() < 0:
            raise ValueError("targets must be non-negative class indices")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if int(k) < 1:
            raise ValueError(f"k (number of negatives) must be >= 1, got {k}")
        if not 0.0 < percent <= 1.0:
            raise ValueError(f"percent must be in (0, 1], got {percent}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        n_cls = int(labels.max()) + 1 if num_classes is None else int(num_classes)
        if n_cls <= labels.max():
            raise ValueError(f"num_classes={n_cls} but a target is {labels.max()}")

        self.labels = labels
        self.k = int(k)
        self.mode = mode
        self.percent = float(percent)
        self.seed = int(seed)
        self.epoch = 0
        self.num_classes = n_cls
        # RepDistiller's names: per class, the indices of that class / of all other classes. int32 when the
        # indices fit (they index into the pools below, so the draws are the same as with int64 arrays)
        index_type = np.int32 if labels.size <= np.iinfo(np.int32).max else np.int64
        self.cls_positive = [np.flatnonzero(labels == c).astype(index_type) for c in range(n_cls)]
        self.cls_negative = [np.flatnonzero(labels != c).astype(index_type) for c in range(n_cls)]
        for c in np.unique(labels):
            if self.cls_negative[c].size == 0:
                raise ValueError("CRD sampling needs at least two classes (no negatives for class %d)" % c)
        if self.percent < 1.0:
            rng = np.random.default_rng([self.seed, 0, 0, _POOL_STREAM])
            for c, pool in enumerate(self.cls_negative):
                if pool.size:
                    keep = max(1, int(pool.size * self.percent))
                    self.cls_negative[c] = np.sort(rng.choice(pool, keep, replace=False))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draws __call__ returns."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __call__(self, index: int) -> np.ndarray:
        """The (k+1,) int64 array [positive, negative_1, ..., negative_k] for sample `index`."""
        index = int(index)
        target = self.labels[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.mode == "exact":
            positive = index
        else:
            positive = int(rng.choice(self.cls_positive[target]))
        pool = self.cls_negative[target]
        # A uniformly random subset; shuffle=False skips reordering it (about 2x faster at
        # k=16384), which is harmless because the CRD loss treats the k negatives symmetrically.
        negatives = pool[rng.choice(pool.size, self.k, replace=self.k > pool.size, shuffle=False)]
        out = np.empty(self.k + 1, dtype=np.int64)
        out[0] = positive
        out[1:] = negatives
        return out


class _Wrapper(Dataset):
    """Forwards unknown attributes (targets, classes, data, samples, ...) to the wrapped dataset."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails; guard against recursion while unpickling.
        base = self.__dict__.get("base")
        if base is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(base, name)


class IndexedDataset(_Wrapper):
    """Wraps a dataset of (img, target) items so that item i is (img, target, i)."""

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        img, target = self.base[index][:2]
        return img, target, index


class ContrastiveSampling:
    """The CRD side of a dataset: ``self.sampler`` (a ContrastiveIndexSampler) and ``self.is_sample``.

    ``contrastive_item(img, target, index)`` gives (img, target, index, sample_idx), or (img, target,
    index) when is_sample is False.
    """

    sampler: ContrastiveIndexSampler
    is_sample: bool

    @property
    def cls_positive(self) -> list[np.ndarray]:
        return self.sampler.cls_positive

    @property
    def cls_negative(self) -> list[np.ndarray]:
        return self.sampler.cls_negative

    def set_epoch(self, epoch: int) -> None:
        """New negatives (and relax-mode positives) for this epoch; call before iterating."""
        self.sampler.set_epoch(epoch)

    def contrastive_item(self, img: Any, target: Any, index: int) -> tuple[Any, ...]:
        if not self.is_sample:
            return img, target, index
        return img, target, index, self.sampler(index)


class ContrastiveSampleDataset(ContrastiveSampling, _Wrapper):
    """Wraps a dataset of (img, target) items that exposes integer `targets` for CRD.

    Items are (img, target, index, sample_idx) with sample_idx of shape (k+1,) int64 as drawn by
    `ContrastiveIndexSampler`; with is_sample=False they are (img, target, index).
    """

    def __init__(
        self,
        base: Dataset,
        k: int = 4096,
        mode: str = "exact",
        is_sample: bool = True,
        percent: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(base)
        targets = getattr(base, "targets", None)
        if targets is None:
            raise TypeError(f"{type(base).__name__} has no `targets`; CRD sampling needs the labels")
        self.is_sample = is_sample
        self.sampler = ContrastiveIndexSampler(targets, k=k, mode=mode, percent=percent, seed=seed)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        img, target = self.base[index][:2]
        return self.contrastive_item(img, target, index)


class EpochKeyedSampler(Sampler):
    """Wraps a sampler (RandomSampler, DistributedSampler) and yields ``(epoch, seed, index)`` for each of its
    indices, with the values of ``set_key`` at the moment the epoch's iteration starts (main process)."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.epoch, self.seed = 0, 0

    def set_key(self, epoch: int, seed: int) -> None:
        self.epoch, self.seed = int(epoch), int(seed)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch, seed = self.epoch, self.seed
        for index in self.sampler:
            yield epoch, seed, int(index)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


def item_seed(seed: int, index: int) -> int:
    """A 63-bit seed for item ``index`` of the epoch whose seed is ``seed``."""
    lo, hi = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32, int(index)]).generate_state(
        2, dtype=np.uint32)
    return (int(hi) << 31) ^ int(lo)


class SeededItems(_Wrapper):
    """Item ``(epoch, seed, index)``: seeds torch's CPU generator, Python's ``random`` and NumPy's global RNG from
    ``item_seed(seed, index)``, gives the wrapped dataset the epoch (``set_epoch``, when it has one), then
    returns ``base[index]``. A plain integer index is passed through unchanged (no seeding)."""

    def __init__(self, base: Dataset) -> None:
        super().__init__(base)
        self._epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        base_set_epoch = getattr(self.base, "set_epoch", None)
        if callable(base_set_epoch):
            base_set_epoch(epoch)
        self._epoch = int(epoch)

    def __getitem__(self, item: Any) -> Any:
        if not isinstance(item, tuple):
            return self.base[item]
        epoch, seed, index = item
        if epoch != self._epoch:      # a persistent worker's copy learns the epoch here
            self.set_epoch(epoch)
        value = item_seed(seed, index)
        # the CPU generator only (what transforms draw from; torch.manual_seed also visits every accelerator
        # backend: 100 times slower)
        torch.default_generator.manual_seed(value)
        random.seed(value)
        np.random.seed(value % 2**32)
        return self.base[index]
