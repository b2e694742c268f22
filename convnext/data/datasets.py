"""Datasets: image folders (of class folders; for pre-training also of plain images), CIFAR-10/100 (torchvision),
and the embedded default `digits`.

Every dataset yields `(PIL image or transformed tensor, int label)` and has `.classes`. Image files are read by
`convnext.data.decode.load_image`, the decoder predict uses too; an unreadable one raises one `BadImageError` (a
ValueError) naming the file, or, with `skip_bad=True`, yields None (the collate function drops and counts them).

`digits` is scikit-learn's handwritten digits (1,797 8x8 grayscale images, 10 classes), which ships inside a
dependency, so the default works offline on a fresh machine. The images are handed out as RGB PIL images and the
transforms upsample them like any other picture: the model, the transforms and `convnext predict` on a PNG then all
work the same way as for any other RGB dataset, at the cost of 3x the stem's input (negligible).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets

from convnext.data.decode import BadImageError, find_images, is_image_file, load_image
from convnext.data.transforms import first_resize_side

SPLIT_ALIASES = {"train": ("train",), "val": ("val", "validation", "test")}
EMBEDDED = ("digits",)
TORCHVISION = ("cifar10", "cifar100")


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder (`root/<class>/*.jpg`) with clear errors and optional skipping of bad files."""

    def __init__(self, root: str | Path, transform: Callable | None = None, skip_bad: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        try:
            super().__init__(str(root), transform=transform, loader=load_image, is_valid_file=is_image_file)
        except FileNotFoundError as e:  # torchvision: no class folders, or no image in any of them
            raise ValueError(f"no images in {root}: expected {root}/<class>/<image> files ({e})") from None
        self.skip_bad = skip_bad

    @staticmethod
    def make_dataset(
        directory: str | Path,
        class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        """torchvision's scan, but each folder is entered once: a link back up (`ln -s .. loop`) or to another
        class would repeat images under this class's label (and a loop, without end)."""
        valid = is_valid_file or is_image_file
        samples, empty = [], []
        seen = {os.path.realpath(directory)} | {os.path.realpath(os.path.join(directory, c)) for c in class_to_idx}
        for name in sorted(class_to_idx):
            found = 0
            for root, dirs, files in os.walk(os.path.join(directory, name), followlinks=True):
                real = {d: os.path.realpath(os.path.join(root, d)) for d in dirs}
                dirs[:] = sorted(d for d in dirs if real[d] not in seen)
                seen.update(real[d] for d in dirs)
                for f in sorted(files):
                    if valid(path := os.path.join(root, f)):
                        samples.append((path, class_to_idx[name]))
                        found += 1
            if not found:
                empty.append(name)
        if empty and not allow_empty:
            raise FileNotFoundError(f"no valid file for the classes {', '.join(empty)}")
        return samples

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        return _read_sample(self.samples[index], self.transform, self.skip_bad)


class ImageFiles(Dataset):
    """Every image file under `root` (its subfolders too, `find_images`), unlabelled: target 0 and no classes.
    Pre-training's folder of images, which needs no class folders."""

    def __init__(self, root: str | Path, transform: Callable | None = None, skip_bad: bool = False):
        self.root = Path(root)
        self.samples = [(str(p), 0) for p in find_images(self.root)]
        self.targets = [0] * len(self.samples)
        self.classes: list[str] = []
        self.transform, self.skip_bad = transform, skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        return _read_sample(self.samples[index], self.transform, self.skip_bad)


def _read_sample(sample: tuple[str, int], transform: Callable | None, skip_bad: bool) -> tuple[Any, int] | None:
    """(path, target) -> (image, transformed when `transform` is given, target); None for a bad file if `skip_bad`."""
    path, target = sample
    try:
        img = load_image(path, first_resize_side(transform))  # a large JPEG decodes at reduced scale
    except BadImageError:
        if skip_bad:
            return None
        raise
    return (transform(img) if transform else img), target


class DigitsDataset(Dataset):
    """The 8x8 handwritten digits (UCI "Optical Recognition of Handwritten Digits", CC BY 4.0, as scikit-learn
    ships them: 1,797 images, values 0..16) as RGB PIL images, from `digits.npz` beside this file (46 KB), with a
    fixed stratified 80/20 train/val split (scikit-learn's `train_test_split(random_state=0)`, stored with them)."""

    def __init__(self, split: str = "train", transform: Callable | None = None):
        if split not in ("train", "val"):
            raise ValueError(f"digits has splits 'train' and 'val', not {split!r}")
        with np.load(Path(__file__).with_name("digits.npz")) as d:
            keep = np.flatnonzero(d["val"] if split == "val" else ~d["val"])
            self.images = (d["images"][keep] * (255.0 / 16.0)).round().astype(np.uint8)  # (N, 8, 8), 0..255
            self.targets = d["targets"][keep].astype(int).tolist()
        self.classes = [str(c) for c in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index], mode="L").convert("RGB")
        return (self.transform(img) if self.transform else img), self.targets[index]


class Subset(Dataset):
    """A fixed selection of another dataset's samples that keeps `.classes` and `.targets`."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)
        self.classes = dataset.classes
        self.targets = [dataset.targets[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]


def set_transform(ds: Any, transform: Any) -> None:
    """Give a dataset (or the dataset a Subset selects from) its transform."""
    while hasattr(ds, "indices") and hasattr(ds, "dataset"):
        ds = ds.dataset
    ds.transform = transform


def align_classes(val_ds: Dataset, classes: list[str], data: str) -> str | None:
    """Give `val_ds` the training classes' label indices where its own classes are some of them (a val folder
    with no images of a rare class): returns a line saying which classes it lacks, or None when the two agree.
    Val classes that the training data lacks (nothing learned them) raise ValueError naming them."""
    val_classes = list(val_ds.classes)
    if val_classes == classes:
        return None
    only_t, only_v = sorted(set(classes) - set(val_classes)), sorted(set(val_classes) - set(classes))
    if only_v or not only_t or not isinstance(val_ds, ImageFolder):
        raise ValueError(
            f"train and val classes differ in {data}: only in train {only_t[:5]}, only in val {only_v[:5]}"
            + ("" if only_t or only_v else " (same names, other order)")
        )
    index = {c: i for i, c in enumerate(classes)}
    val_ds.samples = val_ds.imgs = [(path, index[val_classes[t]]) for path, t in val_ds.samples]
    val_ds.targets = [t for _, t in val_ds.samples]
    val_ds.classes, val_ds.class_to_idx = list(classes), index
    shown = ", ".join(only_t[:5]) + (", ..." if len(only_t) > 5 else "")
    return f"data: val has no images of {len(only_t)} of the {len(classes)} classes ({shown}); scored on the others"


def split_indices(targets: Sequence[int], val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """A stratified, seeded split: `val_fraction` of each class goes to val (at least one if it has two)."""
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets)
    train, val = [], []
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        n_val = int(round(len(idx) * val_fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return sorted(train), sorted(val)


def _find_split_dir(root: Path, split: str) -> Path | None:
    for name in SPLIT_ALIASES[split]:
        if (root / name).is_dir():
            return root / name
    return None


def build_dataset(
    data: str,
    split: str,
    transform: Callable | None = None,
    *,
    data_dir: str | None = None,
    val_split: float = 0.1,
    split_seed: int = 0,
    skip_bad_images: bool = False,
    download: bool = True,
    labels: bool = True,
) -> tuple[Dataset, list[str]]:
    """The `split` ("train" or "val") of `data`: an image folder path, `cifar10`/`cifar100`, or `digits`.

    Image folders: `root/train/<class>/*` and `root/val/<class>/*` (`val` may also be named `validation` or
    `test`); with no val folder, `val_split` of `root/train` (or of `root` itself when it holds the class folders)
    is held out, stratified and seeded. A training folder with one class is refused (nothing to classify).
    labels=False (pre-training): a folder that holds image files itself, not only class folders, is read whole
    (subfolders too) as unlabelled images (`ImageFiles`), and one class is fine. CIFAR is read from `data_dir`
    (downloaded there when missing and `download`). Returns the dataset and its class names.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    name = data.lower()
    if name in EMBEDDED and not Path(data).exists():
        ds: Any = DigitsDataset(split, transform)
        return ds, ds.classes
    if name in TORCHVISION and not Path(data).exists():
        return _cifar(name, split, transform, data_dir, download)

    root = Path(data).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset {data!r} is neither a folder nor one of {', '.join(EMBEDDED + TORCHVISION)}")
    train_dir = _find_split_dir(root, "train")
    val_dir = _find_split_dir(root, "val")
    if split == "val" and val_dir is not None:
        return _checked(_read_folder(val_dir, transform, skip_bad_images, labels))
    base = _read_folder(train_dir or root, transform, skip_bad_images, labels)
    if labels and split == "train" and len(base.classes) == 1:
        raise ValueError(
            f"{train_dir or root} holds one class ({base.classes[0]}): classification needs two or more class "
            "folders (<folder>/<class>/<image>)"
        )
    if split == "train" and val_dir is not None:
        return _checked(base)
    if not 0 < val_split < 1:
        raise ValueError(f"{root} has no val folder; set data.val_split to a fraction in (0, 1) to hold one out")
    train_idx, val_idx = split_indices(base.targets, val_split, split_seed)
    return _checked(Subset(base, train_idx if split == "train" else val_idx))


def _read_folder(folder: Path, transform: Callable | None, skip_bad: bool, labels: bool) -> Any:
    """An ImageFolder of `folder`'s class folders; without labels, every image in it when it holds image files."""
    if not labels and any(is_image_file(p) for p in folder.iterdir()):
        return ImageFiles(folder, transform, skip_bad)
    return ImageFolder(folder, transform, skip_bad)


def _checked(ds: Any) -> tuple[Dataset, list[str]]:
    if len(ds) == 0:
        raise ValueError("dataset has no images")
    return ds, list(ds.classes)


def _cifar(name: str, split: str, transform: Callable | None, data_dir: str | None, download: bool):
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    root = Path(data_dir or Path.home() / ".cache" / "convnext" / "data").expanduser()
    try:
        ds = cls(str(root), train=split == "train", transform=transform, download=download)
    except RuntimeError as e:
        raise FileNotFoundError(f"{name} not found in {root} ({e}); pass --data-dir DIR holding it") from e
    except OSError as e:  # no network
        raise FileNotFoundError(f"{name} is not in {root} and could not be downloaded ({e})") from e
    return ds, list(ds.classes)


def build_eval_dataset(
    data: str,
    split: str = "val",
    img_size: int = 224,
    crop_pct: float = 0.875,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    data_dir: str | None = None,
    **kwargs: Any,
) -> tuple[Dataset, list[str]]:
    """`data`'s split with the eval transform (resize to img_size / crop_pct, center crop): (dataset, classes)."""
    from convnext.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform

    tf = eval_transform(img_size, crop_pct, mean or IMAGENET_MEAN, std or IMAGENET_STD)
    return build_dataset(data, split, tf, data_dir=data_dir, **kwargs)


class SeededDataset(Dataset):
    """Makes each sample's random augmentation a function of (seed, epoch, index) only.

    Data order comes from the sampler and augmentation from here, so a run gives the same batches whatever the
    number of workers or processes, and a resumed run replays exactly what the interrupted one would have seen.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0
        self.classes = getattr(dataset, "classes", None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        key = hashlib.blake2b(f"{self.seed}:{self.epoch}:{index}".encode(), digest_size=8).digest()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(key, "little") & (2**63 - 1))
            return self.dataset[index]


def collate_skip(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack (image, label) pairs, dropping the None of skipped bad images: (images, labels, n_skipped)."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    x = torch.stack([b[0] for b in good])
    y = torch.tensor([b[1] for b in good], dtype=torch.long)
    return x, y, skipped
