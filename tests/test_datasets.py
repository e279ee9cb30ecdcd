"""dataset/: readers of the real on-disk formats, CRD sampling, loader seeding, transforms."""

from __future__ import annotations

import pickle
import urllib.error
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import dataset
from dataset import DataBundle, get_dataloaders, get_transforms, set_epoch
from dataset import cifar100 as cifar_mod
from dataset import digits as digits_mod
from dataset import get_cifar100_dataloaders, get_cifar100_dataloaders_sample
from dataset.cifar100 import CIFAR100, CIFAR100Instance, CIFAR100InstanceSample
from dataset.sampling import ContrastiveIndexSampler, ContrastiveSampleDataset, IndexedDataset
from helper.errors import UserError
from tests.fixtures_data import (read_cifar100_split, tinyimagenet_val_labels,
                                 write_imagenet_folders, write_tinyimagenet)


def unnormalise(x: torch.Tensor, mean, std) -> np.ndarray:
    """(3, H, W) normalised tensor -> H x W x 3 uint8."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return torch.round((x * s + m) * 255).to(torch.uint8).permute(1, 2, 0).numpy()


def all_batches(loader):
    return [tuple(t.clone() for t in batch) for batch in loader]


# ---------------------------------------------------------------- CIFAR-100 format and reading


def test_fixture_pickles_have_the_real_key_types(cifar100_dir: Path):
    folder = cifar100_dir / "cifar-100-python"
    with open(folder / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert set(raw) == {b"data", b"fine_labels", b"coarse_labels", b"filenames", b"batch_label"}
    assert raw[b"data"].dtype == np.uint8 and raw[b"data"].shape == (200, 3072)
    with open(folder / "meta", "rb") as f:
        meta = pickle.load(f, encoding="latin1")  # how torchvision reads it: str keys
    assert set(meta) == {"fine_label_names", "coarse_label_names"}
    assert len(meta["fine_label_names"]) == 100 and len(meta["coarse_label_names"]) == 20
    # Stock torchvision refuses the fixture (md5 differs); our reader only checks presence.
    with pytest.raises(RuntimeError):
        torchvision.datasets.CIFAR100(str(cifar100_dir), train=True)


def test_cifar_loaders_read_what_was_written(cifar100_dir: Path):
    bundle = get_dataloaders("cifar100", str(cifar100_dir), batch_size=16, num_workers=0, download=False)
    assert isinstance(bundle, DataBundle)
    assert (bundle.num_classes, bundle.n_data, bundle.image_size) == (100, 200, 32)
    assert len(bundle.val_loader.dataset) == 100
    assert bundle.val_loader.batch_size == 8  # batch_size // 2, as RepDistiller

    test_images, test_labels = read_cifar100_split(cifar100_dir, train=False)
    imgs, labels = zip(*[(x, y) for x, y in bundle.val_loader])
    imgs, labels = torch.cat(imgs), torch.cat(labels)
    assert imgs.shape == (100, 3, 32, 32) and imgs.dtype == torch.float32
    assert labels.tolist() == test_labels
    for i in (0, 57):
        assert np.array_equal(unnormalise(imgs[i], cifar_mod.MEAN, cifar_mod.STD), test_images[i])

    x, y = next(iter(bundle.train_loader))
    assert x.shape == (16, 3, 32, 32) and y.shape == (16,)
    _, train_labels = read_cifar100_split(cifar100_dir, train=True)
    assert bundle.train_loader.dataset.targets == train_labels
    assert sorted(Counter(train_labels).values()) == [2] * 100


def test_train_eval_loader_is_in_order_and_unaugmented(cifar100_dir: Path):
    bundle = get_dataloaders("cifar100", str(cifar100_dir), batch_size=64, num_workers=0, download=False)
    images, labels = read_cifar100_split(cifar100_dir, train=True)
    seen = []
    for x, y, idx in bundle.train_eval_loader:
        for xi, yi, i in zip(x, y.tolist(), idx.tolist()):
            seen.append(i)
            assert yi == labels[i]
            assert np.array_equal(unnormalise(xi, cifar_mod.MEAN, cifar_mod.STD), images[i])
    assert seen == list(range(200))
    assert not isinstance(bundle.train_eval_loader.sampler, torch.utils.data.RandomSampler)


def test_instance_mode_yields_the_index(cifar100_dir: Path):
    bundle = get_dataloaders("cifar100", str(cifar100_dir), 32, 0, mode="instance", download=False)
    targets = bundle.train_loader.dataset.targets
    indices = []
    for x, y, idx in bundle.train_loader:
        assert [targets[i] for i in idx.tolist()] == y.tolist()
        indices += idx.tolist()
    assert sorted(indices) == list(range(200))
    assert len(indices) == 200  # no drop_last

    direct = CIFAR100Instance(str(cifar100_dir), train=True)
    img, target, index = direct[5]
    assert index == 5 and target == targets[5] and img.size == (32, 32)


def test_missing_or_broken_cifar_is_a_user_error(tmp_path: Path, cifar100_dir: Path):
    with pytest.raises(UserError, match="cifar-100-python"):
        get_dataloaders("cifar100", str(tmp_path / "nowhere"), 8, 0, download=False)
    partial = tmp_path / "partial" / "cifar-100-python"
    partial.mkdir(parents=True)
    (partial / "train").write_bytes((cifar100_dir / "cifar-100-python" / "train").read_bytes())
    with pytest.raises(UserError, match="test, meta"):
        CIFAR100(str(tmp_path / "partial"), download=False)
    broken = tmp_path / "broken" / "cifar-100-python"
    broken.mkdir(parents=True)
    for name in ("train", "test", "meta"):
        (broken / name).write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot read CIFAR-100"):
        CIFAR100(str(tmp_path / "broken"))


def test_download_failure_is_a_user_error(tmp_path: Path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(UserError, match="could not download CIFAR-100.*no network"):
        CIFAR100(str(tmp_path), download=True)


def test_repdistiller_wrappers(cifar100_dir: Path):
    kw = dict(data_folder=cifar100_dir, download=False)
    assert len(get_cifar100_dataloaders(16, 0, **kw)) == 2
    train, test, n_data = get_cifar100_dataloaders(16, 0, is_instance=True, **kw)
    assert n_data == 200 and len(next(iter(train))) == 3 and test.batch_size == 8
    train, test, n_data = get_cifar100_dataloaders_sample(16, 0, k=10, mode="relax", **kw)
    batch = next(iter(train))
    assert len(batch) == 4 and batch[3].shape == (16, 11) and batch[3].dtype == torch.int64


# ---------------------------------------------------------------- CRD sampling


def test_crd_exact_positive_and_other_class_negatives(cifar100_dir: Path):
    ds = CIFAR100InstanceSample(str(cifar100_dir), train=True, k=16, mode="exact")
    targets = np.asarray(ds.targets)
    assert len(ds.cls_negative[0]) == 198 and len(ds.cls_positive[0]) == 2
    for index in (0, 7, 199):
        img, target, idx, sample_idx = ds[index]
        assert idx == index and target == targets[index]
        assert sample_idx.shape == (17,) and sample_idx.dtype == np.int64
        assert sample_idx[0] == index
        negatives = sample_idx[1:]
        assert np.all(targets[negatives] != target)
        assert len(set(negatives.tolist())) == 16  # without replacement


def test_crd_relax_positive_is_same_class(cifar100_dir: Path):
    ds = CIFAR100InstanceSample(str(cifar100_dir), train=True, k=8, mode="relax")
    targets = np.asarray(ds.targets)
    for index in range(0, 200, 13):
        _, target, _, sample_idx = ds[index]
        assert targets[sample_idx[0]] == target
        assert np.all(targets[sample_idx[1:]] != target)


def test_crd_larger_k_than_pool_uses_replacement_and_percent_shrinks_pool(cifar100_dir: Path):
    targets = CIFAR100(str(cifar100_dir)).targets
    sampler = ContrastiveIndexSampler(targets, k=300)
    out = sampler(3)
    assert out.shape == (301,) and np.all(np.asarray(targets)[out[1:]] != targets[3])
    small = ContrastiveIndexSampler(targets, k=20, percent=0.5, seed=1)
    assert all(len(pool) == 99 for pool in small.cls_negative)
    c = targets[3]
    assert set(small(3)[1:].tolist()) <= set(small.cls_negative[c].tolist())
    with pytest.raises(ValueError):
        ContrastiveIndexSampler(targets, mode="loose")


def test_crd_draws_depend_only_on_seed_epoch_index(cifar100_dir: Path):
    base = CIFAR100(str(cifar100_dir))
    a = ContrastiveSampleDataset(base, k=32, seed=0)
    b = CIFAR100InstanceSample(str(cifar100_dir), k=32, seed=0)
    assert np.array_equal(a[11][3], b[11][3])  # the wrapper and the RepDistiller class agree
    first = a[11][3]
    a.set_epoch(1)
    other_epoch = a[11][3]
    a.set_epoch(0)
    assert np.array_equal(a[11][3], first)
    assert not np.array_equal(other_epoch, first)
    assert not np.array_equal(ContrastiveSampleDataset(base, k=32, seed=5)[11][3], first)
    no_sample = ContrastiveSampleDataset(base, k=4, is_sample=False)
    assert len(no_sample[0]) == 3
    assert IndexedDataset(base)[4][2] == 4 and IndexedDataset(base).targets == base.targets


def _epoch_record(loader):
    """index -> (target, sample_idx) and the batch order, over one epoch."""
    record, order, images = {}, [], []
    for x, y, idx, sample_idx in loader:
        images.append(x.clone())
        for yi, i, s in zip(y.tolist(), idx.tolist(), sample_idx):
            record[i] = (yi, s.tolist())
            order.append(i)
    return record, order, torch.cat(images)


def test_crd_and_epochs_are_reproducible_with_workers(cifar100_dir: Path):
    kw = dict(batch_size=50, mode="crd", nce_k=12, seed=3, download=False)
    two = get_dataloaders("cifar100", str(cifar100_dir), num_workers=2, **kw)
    zero = get_dataloaders("cifar100", str(cifar100_dir), num_workers=0, **kw)

    set_epoch(two, 4, seed=3)
    rec_a, order_a, img_a = _epoch_record(two.train_loader)
    set_epoch(two, 4, seed=3)
    rec_b, order_b, img_b = _epoch_record(two.train_loader)
    assert order_a == order_b and rec_a == rec_b
    assert torch.equal(img_a, img_b)  # augmentation in the workers is seeded from the generator

    set_epoch(zero, 4, seed=3)
    rec_zero, order_zero, _ = _epoch_record(zero.train_loader)
    assert rec_zero == rec_a  # CRD draws do not depend on the number of workers
    assert order_zero == order_a  # nor does the shuffling

    set_epoch(two, 5, seed=3)
    rec_c, order_c, _ = _epoch_record(two.train_loader)
    assert order_c != order_a
    assert any(rec_c[i][1] != rec_a[i][1] for i in range(200))


def test_set_epoch_gives_resumable_order(cifar100_dir: Path):
    def order(bundle):
        return [i for _, _, idx in bundle.train_loader for i in idx.tolist()]

    kw = dict(batch_size=32, num_workers=0, mode="instance", download=False)
    running = get_dataloaders("cifar100", str(cifar100_dir), **kw)
    orders = {}
    for epoch in (1, 2, 3):
        set_epoch(running, epoch, seed=7)
        orders[epoch] = order(running)
    resumed = get_dataloaders("cifar100", str(cifar100_dir), **kw)
    set_epoch(resumed.train_loader, 3, seed=7)
    assert order(resumed) == orders[3]
    assert orders[1] != orders[2] != orders[3]

    # Without set_epoch a fresh bundle starts from the (seed, epoch 0) state: same order for same seed.
    assert order(get_dataloaders("cifar100", str(cifar100_dir), seed=1, **kw)) == order(
        get_dataloaders("cifar100", str(cifar100_dir), seed=1, **kw))


def test_set_epoch_same_epoch_gives_identical_batches_without_workers(cifar100_dir: Path):
    bundle = get_dataloaders("cifar100", str(cifar100_dir), 40, 0, mode="crd", nce_k=5, download=False)
    runs = []
    for _ in range(2):
        set_epoch(bundle, 2, seed=0)
        torch.manual_seed(123)  # with num_workers=0 the augmentation uses the global torch RNG
        runs.append(all_batches(bundle.train_loader))
    assert all(torch.equal(a, b) for ba, bb in zip(*runs) for a, b in zip(ba, bb))
    set_epoch(bundle, 3, seed=0)
    torch.manual_seed(123)
    other = all_batches(bundle.train_loader)
    assert not torch.equal(other[0][2], runs[0][0][2])


# ---------------------------------------------------------------- factory arguments and transforms


def test_factory_argument_errors(cifar100_dir: Path):
    with pytest.raises(UserError, match="unknown dataset"):
        get_dataloaders("cifar10", str(cifar100_dir))
    with pytest.raises(ValueError):
        get_dataloaders("cifar100", str(cifar100_dir), mode="contrast")
    with pytest.raises(ValueError):
        get_transforms("cifar100", pad_mode="edge")
    bundle = get_dataloaders("cifar100", str(cifar100_dir), batch_size=1, num_workers=0, download=False)
    assert bundle.val_loader.batch_size == 1
    bundle = get_dataloaders("cifar100", str(cifar100_dir), 8, 0, test_batch_size=3, download=False)
    assert bundle.val_loader.batch_size == 3 and bundle.train_eval_loader.batch_size == 3


def test_pad_mode_is_honoured():
    zero_tf, _ = get_transforms("cifar100", "zero")
    reflect_tf, _ = get_transforms("cifar100", "reflect")
    zero_crop, reflect_crop = zero_tf.transforms[0], reflect_tf.transforms[0]
    assert (zero_crop.padding_mode, reflect_crop.padding_mode) == ("constant", "reflect")
    assert zero_crop.padding == reflect_crop.padding == 4

    from PIL import Image

    img = Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8))
    torch.manual_seed(0)
    i, j, _, _ = torchvision.transforms.RandomCrop.get_params(
        torchvision.transforms.functional.pad(img, 4), (32, 32))
    assert (i, j) != (4, 4)  # this seed's crop reaches into the border
    torch.manual_seed(0)
    zero = np.asarray(zero_crop(img))
    torch.manual_seed(0)
    reflect = np.asarray(reflect_crop(img))
    assert (zero == 0).any() and (reflect == 200).all()


def test_digits_has_no_flip_and_cifar_has_one():
    train_tf, _ = get_transforms("digits")
    names = [type(t).__name__ for t in train_tf.transforms]
    assert "RandomHorizontalFlip" not in names and names[0] == "RandomCrop"
    assert "RandomHorizontalFlip" in [type(t).__name__ for t in get_transforms("cifar100")[0].transforms]


# ---------------------------------------------------------------- Tiny-ImageNet, ImageNet, digits


def test_tinyimagenet_labels_and_images(tinyimagenet_dir: Path):
    bundle = get_dataloaders("tinyimagenet", str(tinyimagenet_dir), 4, 0)
    assert (bundle.num_classes, bundle.n_data, bundle.image_size) == (3, 6, 64)
    train = bundle.train_loader.dataset
    wnids = sorted(p.name for p in (tinyimagenet_dir / "tiny-imagenet-200" / "train").iterdir())
    assert train.classes == wnids
    for path, target in train.samples:  # found inside train/<wnid>/images/, boxes files skipped
        assert Path(path).parent.name == "images" and Path(path).parent.parent.name == wnids[target]
        assert path.endswith(".JPEG")

    val = bundle.val_loader.dataset
    expected = tinyimagenet_val_labels(tinyimagenet_dir)
    assert {Path(p).name: t for p, t in val.samples} == expected
    assert val.targets == [expected[Path(p).name] for p, _ in val.samples]
    x, y = next(iter(bundle.val_loader))
    assert x.shape[1:] == (3, 64, 64)
    x, y, idx = next(iter(bundle.train_eval_loader))  # includes the greyscale JPEG, converted to RGB
    assert x.shape == (2, 3, 64, 64)  # test_batch_size = 4 // 2
    assert train.loader(train.samples[0][0]).mode == "RGB"

    # data_folder may also be the tiny-imagenet-200 folder itself
    again = get_dataloaders("tinyimagenet", str(tinyimagenet_dir / "tiny-imagenet-200"), 4, 0)
    assert again.n_data == 6


def test_tinyimagenet_missing_parts_are_user_errors(tmp_path: Path):
    with pytest.raises(UserError, match="Tiny-ImageNet not found"):
        get_dataloaders("tinyimagenet", str(tmp_path), 4, 0)
    folder = write_tinyimagenet(tmp_path, num_classes=2, n_train_per_class=1, n_val_per_class=1)
    (folder / "val" / "val_annotations.txt").unlink()
    with pytest.raises(UserError, match="val_annotations.txt"):
        get_dataloaders("tinyimagenet", str(tmp_path), 4, 0)


def test_imagenet_folders(tmp_path: Path):
    folder = write_imagenet_folders(tmp_path, num_classes=2, n_per_class=2, size=40)
    bundle = get_dataloaders("imagenet", str(tmp_path), 4, 0, mode="instance")
    assert (bundle.num_classes, bundle.n_data, bundle.image_size) == (2, 4, 224)
    x, y, idx = next(iter(bundle.train_loader))
    assert x.shape == (4, 3, 224, 224)
    x, y = next(iter(bundle.val_loader))
    assert x.shape == (2, 3, 224, 224) and y.tolist() == [0, 0]
    assert get_dataloaders("imagenet", str(folder), 4, 0).n_data == 4  # the imagenet folder itself
    (folder / "val" / "n99999999").mkdir()
    (folder / "val" / "n99999999" / "x.JPEG").write_bytes((next((folder / "val").rglob("*.JPEG"))).read_bytes())
    with pytest.raises(UserError, match="differ"):
        get_dataloaders("imagenet", str(tmp_path), 4, 0)
    with pytest.raises(UserError, match="ImageNet not found"):
        get_dataloaders("imagenet", str(tmp_path / "empty"), 4, 0)


def test_digits_split_shapes_and_determinism():
    train, test = digits_mod.get_digits_datasets()
    assert (len(train), len(test)) == (1437, 360)
    assert train.data.shape == (1437, 32, 32, 3) and train.data.dtype == np.uint8
    assert sorted(set(train.targets)) == list(range(10)) and len(train.classes) == 10
    counts = Counter(train.targets)
    assert max(counts.values()) - min(counts.values()) <= 8  # stratified (classes have 174..183 images)
    again = digits_mod.Digits(train=True)
    assert np.array_equal(again.data, train.data) and again.targets == train.targets
    pixels = train.data.astype(np.float64) / 255
    assert pixels.mean() == pytest.approx(digits_mod.MEAN[0], abs=1e-4)
    assert pixels.std() == pytest.approx(digits_mod.STD[0], abs=1e-4)

    bundle = get_dataloaders("digits", "unused", 64, 0, mode="crd", nce_k=7)
    assert (bundle.num_classes, bundle.n_data, bundle.image_size) == (10, 1437, 32)
    x, y, idx, sample_idx = next(iter(bundle.train_loader))
    assert x.shape == (64, 3, 32, 32) and sample_idx.shape == (64, 8)
    x, y, idx = next(iter(bundle.train_eval_loader))
    assert torch.equal(x[0, 0], x[0, 1]) and torch.equal(x[0, 1], x[0, 2])  # grey replicated to RGB
    assert len(bundle.val_loader.dataset) == 360


def test_dataset_names_are_the_cli_choices():
    assert dataset.DATASETS == ("cifar100", "tinyimagenet", "imagenet", "digits")


def test_evaluation_loaders_leave_the_global_rng_alone(cifar100_dir: Path):
    """An offline stage reads train_eval_loader only when its cache is missing: that must not shift the
    global torch RNG (which drives augmentation with --num_workers 0), or cached and fresh runs differ."""
    bundle = get_dataloaders("cifar100", str(cifar100_dir), 16, 0, download=False)
    for loader in (bundle.train_eval_loader, bundle.val_loader):
        before = torch.get_rng_state()
        next(iter(loader))
        assert torch.equal(torch.get_rng_state(), before)
