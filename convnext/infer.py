"""Evaluate and predict a model `convnext.resolve` gave (any name, weight file, run or Hub repo), reading images
robustly.

- `load_image` (from `convnext.data.decode`, the decoder training reads with too) turns any image file into an
  8-bit RGB picture or raises `BadImageError` naming the file.
- `evaluate` returns top-1/top-5 (percent), mean loss, per-class accuracy and the confusion matrix.
- `predict` yields one dict per image, in input order, with the top-k labels or the reason it failed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from convnext.data.decode import BadImageError, find_images, load_image
from convnext.data.transforms import first_resize_side
from convnext.resolve import Preprocess, Resolved

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- images


def center_crop_aspect(im: Image.Image, max_ratio: float = 4.0) -> Image.Image:
    """Center-crop the long side to at most `max_ratio` x the short side. The eval crop keeps only the central
    square anyway, so the result is the same, but a 1x5000 image no longer resizes to a gigapixel one first."""
    w, h = im.size
    short = min(w, h)
    long_max = max(1, int(short * max_ratio))
    if max(w, h) <= long_max:
        return im
    nw, nh = min(w, long_max), min(h, long_max)
    left, top = (w - nw) // 2, (h - nh) // 2
    return im.crop((left, top, left + nw, top + nh))


# ----------------------------------------------------------------------------------------------- evaluate


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    preprocess: Preprocess | None = None,
) -> dict:
    """Score a classifier on (images, targets) batches (logits through `preprocess.logits`: flip-averaged for a
    run trained with data.tta_flip).

    Returns {"top1", "top5" (percent; top-k with k = min(5, classes)), "loss" (mean cross-entropy), "n",
    "per_class" (accuracy in percent, None for a class with no images), "confusion" (rows = true class)}.
    """
    from tqdm import tqdm

    device = torch.device(device)
    model.eval()
    k = min(5, num_classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum, topk_correct, n = 0.0, 0, 0
    for x, y in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = (preprocess or Preprocess()).logits(model, x)
        if logits.shape[1] != num_classes:
            raise ValueError(f"model has {logits.shape[1]} outputs but the data has {num_classes} classes")
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(k, dim=1).indices  # (B, k)
        topk_correct += (top == y[:, None]).any(dim=1).sum().item()
        confusion += torch.bincount(y.cpu() * num_classes + top[:, 0].cpu(), minlength=num_classes**2).view(
            num_classes, num_classes
        )
        n += y.numel()
    if n == 0:
        raise ValueError("no images to evaluate")
    per_class_n = confusion.sum(dim=1)
    correct = confusion.diag()
    return {
        "top1": 100.0 * correct.sum().item() / n,
        "top5": 100.0 * topk_correct / n,
        "loss": loss_sum / n,
        "n": n,
        "per_class": [100.0 * c / t if t else None for c, t in zip(correct.tolist(), per_class_n.tolist())],
        "confusion": confusion.tolist(),
    }


def eval_dataset(
    data: str | Path,
    preprocess: Preprocess,
    model_classes: list[str] | None,
    run_cfg: dict | None = None,
    map_classes: bool = False,
    **kwargs,
) -> tuple[Dataset, list[str]]:
    """The images to evaluate on, with targets in the model's class order: (dataset, class names).

    data: an image folder (its `val/` split when it has one, else every image in it), or a dataset name that
        `convnext.data` knows (`cifar10`, `digits`, ...). A run's own dataset gives the split it held out.
    Classes are matched to the model's by name: a folder with some of the model's classes is scored on those, and
    the images of classes the model lacks are left out (one warning names them). Classes that share no name with
    the model's raise ValueError, unless `map_classes` asks to take them as the model's in sorted order (ImageNet
    wnid folders for a model whose classes are words: the i-th folder class is the model's i-th; same count).
    """
    from convnext.data import ImageFolder, build_dataset

    root = Path(data)
    run_data = (run_cfg or {}).get("data", {})
    same_as_run = run_data.get("name") is not None and str(run_data["name"]) == str(data)
    splits = ("train", "val", "validation", "test")
    if root.is_dir() and not any((root / s).is_dir() for s in splits) and not same_as_run:
        ds = ImageFolder(root, preprocess.transform())
        classes = list(ds.classes)
    else:
        if same_as_run:
            for key in ("val_split", "data_dir"):
                if run_data.get(key) is not None:
                    kwargs.setdefault(key, run_data[key])
        ds, classes = build_dataset(str(data), "val", preprocess.transform(), **kwargs)
    if not model_classes or classes == list(model_classes):
        return ds, list(model_classes or classes)
    model_classes = list(model_classes)
    shared = set(classes) & set(model_classes)
    if not shared:
        if not map_classes:
            raise ValueError(
                f"the classes of {data} share no name with the model's: {_some(classes)} against {_some(model_classes)}"
                "; pass --map-classes to take them as the model's in sorted order"
            )
        if len(classes) != len(model_classes):
            raise ValueError(
                f"--map-classes takes the {len(classes)} classes of {data} as the model's in sorted order, but the "
                f"model has {len(model_classes)}: {_some(classes)} against {_some(model_classes)}"
            )
        log.warning("the classes of %s are taken as the model's in sorted order (--map-classes): %s as %s", data,
                    _some(classes), _some(model_classes))  # fmt: skip
        return ds, model_classes
    index = {c: i for i, c in enumerate(model_classes)}
    table = [index.get(c, -1) for c in classes]  # dataset target -> model target; -1: a class the model lacks
    if left_out := [c for c in classes if c not in index]:
        ds = Subset(ds, [i for i, t in enumerate(ds.targets) if table[t] >= 0])
        log.warning("%d classes of %s are not the model's and were left out: %s", len(left_out), data, _some(left_out))
    return _Remapped(ds, table), model_classes


def _some(names: Sequence[str], shown: int = 5) -> str:
    """'[a, b, c, ... (12)]': the first few names and, when there are more, how many in all."""
    more = f", ... ({len(names)})" if len(names) > shown else ""
    return "[" + ", ".join(names[:shown]) + more + "]"


class _Remapped(Dataset):
    """(x, dataset target) -> (x, model target)."""

    def __init__(self, dataset: Dataset, table: list[int]):
        self.dataset, self.table = dataset, table

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return x, self.table[y]


def run_eval(
    loaded: Resolved,
    data: str | Path,
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    output_dir: str | Path | None = None,
    progress: bool = False,
    ema: nn.Module | None = None,
    map_classes: bool = False,
    **dataset_kwargs,
) -> dict:
    """Evaluate a resolved model (and `ema`, the same source's EMA weights) on an image folder or a named dataset;
    writes metrics.json and confusion.png to output_dir.

    Returns the summary: top1, top5, loss, n, per_class_accuracy ({class: percent}), and "ema" (same keys) when
    `ema` is given, plus "confusion_png" when output_dir is given. `map_classes`: see `eval_dataset`.
    """
    ds, classes = eval_dataset(data, loaded.preprocess, loaded.classes, loaded.run, map_classes, **dataset_kwargs)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, pin_memory=torch.device(device).type == "cuda")
    summary: dict = {"model": loaded.name, "data": str(data), "preprocess": asdict(loaded.preprocess)}
    targets = {"": loaded.model} | ({"ema": ema} if ema is not None else {})
    confusion = None
    for key, model in targets.items():
        r = evaluate(model, loader, len(classes), device, amp_dtype, progress, loaded.preprocess)
        result = {name: r[name] for name in ("top1", "top5", "loss", "n")}
        result["per_class_accuracy"] = dict(zip(classes, r["per_class"]))
        if key:
            summary[key] = result
        else:
            summary |= result
            confusion = r["confusion"]
    if output_dir is not None:
        from convnext.viz import plot_confusion_matrix

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # folder names that are not UTF-8 arrive as surrogate escapes, which the plot's text cannot draw
        shown = [c.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for c in classes]
        png = plot_confusion_matrix(confusion, shown, out / "confusion.png", title=f"{loaded.name} on {data}")
        summary["confusion_png"] = str(png)
        (out / "metrics.json").write_text(json.dumps(summary | {"confusion": confusion}, indent=1) + "\n")
    return summary


# ----------------------------------------------------------------------------------------------- predict


class _ImageFiles(Dataset):
    """Paths -> (tensor or None, error or None): a bad file becomes an error string, never an exception."""

    def __init__(self, paths: Sequence[Path], transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            img = load_image(self.paths[i], first_resize_side(self.transform))
            return i, self.transform(center_crop_aspect(img)), None
        except BadImageError as e:
            return i, None, str(e)
        except Exception as e:  # a transform failing on a strange image is still one file's problem
            return i, None, f"{self.paths[i]}: {type(e).__name__}: {e}"


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]):
    good = [(i, x) for i, x, _ in items if x is not None]
    errors = {i: err for i, _, err in items if err is not None}
    batch = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], batch, errors


@torch.inference_mode()
def predict(
    loaded: Resolved,
    inputs: Iterable[str | Path],
    topk: int = 5,
    batch_size: int = 32,
    workers: int = 0,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Iterator[dict]:
    """Yield {"path", "topk": [{"label", "prob"}, ...]} or {"path", "error"} per image, in input order.

    `inputs` are files and folders (searched recursively for image files, `data.decode.find_images`). Bad files never
    stop the batch.
    """
    from tqdm import tqdm

    paths = find_images(inputs)
    device = torch.device(device)
    loader = DataLoader(
        _ImageFiles(paths, loaded.preprocess.transform()),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
    )
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress)
    for indices, batch, errors in loader:
        results: dict[int, dict] = {i: {"path": str(paths[i]), "error": err} for i, err in errors.items()}
        if batch is not None:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = loaded.preprocess.logits(loaded.model, batch.to(device))
            probs = logits.softmax(dim=1)
            p, idx = probs.topk(min(topk, probs.shape[1]), dim=1)
            for row, i in enumerate(indices):
                top = [{"label": loaded.label(c), "prob": v} for c, v in zip(idx[row].tolist(), p[row].tolist())]
                results[i] = {"path": str(paths[i]), "topk": top}
        bar.update(len(results))
        yield from (results[i] for i in sorted(results))
    bar.close()
