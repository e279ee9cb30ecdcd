"""Training and evaluation data resident on the device (the fast path's data side, ``--device_data``).

The whole split lives on the device as uint8 (N, H, W, 3), padded once for the random crop. Each epoch
draws, from one ``torch.Generator`` on the device seeded by ``epoch_seed(seed, epoch, stream)``, the
shuffling order, a crop offset per sample (uniform over the (2p+1)^2 positions, as RandomCrop), a flip
per sample (probability 1/2, as RandomHorizontalFlip) and, for Tiny-ImageNet's default augmentation, a
rotation angle per sample (uniform in [-20, 20] degrees, nearest neighbour, black corners, as
RandomRotation(20) does on tensors). The crop + flip indices of every sample are made once per epoch; a
batch is then one gather and one fused multiply-add (ToTensor's /255 and Normalize). Nothing in a batch reads
the host, so a training step never waits for the CPU; a run is resumable because every draw is a function of (seed, epoch).

Batches have the reference loaders' layout: (image, target) for mode 'plain', (image, target, index)
for 'instance', (image, target, index, sample_idx) for 'crd'. CRD's sample_idx is drawn on the device
with ContrastiveIndexSampler's semantics: sample_idx[:, 0] is the positive (the item itself for 'exact',
a random item of its class for 'relax'), the k others are negatives of other classes (from the same
per-class pools, ``percent`` included), without replacement when the pool holds at least k items.

    bundle = device_bundle(get_dataloaders('cifar100', './data', 64, mode='crd'), 'cifar100', device,
                           mode='crd', seed=0)
    set_epoch(bundle, epoch, seed)          # as with the reference loaders
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from helper.errors import UserError

from . import cifar100, digits, tinyimagenet
from .sampling import ContrastiveIndexSampler

SUPPORTED = ("cifar100", "tinyimagenet", "digits")
DEVICE_MODES = ("plain", "instance", "crd")   # not 'weak_strong': its strong view is PIL-only (dataset/strong_aug.py)
EVAL_BATCH_SIZE = 1024   # evaluation needs no small batches: BN is in eval mode


@dataclass(frozen=True)
class Augmentation:
    """The training augmentation of a data set, as the reference transforms define it."""

    padding: int = 0            # random crop of the original size from a border of this width (0: no crop)
    pad_mode: str = "zero"      # 'zero' or 'reflect' border
    flip: bool = False          # horizontal flip with probability 1/2
    rotate_degrees: float = 0.0  # random rotation uniform in [-d, d] (0: none)


def augmentation_of(dataset: str, pad_mode: str = "zero", augment: str | None = None) -> Augmentation:
    """The reference training transform of ``dataset`` (dataset/<name>.py train_transform) as an Augmentation."""
    if dataset == "cifar100":
        return Augmentation(padding=4, pad_mode=pad_mode, flip=True)
    if dataset == "digits":
        return Augmentation(padding=4, pad_mode=pad_mode, flip=False)
    if dataset == "tinyimagenet":
        if (augment or "rotate") == "rotate":
            return Augmentation(flip=True, rotate_degrees=20.0)
        return Augmentation(padding=4, pad_mode=pad_mode, flip=True)
    raise UserError(f"--device_data supports {', '.join(SUPPORTED)}, not {dataset}")


def pad_images(images: np.ndarray, padding: int, pad_mode: str) -> np.ndarray:
    """(N, H, W, C) uint8 padded by ``padding`` on each side of H and W: zeros or a mirror image (no edge repeat)."""
    if padding == 0:
        return images
    mode = {"zero": "constant", "reflect": "reflect"}[pad_mode]
    return np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)), mode=mode)


def normalisation(mean: Sequence[float], std: Sequence[float], device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of shape (1, 3, 1, 1) with x_uint8 * scale + shift == (x / 255 - mean) / std."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return 1.0 / (255.0 * std_t), -mean_t / std_t


def _to_nchw(batch_nhwc: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channels_last: bool
             ) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W); channels_last memory when asked (free: NHWC storage)."""
    image = torch.addcmul(shift, batch_nhwc.permute(0, 3, 1, 2).float(), scale)
    return image if channels_last else image.contiguous()


def rotation_grid(angles_deg: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Sampling grid (B, H, W, 2) of grid_sample (align_corners=False) rotating each image about its
    centre by its angle, counter-clockwise for positive angles (torchvision's convention)."""
    theta = angles_deg.float() * (math.pi / 180.0)
    cos, sin = torch.cos(theta), torch.sin(theta)
    # output pixel centres in pixels relative to the image centre
    ys = torch.arange(height, device=angles_deg.device, dtype=torch.float32) - (height - 1) / 2
    xs = torch.arange(width, device=angles_deg.device, dtype=torch.float32) - (width - 1) / 2
    x = xs.view(1, 1, -1)
    y = ys.view(1, -1, 1)
    c, s = cos.view(-1, 1, 1), sin.view(-1, 1, 1)
    # inverse map: an output pixel shows the source pixel rotated back (y axis points down)
    src_x = c * x - s * y
    src_y = s * x + c * y
    # align_corners=False: pixel centre p (offset from the centre) sits at the normalised coordinate 2p / size
    return torch.stack([src_x * (2.0 / width), src_y * (2.0 / height)], dim=-1)


class DeviceCRDSampler:
    """CRD's positive + k negatives per sample, drawn on the device (ContrastiveIndexSampler's semantics).

    Negatives of a sample of class c are drawn from class c's pool (every item of another class, or the
    ``percent`` subset the reference sampler keeps), without replacement (random keys, the k smallest)
    when the pool holds at least k items, with replacement otherwise.
    """

    def __init__(self, targets: torch.Tensor, k: int, mode: str, cls_negative: Sequence[np.ndarray],
                 device: torch.device) -> None:
        n = targets.numel()
        num_classes = len(cls_negative)
        allowed = np.zeros((num_classes, n), dtype=bool)
        for c, pool in enumerate(cls_negative):
            allowed[c, pool] = True
        self.k, self.mode, self.n = int(k), mode, n
        self.blocked = torch.from_numpy(~allowed).to(device)                      # (C, N) True = not a negative
        pool_sizes = allowed.sum(axis=1)
        present = np.bincount(targets.cpu().numpy(), minlength=num_classes) > 0
        self.any_small_pool = bool((pool_sizes[present] < self.k).any()) or self.k > n
        self.small_pool = torch.from_numpy(pool_sizes < self.k).to(device)
        labels = targets.cpu().numpy()
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=num_classes)
        self.order = torch.from_numpy(order).to(device)
        self.class_start = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]])).to(device)
        self.class_count = torch.from_numpy(counts).to(device)

    def __call__(self, index: torch.Tensor, target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, k+1) int64: [positive, negatives...] for the batch's ``index`` and ``target``."""
        b = index.numel()
        if self.mode == "exact":
            positive = index
        else:
            u = torch.rand(b, generator=generator, device=index.device)
            count = self.class_count[target]
            offset = torch.minimum((u * count).long(), count - 1)
            positive = self.order[self.class_start[target] + offset]
        blocked = self.blocked[target]                                            # (B, N)
        if self.k <= self.n:
            keys = torch.rand(b, self.n, generator=generator, device=index.device)
            keys.masked_fill_(blocked, 2.0)                                       # never among the k smallest
            negatives = keys.topk(self.k, dim=1, largest=False, sorted=False).indices
        if self.any_small_pool:
            weights = (~blocked).float()
            drawn = torch.multinomial(weights, self.k, replacement=True, generator=generator)
            negatives = drawn if self.k > self.n else torch.where(self.small_pool[target][:, None], drawn, negatives)
        return torch.cat([positive[:, None], negatives], dim=1)


class DeviceTrainLoader:
    """The training split on the device: shuffled, augmented, normalised batches (see the module doc)."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], *, batch_size: int, mean: Sequence[float],
                 std: Sequence[float], augmentation: Augmentation, device: torch.device | str,
                 mode: str = "plain", drop_last: bool = False, channels_last: bool = False,
                 crd_sampler: DeviceCRDSampler | None = None, seed: int = 0) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if mode not in ("plain", "instance", "crd"):
            raise ValueError(f"mode must be plain, instance or crd, got {mode!r}")
        if mode == "crd" and crd_sampler is None:
            raise ValueError("mode 'crd' needs a crd_sampler")
        self.device = torch.device(device)
        self.n, self.height, self.width = images.shape[0], images.shape[1], images.shape[2]
        if drop_last and self.n < batch_size:
            raise UserError(f"drop_last with batch size {batch_size} leaves no batch of the {self.n} training "
                            "images; lower --batch_size")
        self.augmentation = augmentation
        self.padded = torch.from_numpy(pad_images(images, augmentation.padding, augmentation.pad_mode)).to(self.device)
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.int64)).to(self.device)
        self.batch_size, self.mode, self.drop_last = int(batch_size), mode, drop_last
        self.channels_last = channels_last
        self.scale, self.shift = normalisation(mean, std, self.device)
        self.crd_sampler = crd_sampler
        self.generator = torch.Generator(device=self.device)
        self.rows = torch.arange(self.height, device=self.device)
        self.cols = torch.arange(self.width, device=self.device)
        self.set_epoch(0, seed)

    # the DataLoader-like surface the loops use
    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def set_epoch(self, epoch: int, seed: int, stream: int = 0) -> None:
        """Make the next iteration a pure function of (seed, epoch, stream) (dataset.set_epoch calls this)."""
        from . import epoch_seed
        if seed < 0 or epoch < 0 or stream < 0:
            raise ValueError(f"seed, epoch and stream must be >= 0, got seed={seed}, epoch={epoch}, stream={stream}")
        self.generator.manual_seed(epoch_seed(seed, epoch, stream))

    def draw_epoch(self) -> dict[str, torch.Tensor]:
        """This epoch's order, crop offsets (N, 2), flips (N,) and angles (N,), drawn on the device."""
        g, n, aug = self.generator, self.n, self.augmentation
        order = torch.randperm(n, generator=g, device=self.device)
        span = 2 * aug.padding + 1
        offsets = torch.randint(0, span, (n, 2), generator=g, device=self.device)
        flips = torch.rand(n, generator=g, device=self.device) < 0.5 if aug.flip else None
        angles = None
        if aug.rotate_degrees:
            angles = (torch.rand(n, generator=g, device=self.device) * 2 - 1) * aug.rotate_degrees
        return {"order": order, "offsets": offsets, "flips": flips, "angles": angles}

    def crop_indices(self, offsets: torch.Tensor, flips: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded image's rows (B, H) and columns (B, W) that crops at ``offsets`` (B, 2: row, column) read,
        the columns reversed where ``flips``: crop and flip folded into one gather's indices."""
        rows = offsets[:, 0:1] + self.rows                                       # (B, H)
        cols = offsets[:, 1:2] + self.cols                                       # (B, W)
        if flips is not None:
            cols = torch.where(flips[:, None], offsets[:, 1:2] + (self.width - 1) - self.cols, cols)
        return rows, cols

    def augment(self, index: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor | None,
                angles: torch.Tensor | None) -> torch.Tensor:
        """Normalised float (B, 3, H, W) images of ``index`` cropped at ``offsets`` (B, 2: row, column),
        flipped where ``flips`` and rotated by ``angles`` (degrees)."""
        rows, cols = self.crop_indices(offsets, flips)
        return self._render(index, rows, cols, flips, angles)

    def _render(self, index: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, flips: torch.Tensor | None,
                angles: torch.Tensor | None) -> torch.Tensor:
        """One gather of the crops (``crop_indices``), normalised; rotated first when ``angles`` is given."""
        pixels = self.padded[index[:, None, None], rows[:, :, None], cols[:, None, :]]   # (B, H, W, 3) uint8
        if angles is None:
            return _to_nchw(pixels, self.scale, self.shift, self.channels_last)
        if flips is not None:   # the reference rotates, then flips: flip(rotate(x, a)) == rotate(flip(x), -a)
            angles = torch.where(flips, -angles, angles)
        grid = rotation_grid(angles, self.height, self.width)
        chw = pixels.permute(0, 3, 1, 2).float()
        rotated = torch.nn.functional.grid_sample(chw, grid, mode="nearest", padding_mode="zeros",
                                                  align_corners=False)
        image = torch.addcmul(self.shift, rotated, self.scale)
        return image.contiguous(memory_format=torch.channels_last) if self.channels_last else image.contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        drawn = self.draw_epoch()
        order = drawn["order"]
        # the epoch's draws in batch order, and the crop + flip indices of every sample, made once per epoch:
        # a batch is then slices (views) plus one gather and one multiply-add
        in_order = {name: None if value is None else value[order] for name, value in drawn.items() if name != "order"}
        rows, cols = self.crop_indices(in_order["offsets"], in_order["flips"])
        targets = self.targets[order]
        for b in range(len(self)):
            batch = slice(b * self.batch_size, (b + 1) * self.batch_size)
            index = order[batch]
            flips = None if in_order["flips"] is None else in_order["flips"][batch]
            angles = None if in_order["angles"] is None else in_order["angles"][batch]
            image = self._render(index, rows[batch], cols[batch], flips, angles)
            target = targets[batch]
            if self.mode == "plain":
                yield image, target
            elif self.mode == "instance":
                yield image, target, index
            else:
                assert self.crd_sampler is not None
                yield image, target, index, self.crd_sampler(index, target, self.generator)


class DeviceEvalLoader:
    """An evaluation split on the device: normalised, in order, large batches; (image, target[, index])."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], *, mean: Sequence[float], std: Sequence[float],
                 device: torch.device | str, batch_size: int = EVAL_BATCH_SIZE, with_index: bool = False,
                 channels_last: bool = False) -> None:
        self.device = torch.device(device)
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.int64)).to(self.device)
        self.batch_size, self.with_index, self.channels_last = int(batch_size), with_index, channels_last
        self.scale, self.shift = normalisation(mean, std, self.device)

    def __len__(self) -> int:
        return -(-self.targets.numel() // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        n = self.targets.numel()
        for start in range(0, n, self.batch_size):
            stop = min(n, start + self.batch_size)
            image = _to_nchw(self.images[start:stop], self.scale, self.shift, self.channels_last)
            target = self.targets[start:stop]
            if self.with_index:
                yield image, target, torch.arange(start, stop, device=self.device)
            else:
                yield image, target


def uint8_images(dataset: Any) -> tuple[np.ndarray, list[int]]:
    """(images (N, H, W, 3) uint8, targets) of a CIFAR-100 / digits / Tiny-ImageNet dataset object.

    CIFAR-100 and digits keep their pixels in ``data``; Tiny-ImageNet's JPEGs are decoded once here.
    """
    base = dataset
    while "base" in getattr(base, "__dict__", {}):
        base = base.__dict__["base"]
    targets = [int(t) for t in base.targets]
    if hasattr(base, "data"):
        return np.ascontiguousarray(np.asarray(base.data, dtype=np.uint8)), targets
    if hasattr(base, "samples") and hasattr(base, "loader"):
        images = [np.asarray(base.loader(path).convert("RGB"), dtype=np.uint8) for path, _ in base.samples]
        shapes = {im.shape for im in images}
        if len(shapes) != 1:
            raise UserError(f"--device_data needs images of one size; found {sorted(shapes)[:3]}")
        return np.stack(images), targets
    raise UserError(f"--device_data cannot read the pixels of a {type(base).__name__}")


def device_bundle(bundle: Any, dataset: str, device: torch.device | str, *, mode: str = "plain",
                  pad_mode: str = "zero", augment: str | None = None, seed: int = 0,
                  channels_last: bool = False, eval_batch_size: int = EVAL_BATCH_SIZE) -> Any:
    """A copy of a reference DataBundle whose train / val / test loaders are on the device.

    Batch size, drop_last and CRD's k / mode / negative pools are taken from the bundle's train loader;
    train_eval_loader (used once by offline stages) stays the reference loader.
    """
    if dataset not in SUPPORTED:
        raise UserError(f"--device_data supports {', '.join(SUPPORTED)}, not {dataset}")
    if mode not in DEVICE_MODES:
        raise UserError(f"--device_data has no '{mode}' data mode (its strong augmentation runs on PIL images in the "
                        "reference loaders); pass --no-device_data")
    module = {"cifar100": cifar100, "digits": digits, "tinyimagenet": tinyimagenet}[dataset]
    device = torch.device(device)
    reference = bundle.train_loader
    images, targets = uint8_images(reference.dataset)
    crd_sampler = None
    if mode == "crd":
        sampler: ContrastiveIndexSampler = reference.dataset.sampler
        crd_sampler = DeviceCRDSampler(torch.as_tensor(targets), sampler.k, sampler.mode, sampler.cls_negative,
                                       device)
    train = DeviceTrainLoader(images, targets, batch_size=reference.batch_size, mean=module.MEAN, std=module.STD,
                              augmentation=augmentation_of(dataset, pad_mode, augment), device=device, mode=mode,
                              drop_last=reference.drop_last, channels_last=channels_last, crd_sampler=crd_sampler,
                              seed=seed)

    def evaluation(loader: Any) -> DeviceEvalLoader | None:
        if loader is None:
            return None
        eval_images, eval_targets = uint8_images(loader.dataset)
        return DeviceEvalLoader(eval_images, eval_targets, mean=module.MEAN, std=module.STD, device=device,
                                batch_size=eval_batch_size, channels_last=channels_last)

    return replace(bundle, train_loader=train, val_loader=evaluation(bundle.val_loader),
                   test_loader=evaluation(bundle.test_loader))
