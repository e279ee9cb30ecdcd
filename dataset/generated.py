"""Tiny data sets generated in the real on-disk formats (nothing is downloaded): what the tests, the GPU
check (scripts/gpu_check.py) and the benchmarks read through the real loaders.

    write_cifar100(root)          -> root/cifar-100-python/{train,test,meta}   (pass root as data_folder)
    write_tinyimagenet(root)      -> root/tiny-imagenet-200/...                (root or the returned folder)
    write_imagenet_folders(root)  -> root/imagenet/{train,val}/<wnid>/*.JPEG   (pass root as data_folder)
    read_cifar100_split(folder, train) reads a split back independently of torchvision.

Images are class-dependent (a per-class colour and stripe pattern plus noise), so a tiny model
can learn something from them. Everything is deterministic given `seed`.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------------------------
# CIFAR-100
# ----------------------------------------------------------------------------------------------

# The 20 CIFAR-100 superclasses and their 5 fine classes each (names as in the real meta file).
CIFAR100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
CIFAR100_FINE_NAMES: tuple[str, ...] = tuple(sorted(n for group in CIFAR100_SUPERCLASSES.values() for n in group))
CIFAR100_COARSE_NAMES: tuple[str, ...] = tuple(CIFAR100_SUPERCLASSES)
_FINE_TO_COARSE = {n: i for i, group in enumerate(CIFAR100_SUPERCLASSES.values()) for n in group}


class _Py2Str(bytes):
    """Marks a value that the real (Python 2 written) files store as a py2 `str`."""


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets us add an opcode writer
    """Writes _Py2Str as the SHORT_BINSTRING/BINSTRING opcodes Python 2 used for `str`.

    Such strings load as `str` with pickle.load(f, encoding='latin1') (torchvision's reader) and
    as `bytes` with encoding='bytes', exactly like the keys and names of the real CIFAR files.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + bytes(obj))
        else:
            self.write(pickle.BINSTRING + n.to_bytes(4, "little") + bytes(obj))
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2str


def _py2(value: Any) -> Any:
    """Turn str into _Py2Str, recursively through dict keys/values and lists."""
    if isinstance(value, str):
        return _Py2Str(value.encode("latin1"))
    if isinstance(value, dict):
        return {_py2(k): _py2(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_py2(v) for v in value]
    return value


def _dump_py2(obj: Any, f: BinaryIO) -> None:
    _Py2Pickler(f, protocol=2).dump(_py2(obj))


def _class_images(labels: np.ndarray, size: int, rng: np.random.Generator, num_classes: int) -> np.ndarray:
    """N x size x size x 3 uint8 images: class colour + class stripe pattern + noise."""
    palette = np.random.default_rng(12345).integers(40, 216, size=(max(num_classes, 1), 3))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    images = np.empty((len(labels), size, size, 3), dtype=np.uint8)
    for i, c in enumerate(labels):
        c = int(c)
        freq = 1 + c % 4
        coord = (xx, yy, xx + yy, xx - yy)[(c // 4) % 4]
        stripes = 30.0 * np.sin(2 * np.pi * freq * coord / size)
        img = palette[c][None, None, :] + stripes[..., None] + rng.normal(0.0, 12.0, (size, size, 3))
        images[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return images


def _cifar_split(
    n_per_class: int, num_classes: int, rng: np.random.Generator, names: list[str], label: str
) -> dict[str, Any]:
    fine = np.repeat(np.arange(num_classes), n_per_class)
    rng.shuffle(fine)  # the real files are not sorted by class
    images = _class_images(fine, 32, rng, num_classes)
    # Real layout: one row of 3072 bytes per image = the 1024 red, then green, then blue values,
    # each 32x32 plane in row-major order.
    rows = images.transpose(0, 3, 1, 2).reshape(len(fine), 3072)
    return {
        "batch_label": label,
        "fine_labels": [int(c) for c in fine],
        "coarse_labels": [_FINE_TO_COARSE.get(names[c], int(c) % 20) for c in fine],
        "data": np.ascontiguousarray(rows, dtype=np.uint8),
        "filenames": [f"{names[c]}_s_{i:06d}.png" for i, c in enumerate(fine)],
    }


def write_cifar100(
    root: str | Path,
    n_train_per_class: int = 2,
    n_test_per_class: int = 1,
    num_classes: int = 100,
    seed: int = 0,
) -> Path:
    """Write root/cifar-100-python/{train,test,meta} in the format of the official python pickles.

    Each file is a protocol-2 pickle of a dict whose keys are Python 2 strings (they load as
    b'data', b'fine_labels', ... with encoding='bytes' and as 'data', ... with encoding='latin1').
    train/test: b'data' uint8 (N, 3072) rows of R, G, B planes, b'fine_labels', b'coarse_labels',
    b'filenames', b'batch_label'; meta: b'fine_label_names', b'coarse_label_names'. With
    num_classes <= 100 the real class names are used. Returns the cifar-100-python folder;
    pass `root` as data_folder.
    """
    if num_classes < 1:
        raise ValueError("num_classes must be >= 1")
    rng = np.random.default_rng(seed)
    if num_classes <= len(CIFAR100_FINE_NAMES):
        names = list(CIFAR100_FINE_NAMES[:num_classes])
    else:
        names = [f"class_{c:03d}" for c in range(num_classes)]
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": _cifar_split(n_train_per_class, num_classes, rng, names, "training batch 1 of 1"),
        "test": _cifar_split(n_test_per_class, num_classes, rng, names, "testing batch 1 of 1"),
    }
    for name, content in splits.items():
        with open(folder / name, "wb") as f:
            _dump_py2(content, f)
    with open(folder / "meta", "wb") as f:
        _dump_py2({"fine_label_names": names, "coarse_label_names": list(CIFAR100_COARSE_NAMES)}, f)
    return folder


def read_cifar100_split(folder: str | Path, train: bool = True) -> tuple[np.ndarray, list[int]]:
    """Read a written split back without torchvision: (N x 32 x 32 x 3 uint8 images, fine labels).

    `folder` is the cifar-100-python folder or its parent.
    """
    folder = Path(folder)
    if folder.name != "cifar-100-python":
        folder = folder / "cifar-100-python"
    with open(folder / ("train" if train else "test"), "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    images = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, list(entry[b"fine_labels"])


# ----------------------------------------------------------------------------------------------
# Tiny-ImageNet
# ----------------------------------------------------------------------------------------------


def _wnids(num_classes: int) -> list[str]:
    """num_classes distinct WordNet-style ids (n0XXXXXXX), in sorted order."""
    return [f"n{1443537 + 7919 * c:08d}" for c in range(num_classes)]


def _save_jpeg(array: np.ndarray, path: Path, grey: bool = False) -> None:
    img = Image.fromarray(array, mode="RGB")
    if grey:
        img = img.convert("L")  # the real set contains some single-channel JPEGs
    img.save(path, format="JPEG", quality=95)


def write_tinyimagenet(
    root: str | Path,
    num_classes: int = 3,
    n_train_per_class: int = 2,
    n_val_per_class: int = 1,
    seed: int = 0,
    n_test: int = 2,
    n_grey: int = 1,
) -> Path:
    """Write root/tiny-imagenet-200/ laid out like the unzipped official archive; returns that folder.

    wnids.txt (unsorted, as in the real file), words.txt, train/<wnid>/images/<wnid>_<i>.JPEG and
    train/<wnid>/<wnid>_boxes.txt, val/images/val_<i>.JPEG with val/val_annotations.txt
    (file, wnid, x0, y0, x1, y1; tab separated; classes interleaved), test/images/test_<i>.JPEG.
    All images are 64x64; the first `n_grey` training images are single-channel JPEGs.
    Class c of the generated pixels is the c-th wnid in sorted order (the loader's class index).
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "tiny-imagenet-200"
    by_index = _wnids(num_classes)  # sorted: class index c <-> by_index[c]
    wnids = list(by_index)
    rng.shuffle(wnids)  # wnids.txt of the real archive is not sorted
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (folder / "words.txt").write_text(
        "".join(f"{w}\tsynthetic class {by_index.index(w)}\n" for w in wnids) + "n00001740\tentity\n"
    )
    greys_left = n_grey
    for c, wnid in enumerate(by_index):
        images_dir = folder / "train" / wnid / "images"
        images_dir.mkdir(parents=True, exist_ok=True)
        pixels = _class_images(np.full(n_train_per_class, c), 64, rng, num_classes)
        boxes = []
        for i in range(n_train_per_class):
            name = f"{wnid}_{i}.JPEG"
            _save_jpeg(pixels[i], images_dir / name, grey=greys_left > 0)
            greys_left -= 1
            boxes.append(f"{name}\t{8 + i % 5}\t{6 + i % 7}\t{50 + i % 9}\t{55 + i % 4}\n")
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))

    val_images = folder / "val" / "images"
    val_images.mkdir(parents=True, exist_ok=True)
    val_labels = np.repeat(np.arange(num_classes), n_val_per_class)
    rng.shuffle(val_labels)
    pixels = _class_images(val_labels, 64, rng, num_classes)
    lines = []
    for i, c in enumerate(val_labels):
        name = f"val_{i}.JPEG"
        _save_jpeg(pixels[i], val_images / name)
        lines.append(f"{name}\t{by_index[c]}\t{4 + i % 6}\t{3 + i % 5}\t{60 - i % 8}\t{58 - i % 3}\n")
    (folder / "val" / "val_annotations.txt").write_text("".join(lines))

    test_images = folder / "test" / "images"
    test_images.mkdir(parents=True, exist_ok=True)
    for i, px in enumerate(_class_images(rng.integers(0, num_classes, n_test), 64, rng, num_classes)):
        _save_jpeg(px, test_images / f"test_{i}.JPEG")
    return folder


def tinyimagenet_val_labels(folder: str | Path) -> dict[str, int]:
    """val file name -> class index (sorted-wnid position), read from a written val_annotations.txt."""
    folder = Path(folder)
    if folder.name != "tiny-imagenet-200":
        folder = folder / "tiny-imagenet-200"
    by_index = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
    out = {}
    for line in (folder / "val" / "val_annotations.txt").read_text().splitlines():
        name, wnid = line.split("\t")[:2]
        out[name] = by_index.index(wnid)
    return out


# ----------------------------------------------------------------------------------------------
# ImageNet-style class folders
# ----------------------------------------------------------------------------------------------


def write_imagenet_folders(
    root: str | Path,
    num_classes: int = 2,
    n_per_class: int = 2,
    size: int = 40,
    seed: int = 0,
) -> Path:
    """Write root/imagenet/{train,val}/<wnid>/*.JPEG (size x size RGB) and return root/imagenet.

    train files are <wnid>_<i>.JPEG, val files ILSVRC2012_val_<8 digits>.JPEG, both sorted into
    per-class folders; n_per_class images per class in each split. Pass `root` as data_folder.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "imagenet"
    wnids = _wnids(num_classes)
    counter = 0
    for split in ("train", "val"):
        for c, wnid in enumerate(wnids):
            class_dir = folder / split / wnid
            class_dir.mkdir(parents=True, exist_ok=True)
            for i, px in enumerate(_class_images(np.full(n_per_class, c), size, rng, num_classes)):
                if split == "train":
                    name = f"{wnid}_{i}.JPEG"
                else:
                    counter += 1
                    name = f"ILSVRC2012_val_{counter:08d}.JPEG"
                _save_jpeg(px, class_dir / name)
    return folder
