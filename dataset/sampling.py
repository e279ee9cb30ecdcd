"""Index-returning and CRD-sampling views of any labelled dataset.

CRD (contrastive representation distillation) needs, for every training sample, the index of a
positive and of k negatives from *other* classes; the loss looks their features up in a memory
bank. `ContrastiveIndexSampler` draws those indices for any integer label vector and
`ContrastiveSampleDataset` attaches them to the items of any dataset that exposes `targets`.

Reproducibility: the draw for item `index` uses `np.random.default_rng([seed, epoch, index])`,
so it depends only on (seed, epoch, index), never on the worker that loads the item or on the
order of the batches. Call `set_epoch(epoch)` before iterating to get new negatives each epoch.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from torch.utils.data import Dataset

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
        # RepDistiller's names: per class, the indices of that class / of all other classes.
        self.cls_positive = [np.flatnonzero(labels == c) for c in range(n_cls)]
        self.cls_negative = [np.flatnonzero(labels != c) for c in range(n_cls)]
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
