"""The one image decoder: every path that feeds pixels to a model (train, eval, predict, ERF, dense) reads files here,
and the one answer to which files are images (`IMAGE_EXTENSIONS`, `is_image_file`, `find_images`).

A model sees the same pixels when it is trained, scored and asked to predict: EXIF orientation applied,
transparency composited on white, 16-bit values scaled (not clipped) to 8 bits, every other mode converted to RGB.
A JPEG far larger than the pipeline's first resize is decoded at 1/2, 1/4 or 1/8 scale by libjpeg (`min_side`,
which `first_resize_side` reads off the transform), still `DRAFT_MARGIN` times the resize target: a 12 MP photo
decodes 4x faster, and the resized pixels stay within a level or two of a full decode (`tests/data/test_decode.py`).
Label maps (segmentation ids, instance masks) are not pictures and must not come through here.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Longer than 2000:1, an image resized to the model's size on its short side no longer fits: at 256 px, 2000:1 is
# 0.4 GB of uint8 pixels, a 467-byte 1x100000 PNG 19 GB. (A 1500:1 needle still predicts: tests/test_infer.py.)
MAX_ASPECT = 2000
# A JPEG is decoded at reduced scale only while its short side stays >= this many times the resize target, so the
# antialiased resize still does the filtering: on 3840x2880 photo mosaics the resized pixels differed from a full
# decode by 0.2 levels on average (p99 1, max 6), against 0.5 (p99 3, max 12) at twice the target.
DRAFT_MARGIN = 4
# What counts as an image file, by name (any case), for datasets, predict, ERF and dense alike.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class BadImageError(ValueError):
    """An image file that cannot be used; the message names the file and the reason."""


def is_image_file(path: str | Path) -> bool:
    """An image by name (one of `IMAGE_EXTENSIONS`, not a hidden dot-file such as macOS's `._x.jpg`) and a regular
    file: a FIFO named `x.jpg` would block its reader forever."""
    name = os.path.basename(path)
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".") and os.path.isfile(path)


def find_images(inputs: str | Path | Iterable[str | Path], recursive: bool = True) -> list[Path]:
    """Each file of `inputs` as given (whatever its name; a missing one is left for its reader to report) and, for
    each folder, its image files (`is_image_file`) sorted, those in its subfolders too when `recursive` (links to
    folders are not followed). A folder with no image file raises a FileNotFoundError naming it."""
    paths: list[Path] = []
    for item in [inputs] if isinstance(inputs, (str, Path)) else inputs:
        p = Path(item)
        if not p.is_dir():
            paths.append(p)
            continue
        found = sorted(f for f in (p.rglob("*") if recursive else p.iterdir()) if is_image_file(f))
        if not found:
            where = f"{p} or its subfolders" if recursive else str(p)
            raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {where}")
        paths.extend(found)
    return paths


def load_image(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Read any image file as 8-bit RGB (EXIF rotation applied, transparency composited on white).

    min_side: the short side the caller resizes to next; a JPEG whose short side is at least 2 x `DRAFT_MARGIN` x
        that is decoded at the largest of 1/2, 1/4, 1/8 scale that keeps its short side >= `DRAFT_MARGIN` x it.
        None (and every other format) decodes at full size.

    Grayscale, 1-bit, palette, CMYK and 16-bit images are converted. Unreadable files, truncated data and images
    over Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`) raise `BadImageError` (a ValueError)
    whose message starts "cannot read image <path>"; so do images thinner than 1:`MAX_ASPECT`.
    """
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a bomb is a bomb either way.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                w, h = im.size
                if max(w, h) > MAX_ASPECT * max(min(w, h), 1):
                    raise _Strip(f"{w}x{h} px, an aspect ratio beyond {MAX_ASPECT}:1")
                if min_side:
                    _draft(im, DRAFT_MARGIN * min_side)
                im.load()  # decode now: truncated data raises here, not later in a worker
                return to_rgb(ImageOps.exif_transpose(im))  # a copy: the file's image dies when it is closed
        except Exception as e:  # malformed files make Pillow raise almost anything (SyntaxError, struct.error, ...)
            raise BadImageError(f"cannot read image {path}: {_reason(e)}") from e


def _draft(im: Image.Image, short: int) -> None:
    """Ask Pillow's JPEG decoder for a reduced scale whose short side is still >= `short` (a no-op elsewhere)."""
    w, h = im.size
    scale = short / max(min(w, h), 1)
    if im.format == "JPEG" and scale <= 0.5:
        im.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))  # libjpeg takes the largest scale >= this


class _Strip(ValueError):
    pass


def _reason(e: Exception) -> str:
    if isinstance(e, _Strip):
        return str(e)
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"refused, larger than Pillow's decompression-bomb limit ({e})"
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, IsADirectoryError):
        return "is a directory"
    if isinstance(e, UnidentifiedImageError):
        return "not an image Pillow can read"
    if isinstance(e, OSError):
        return f"unreadable or truncated image ({e})"
    return f"corrupt image ({type(e).__name__}: {e})"


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. 16/32-bit and float images are scaled, not clipped (Pillow's convert clips)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        if im.mode == "F":
            top = 1.0 if a.size and a.max() <= 1.0 else 255.0
        else:  # "I;16*" is 16-bit; "I" (32-bit) usually holds 16-bit PNG data
            top = 65535.0 if im.mode.startswith("I;16") or (a.size and a.max() > 255) else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")
