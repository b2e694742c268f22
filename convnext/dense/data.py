"""Datasets for detection and segmentation in standard layouts, checked when they are built, not mid-epoch.

- `InstanceMaskFolder`: an image folder plus one instance-mask PNG per image (pixel value k = instance k,
  0 = background), as Penn-Fudan ships (`PNGImages/X.png`, `PedMasks/X_mask.png`); boxes come from the masks.
- `CocoDetection` (`convnext.dense.coco`): a COCO-style JSON (boxes, polygons or RLE masks), checked entry by entry.
- `SegmentationFolder`: images plus label PNGs of class ids with the same file stem (CamVid's `train` and
  `trainannot`, or any `images/` + `labels/`).

Every sample is (tv_tensors.Image uint8 (3, H, W), target); transforms are torchvision.transforms.v2 pipelines
that move boxes and masks with the image. Bad input and what happens to it:
- an image with no objects (empty mask PNG, no annotations): kept, with empty targets (torchvision trains on it);
- a box partly outside the image: clipped to it; a box left with a side < 1 px, or an instance whose mask is
  empty: dropped (`clean_instances`); a COCO polygon of fewer than 3 points: removed (and counted) when the
  dataset is built;
- a label PNG with ids that are neither classes nor `ignore_ids`: a ValueError naming the file and the ids, or
  (`unknown_ids="ignore"`) those pixels are ignored in the loss and the metric;
- an image and its mask/label of different sizes, a missing partner file, an unreadable image, two images (or
  labels) with the same stem, ids outside 0..65535: a ValueError naming the file(s), raised when the dataset is built;
- a COCO file: see `convnext.dense.coco`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from convnext.data.decode import find_images, load_image

log = logging.getLogger(__name__)

CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign", "fence", "car", "pedestrian", "bicyclist",
)  # fmt: skip
CAMVID_PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0), (192, 128, 128),
    (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip
Transform = Callable[..., tuple]


def image_size(path: Path, *, oriented: bool = True) -> tuple[int, int]:
    """(width, height) from the file header, without decoding: as `read_rgb` gives it (EXIF rotation applied), or
    with `oriented=False` as stored (label maps, which `read_ids` reads as stored); a ValueError naming an
    unreadable file."""
    try:
        with Image.open(path) as im:
            turned = oriented and im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)  # a quarter turn
            return (im.height, im.width) if turned else im.size
    except Exception as e:  # UnidentifiedImageError, OSError, or whatever a malformed EXIF block raises
        raise ValueError(f"{path}: cannot read image ({e})") from None


def read_rgb(path: Path) -> tv_tensors.Image:
    """(3, H, W) uint8, decoded as training, eval and predict decode (`convnext.data.decode.load_image`: EXIF
    rotation, transparency on white, 16-bit scaled); a `BadImageError` (a ValueError) naming the file."""
    return tv_tensors.Image(torch.from_numpy(np.array(load_image(path))).permute(2, 0, 1))


def read_ids(path: Path) -> np.ndarray:
    """A single-channel PNG of ids (mode L, P or I) as (H, W) int64; RGB labels, and ids outside 0..65535 (a 32-bit
    TIFF can hold them), are refused with the file named."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"{path}: expected a single-channel PNG of ids (mode L or P), got mode {im.mode}")
            ids = np.asarray(im).astype(np.int64)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: cannot decode label PNG ({e})") from None
    if ids.size and (ids.min() < 0 or ids.max() > 65535):
        raise ValueError(f"{path}: ids must be in 0..65535, found {ids.min()}..{ids.max()}")
    return ids


def _images_in(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted; a FileNotFoundError when it is missing or holds none, a
    ValueError when two share a stem (images pair with their masks and labels by stem)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    images = find_images(folder, recursive=False)
    seen: dict[str, Path] = {}
    for p in images:
        if p.stem in seen:
            raise ValueError(
                f"{folder}: {seen[p.stem].name} and {p.name} have the same stem; images pair with masks and labels "
                "by stem, so keep one"
            )
        seen[p.stem] = p
    return images


def _same_size(image: Path, other: Path, what: str) -> None:
    a, b = image_size(image), image_size(other, oriented=False)
    if a != b:
        raise ValueError(f"{what} size mismatch: {image} is {a[0]}x{a[1]} but {other} is {b[0]}x{b[1]}")


def clean_instances(target: dict, canvas: tuple[int, int]) -> dict:
    """Clip boxes (XYXY) to the (H, W) canvas, then drop boxes with a side < 1 px and instances with empty masks."""
    boxes = target["boxes"].clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, canvas[1])
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, canvas[0])
    keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
    if "masks" in target:
        keep &= target["masks"].flatten(1).sum(1) > 0
    out = {
        k: (v[keep] if isinstance(v, torch.Tensor) and v.ndim and len(v) == len(keep) else v) for k, v in target.items()
    }
    out["boxes"] = tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=canvas)
    return out


class InstanceMaskFolder(Dataset):
    """Images plus instance-mask PNGs (Penn-Fudan layout); every instance is class `label` (1 = pedestrian).

    Boxes are the masks' extents in pixel edges ([x0, y0, x1 + 1, y1 + 1]), so a 1-pixel-wide instance has a
    box 1 px wide. The masks are read once here, to check them and to know the boxes and sizes.
    """

    def __init__(
        self,
        image_dir: str | Path,
        mask_dir: str | Path,
        mask_suffix: str = "_mask",
        label: int = 1,
        transforms: Transform | None = None,
    ):
        self.images = _images_in(Path(image_dir))
        self.masks = [Path(mask_dir) / f"{p.stem}{mask_suffix}.png" for p in self.images]
        missing = [str(m) for m in self.masks if not m.is_file()]
        if missing:
            raise ValueError(f"{len(missing)} image(s) in {image_dir} have no mask, e.g. {missing[:3]}")
        self.label, self.transforms = label, transforms
        self.boxes: list[torch.Tensor] = []
        for img, mask in zip(self.images, self.masks):
            _same_size(img, mask, "image/mask")
            ids = read_ids(mask)
            self.boxes.append(torch.tensor([_extent(ids == k) for k in np.unique(ids) if k != 0], dtype=torch.float32))
        self.num_instances = sum(len(b) for b in self.boxes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[tv_tensors.Image, dict]:
        image = read_rgb(self.images[i])
        ids = torch.from_numpy(read_ids(self.masks[i]))
        instances = [k for k in ids.unique().tolist() if k != 0]
        canvas = tuple(image.shape[-2:])
        masks = (
            torch.stack([ids == k for k in instances]).to(torch.uint8)
            if instances
            else torch.zeros((0, *canvas), dtype=torch.uint8)
        )
        target = {
            "boxes": tv_tensors.BoundingBoxes(self.boxes[i].reshape(-1, 4), format="XYXY", canvas_size=canvas),
            "labels": torch.full((len(instances),), self.label, dtype=torch.int64),
            "masks": tv_tensors.Mask(masks),
            "image_id": i,
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, clean_instances(target, tuple(image.shape[-2:]))


def _extent(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def pennfudan(root: str | Path, transforms: Transform | None = None) -> InstanceMaskFolder:
    """Penn-Fudan (`root` holds PNGImages/ and PedMasks/, or a PennFudanPed/ folder that does)."""
    root = Path(root)
    if not (root / "PNGImages").is_dir() and (root / "PennFudanPed").is_dir():
        root = root / "PennFudanPed"
    return InstanceMaskFolder(root / "PNGImages", root / "PedMasks", transforms=transforms)


def split_indices(n: int, n_test: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """A seeded shuffle of range(n) cut into (train, test) with `n_test` test items (Penn-Fudan: 120 / 50)."""
    if not 0 < n_test < n:
        raise ValueError(f"test split of {n_test} from {n} images leaves nothing to train or to test")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[n_test:]), sorted(order[:n_test])


@dataclass(frozen=True)
class LabelSpec:
    num_classes: int
    ignore_index: int = 255  # what the loss and the metric skip
    ignore_ids: tuple[int, ...] = ()  # ids in the PNGs that mean "void" (CamVid: 11)
    unknown_ids: str = "error"  # "error": any other id outside [0, num_classes) is an error; "ignore": ignored

    def lut(self) -> torch.Tensor:
        """A 65536-entry table from a PNG id to a training label (class id or `ignore_index`)."""
        table = torch.full((65536,), self.ignore_index, dtype=torch.int64)
        table[: self.num_classes] = torch.arange(self.num_classes)
        return table


class SegmentationFolder(Dataset):
    """Images in `image_dir`, label PNGs of class ids in `label_dir` with the same stem (any image suffix).

    Built once: every pair is found, sizes compared, every label's ids checked against `spec`, so a bad file
    stops the run before training starts, with its name. Samples: (Image, Mask (H, W) int64 of labels).
    """

    def __init__(
        self, image_dir: str | Path, label_dir: str | Path, spec: LabelSpec, transforms: Transform | None = None
    ):
        self.images = _images_in(Path(image_dir))
        labels = {p.stem: p for p in _images_in(Path(label_dir))}
        missing = [p.name for p in self.images if p.stem not in labels]
        if missing:
            raise ValueError(
                f"{len(missing)} image(s) in {image_dir} have no label PNG in {label_dir}, e.g. {missing[:3]}"
            )
        self.labels = [labels[p.stem] for p in self.images]
        self.spec, self.transforms, self.lut = spec, transforms, spec.lut()
        allowed = set(range(spec.num_classes)) | set(spec.ignore_ids) | {spec.ignore_index}
        for img, lab in zip(self.images, self.labels):
            _same_size(img, lab, "image/label")
            unknown = sorted(set(np.unique(read_ids(lab)).tolist()) - allowed)
            if unknown and spec.unknown_ids == "error":
                raise ValueError(
                    f"{lab}: class ids {unknown} are not classes 0..{spec.num_classes - 1} nor ignored ids "
                    f"{sorted(spec.ignore_ids)} (map them to ignore with unknown_ids='ignore')"
                )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        image = read_rgb(self.images[i])
        label = tv_tensors.Mask(self.lut[torch.from_numpy(read_ids(self.labels[i]))])
        if self.transforms is not None:
            image, label = self.transforms(image, label)
        return image, label


def camvid(
    root: str | Path, split: str, transforms: Transform | None = None, unknown_ids: str = "error"
) -> SegmentationFolder:
    """CamVid as SegNet ships it: `root/{split}` images and `root/{split}annot` labels (11 classes, 11 = void)."""
    root = Path(root)
    if not (root / split).is_dir() and (root / "CamVid").is_dir():
        root = root / "CamVid"
    spec = LabelSpec(num_classes=11, ignore_ids=(11,), unknown_ids=unknown_ids)
    return SegmentationFolder(root / split, root / f"{split}annot", spec, transforms)


# --- transforms -------------------------------------------------------------------------------------------------

_TO_FLOAT = v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)


def detection_transforms(train: bool) -> v2.Compose:
    """Flip in training; float images in [0, 1]. The multi-scale resize is the detector's own (`min_size`)."""
    ops: list = [v2.RandomHorizontalFlip(0.5)] if train else []
    return v2.Compose([*ops, _TO_FLOAT])


def segmentation_transforms(
    train: bool,
    size: tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    ignore_index: int = 255,
) -> v2.Compose:
    """Training: rescale to fit `size` (h, w) times a random ratio in `scale_range` (as mmseg's ratio_range),
    random crop to `size` (padding with ignore), flip, colour jitter. Evaluation: the image as it is (the
    evaluator resizes it to the test scale and scores against the label at full resolution)."""
    if not train:
        return v2.Compose([_TO_FLOAT])
    return v2.Compose(
        [
            v2.ScaleJitter(size, scale_range=scale_range, antialias=True),
            v2.RandomCrop(size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}),
            v2.RandomHorizontalFlip(0.5),
            v2.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05),
            _TO_FLOAT,
        ]
    )


def collate_lists(batch: Sequence[tuple]) -> tuple[list, list]:
    """Detection batches stay lists: images of different sizes, one target dict each."""
    images, targets = zip(*batch)
    return list(images), list(targets)
