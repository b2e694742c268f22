"""Training data decoded once into a uint8 tensor and augmented on whole batches in torch.

Decoding a JPEG and running the transforms per image costs more CPU than a small ConvNeXt's training step on a
small image, so on a 2-core machine a worker process decoding every epoch takes a core away from training.
Data that fits in memory is decoded once, at the training size plus the crop margin (`cache_size`), into
`CachedImages` (N, 3, S, S) uint8; each batch is then cropped, flipped and normalised in torch (`BatchAugment`).
Each image's random crop and flip are a function of (seed, epoch, its position in the epoch's global order)
only, so a resumed run sees exactly the batches the interrupted one would have seen, and N processes see the
pixels one process sees at the same global batch.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from convnext.data.datasets import collate_skip
from convnext.data.transforms import interpolation_mode, pad_pixels

CROPS = ("rrc", "pad", "resize")


def memory_available() -> int | None:
    """Bytes of memory the kernel says can be had without swapping (MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def cache_size(img_size: int, crop: str, source_short_side: int | None) -> int:
    """The side the training images are cached at: the training size, plus a crop margin (up to the eval resize
    img_size / 0.875) for random-resized crops when the source images are larger than the training size."""
    if crop != "rrc" or not source_short_side:
        return img_size
    return max(img_size, min(source_short_side, round(img_size / 0.875)))


def decode_transform(size: int, crop_pct: float = 1.0, interpolation: str = "bicubic") -> v2.Transform:
    """PIL image -> uint8 tensor (3, size, size): the short side resized to size / crop_pct (with `interpolation`,
    a name `transforms.interpolation_mode` takes), then center-cropped."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(round(size / crop_pct), interpolation=interpolation_mode(interpolation), antialias=True),
            v2.CenterCrop(size),
        ]
    )


@dataclass
class CachedImages:
    images: torch.Tensor  # (N, 3, S, S) uint8
    targets: torch.Tensor  # (N,) int64
    skipped: int  # unreadable images left out (with skip_bad_images)

    def __len__(self) -> int:
        return len(self.targets)


def decode_all(dataset: Dataset, size: int, workers: int = 0) -> CachedImages:
    """Every image of `dataset` (which yields (uint8 (3, size, size), label), or None for a skipped bad image)."""
    n = len(dataset)
    images = torch.empty(n, 3, size, size, dtype=torch.uint8, memory_format=torch.channels_last)  # for the crops
    targets = torch.empty(n, dtype=torch.int64)
    loader = DataLoader(dataset, batch_size=256, num_workers=workers, collate_fn=collate_skip)
    filled, skipped = 0, 0
    try:
        for x, y, bad in loader:
            images[filled : filled + len(y)] = x
            targets[filled : filled + len(y)] = y
            filled += len(y)
            skipped += bad
    except ValueError as e:  # from a worker, the message carries its traceback: keep the line naming the file
        last = str(e).strip().splitlines()[-1]
        raise ValueError(last.removeprefix("ValueError: ").removeprefix("BadImageError: ")) from None
    return CachedImages(images[:filled], targets[:filled], skipped)


def fits_in_memory(nbytes: int, share: float = 0.5, processes: int = 1) -> tuple[bool, str]:
    """Whether a cache of `nbytes` per process fits in `share` of the available memory; and the figures in words."""
    avail = memory_available()
    if avail is None:
        return False, "available memory unknown"
    limit = avail * share / max(processes, 1)
    return nbytes <= limit, f"{nbytes / 2**20:.0f} MiB needed, {limit / 2**20:.0f} MiB allowed ({share:.0%} of free)"


def epoch_key(seed: int, epoch: int) -> int:
    """A 63-bit key for (seed, epoch)."""
    key = hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(key, "little") & (2**63 - 1)


def _shift(z: torch.Tensor, k: int) -> torch.Tensor:
    return (z >> k) & ((1 << (64 - k)) - 1)  # a logical right shift of int64 bits


def uniform(key: int, positions: torch.Tensor, draws: int) -> torch.Tensor:
    """(len(positions), draws) float64 in [0, 1): a pure function of (key, position, draw), splitmix64 on int64
    (multiplications wrap), so an image's random numbers do not depend on its batch, process or step."""
    z = key + positions.to(torch.int64)[:, None] * draws + torch.arange(draws)
    z = z * -7046029254386353131  # 0x9E3779B97F4A7C15
    z = (z ^ _shift(z, 30)) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    z = (z ^ _shift(z, 27)) * -7723592293110705685  # 0x94D049BB133111EB
    z = z ^ _shift(z, 31)
    return _shift(z, 11).double() / 2.0**53


class Normalise:
    """0-255 values (uint8 or float) -> (x / 255 - mean) / std, float32 channels-last."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


class BatchAugment:
    """uint8 (B, 3, S, S) -> normalised float32 (B, 3, img_size, img_size): crop, horizontal flip, normalise.

    crop: "rrc" = a random-resized crop per image (area share `scale`, aspect `ratio`, bilinear); "pad" = reflect-pad
    by `translate` pixels (default 1/8 of the side) and a random crop; "resize" = no crop augmentation.
    `positions` are the images' places in the epoch's global order; with `key` they fix every random draw.
    """

    def __init__(
        self,
        img_size: int,
        *,
        crop: str = "rrc",
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        translate: int | None = None,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ):
        if crop not in CROPS:
            raise ValueError(f"data.crop must be one of {', '.join(CROPS)}, not {crop!r}")
        self.img_size, self.crop, self.scale, self.ratio, self.hflip = img_size, crop, tuple(scale), tuple(ratio), hflip
        self.pad = pad_pixels(img_size, translate)
        self.normalise = Normalise(mean, std)

    def __call__(self, x: torch.Tensor, key: int, positions: torch.Tensor) -> torch.Tensor:
        s = self.img_size
        u = uniform(key, positions, 25)  # flip, 2 for a translation, 2 x 10 tries + 2 for a resized crop
        flip = u[:, 0] < self.hflip
        if self.crop == "rrc":
            return self.normalise(self._resized_crop(x, flip, u[:, 3:]))
        x = self._translate(x, u[:, 1:3], flip, self.pad if self.crop == "pad" else 0)
        if x.shape[-1] != s:
            x = F.interpolate(x.float(), size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return self.normalise(x)

    @staticmethod
    def _translate(x: torch.Tensor, u: torch.Tensor, flip: torch.Tensor, p: int) -> torch.Tensor:
        """Each image's window of its reflect-padded self (`p` px a side, offsets from `u`), mirrored where `flip`:
        slices of the uint8 images. One gather over the float batch took 22 ms for 128 images at 128 px (this: 1.4),
        and `convnext train` there waited for data 22% of the time (now 7.5%; benchmarks/NOTES.md)."""
        _, _, h, w = x.shape
        padded = F.pad(x, (p, p, p, p), mode="reflect") if p else x
        dy, dx = (u * (2 * p + 1)).long().clamp(max=2 * p).T.tolist()
        out = torch.empty_like(x)
        for i, (y0, x0, mirror) in enumerate(zip(dy, dx, flip.tolist())):
            window = padded[i, :, y0 : y0 + h, x0 : x0 + w]
            out[i] = window.flip(-1) if mirror else window
        return out

    def _resized_crop(self, x: torch.Tensor, flip: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """torchvision's RandomResizedCrop: its box rule (10 tries, then the whole image), drawn for all images at
        once, and each integer box resized with antialiased bilinear filtering as uint8 (channels-last, where
        torch's uint8 resize is vectorised). One float grid_sample over the batch took 36 ms for 65 images at
        224 px, this 8 ms; at 64 px, 6.6 and 3.6 ms for 128 (benchmarks/NOTES.md)."""
        b, _, h, w = x.shape
        tries = 10
        lo, hi = self.scale
        area = h * w * (lo + (hi - lo) * u[:, :tries])
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, tries : 2 * tries])
        cw, ch = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
        ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((b,), -1))
        pick = first.clamp(min=0)[:, None]
        cw = torch.where(first >= 0, cw.gather(1, pick)[:, 0], torch.full((b,), float(w)))
        ch = torch.where(first >= 0, ch.gather(1, pick)[:, 0], torch.full((b,), float(h)))
        x0 = torch.floor(u[:, 2 * tries] * (w - cw + 1))
        y0 = torch.floor(u[:, 2 * tries + 1] * (h - ch + 1))
        s = self.img_size
        src = x.contiguous(memory_format=torch.channels_last)  # a no-op for the cache's own batches
        out = torch.empty(b, x.shape[1], s, s, dtype=x.dtype, memory_format=torch.channels_last)
        boxes = zip(y0.int().tolist(), x0.int().tolist(), ch.int().tolist(), cw.int().tolist(), flip.tolist())
        for i, (top, left, height, width, mirror) in enumerate(boxes):
            crop = src[i : i + 1, :, top : top + height, left : left + width]
            r = F.interpolate(crop, size=(s, s), mode="bilinear", antialias=True, align_corners=False)[0]
            out[i] = r.flip(-1) if mirror else r
        return out


class CachedLoader:
    """Batches of cached images in `sampler`'s order: (augmented float images, labels, 0), like the DataLoader
    path's (images, labels, skipped). Without `augment` the images are only normalised (evaluation)."""

    def __init__(
        self,
        cache: CachedImages,
        sampler: Sampler[int] | Sequence[int],
        batch_size: int,
        *,
        augment: BatchAugment | None = None,
        normalise: tuple[Sequence[float], Sequence[float]] | None = None,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ):
        self.cache, self.sampler, self.batch_size, self.drop_last = cache, sampler, batch_size, drop_last
        self.augment, self.seed, self.rank, self.world, self.epoch = augment, seed, rank, world, 0
        self.normalise = Normalise(*(normalise or ((0.5,) * 3, (0.5,) * 3)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        indices = torch.as_tensor(list(self.sampler), dtype=torch.int64)
        skip = getattr(self.sampler, "skip", 0)  # samples of this process already trained on (resume)
        key = epoch_key(self.seed, self.epoch)
        for i in range(len(self)):
            idx = indices[i * self.batch_size : (i + 1) * self.batch_size]
            x, y = self.cache.images[idx], self.cache.targets[idx]
            if self.augment is not None:
                # DistributedSampler hands process r the global order's places r, r + world, ...
                mine = skip + i * self.batch_size + torch.arange(len(idx))
                x = self.augment(x, key, mine * self.world + self.rank)
            else:
                x = self.normalise(x)
            yield x, y, 0


def typical_short_side(dataset: Dataset, probes: int = 32) -> int | None:
    """The median short side of a few of `dataset`'s source images (read from file headers, nothing decoded):
    an image folder (or a Subset of one), torchvision's CIFAR (`.data`), or the digits (`.images`)."""
    base = dataset
    while hasattr(base, "indices") and hasattr(base, "dataset"):  # a Subset: its source images are the same kind
        base = base.dataset
    for attr in ("data", "images"):
        arr = getattr(base, attr, None)
        if arr is not None and hasattr(arr, "shape") and len(arr.shape) >= 3:
            return int(min(arr.shape[1], arr.shape[2]))
    samples = getattr(base, "samples", None)
    if not samples:
        return None
    from PIL import Image

    step = max(len(samples) // probes, 1)
    sides = []
    for path, _ in samples[::step][:probes]:
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except (OSError, ValueError, SyntaxError):
            continue
    return sorted(sides)[len(sides) // 2] if sides else None
