"""Evaluate and predict a model `convnext.resolve` gave (any name, weight file, run or Hub repo), reading images
robustly.

- `load_image` (from `convnext.data.decode`, the decoder training reads with too) turns any image file into an
  8-bit RGB picture or raises `BadImageError` naming the file.
- `evaluate` returns top-1/top-5 (percent), mean loss, per-class accuracy, the confusion matrix and each image's
  prediction; `run_eval` adds the report (`convnext.report_eval`: F1, balanced accuracy, ECE, figures).
- `predict` yields one dict per image, in input order, with the top-k labels or the reason it failed, and on
  request its pooled features (`convnext.features` writes them) and a class activation map (`convnext.cam`).
- `--tta` everywhere is `with_tta`: the run's test-time views (`data.tta_logits`) with the mirror added.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from convnext.data.decode import BadImageError, find_images, load_image
from convnext.data.transforms import first_resize_side
from convnext.features import linear_probe as linear_probe  # re-exported: convnext.infer.linear_probe
from convnext.resolve import Preprocess, Resolved
from convnext.scores import confusion

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
    without_tta: bool = False,
) -> dict:
    """Score a classifier on (images, targets) batches (logits through `preprocess.logits`: averaged over the
    test-time views when it has tta_flip / tta_shift).

    Returns {"top1", "top5" (percent; top-k with k = min(5, classes)), "loss" (mean cross-entropy), "n",
    "per_class" (accuracy in percent, None for a class with no images), "confusion" (rows = true class), and per
    image in loader order "targets", "preds" (top-1) and "confidence" (its softmax probability) as numpy arrays};
    with `without_tta` also "top1_without_tta": the plain view's top-1, from the same pass.
    """
    from tqdm import tqdm

    device = torch.device(device)
    preprocess = preprocess or Preprocess()
    model.eval()
    k = min(5, num_classes)
    targets, preds, confidence = [], [], []
    loss_sum, topk_correct, plain_correct = 0.0, 0, 0
    for x, y in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = preprocess.logits(model, x)
            if without_tta:
                plain_correct += (model(x).argmax(dim=1) == y).sum().item()
        if logits.shape[1] != num_classes:
            raise ValueError(f"model has {logits.shape[1]} outputs but the data has {num_classes} classes")
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        topk_correct += (logits.topk(k, dim=1).indices == y[:, None]).any(dim=1).sum().item()
        conf, top = logits.softmax(dim=1).max(dim=1)
        targets.append(y.cpu())
        preds.append(top.cpu())
        confidence.append(conf.cpu())
    if not targets:
        raise ValueError("no images to evaluate")
    t, p = torch.cat(targets).numpy(), torch.cat(preds).numpy()
    cm = confusion(t, p, num_classes)
    n = len(t)
    out = {
        "top1": 100.0 * float(np.trace(cm)) / n,
        "top5": 100.0 * topk_correct / n,
        "loss": loss_sum / n,
        "n": n,
        "per_class": [100.0 * c / r if r else None for c, r in zip(np.diag(cm).tolist(), cm.sum(1).tolist())],
        "confusion": cm.tolist(),
        "targets": t,
        "preds": p,
        "confidence": torch.cat(confidence).numpy(),
    }
    return out | ({"top1_without_tta": 100.0 * plain_correct / n} if without_tta else {})


def with_tta(preprocess: Preprocess) -> Preprocess:
    """`--tta`: the views of `data.tta_logits`, flipped too; the shifts stay those of the run's recipe (its
    data.tta_shift) so a run is scored with the views it was trained to be scored with."""
    return replace(preprocess, tta_flip=True)


def tta_views(preprocess: Preprocess) -> int:
    """How many views `preprocess.logits` averages: 1, 2 (flip), 3 (shifts) or 6 (both)."""
    return (3 if preprocess.tta_shift > 0 else 1) * (2 if preprocess.tta_flip else 1)


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
    tta: bool = False,
    pairs: int = 5,
    **dataset_kwargs,
) -> dict:
    """Evaluate a resolved model (and `ema`, the same source's EMA weights) on an image folder or a named dataset;
    writes the report (metrics.json and PNGs, `report_eval.write_report`) to output_dir.

    Returns the summary: top1, top5, loss, n, per_class_accuracy ({class: percent}), macro_f1, weighted_f1,
    balanced_accuracy, ece (fractions), per_class ({class: {precision, recall, f1, support}}), and "ema" (the same
    top-1/top-5/loss/accuracy keys) when `ema` is given, plus the PNG paths when output_dir is given.
    `tta`: score with `with_tta(preprocess)` and add "tta" {views, top1_without, gain}. `pairs`: how many most
    confused pairs the report shows. `map_classes`: see `eval_dataset`.
    """
    from convnext.report_eval import report_numbers, write_report

    ds, classes = eval_dataset(data, loaded.preprocess, loaded.classes, loaded.run, map_classes, **dataset_kwargs)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, pin_memory=torch.device(device).type == "cuda")
    pre = with_tta(loaded.preprocess) if tta else loaded.preprocess
    summary: dict = {"model": loaded.name, "data": str(data), "preprocess": asdict(pre)}
    targets = {"": loaded.model} | ({"ema": ema} if ema is not None else {})
    report: dict = {}
    for key, model in targets.items():
        r = evaluate(model, loader, len(classes), device, amp_dtype, progress, pre, without_tta=tta)
        result = {name: r[name] for name in ("top1", "top5", "loss", "n")}
        result["per_class_accuracy"] = dict(zip(classes, r["per_class"]))
        if tta:
            gain = r["top1"] - r["top1_without_tta"]
            result["tta"] = {"views": tta_views(pre), "top1_without": r["top1_without_tta"], "gain": gain}
        if key:
            summary[key] = result
            continue
        report = report_numbers(r["targets"], r["preds"], r["confidence"], classes, pairs)
        summary |= result | {k: report[k] for k in ("macro_f1", "weighted_f1", "balanced_accuracy", "ece", "per_class")}
        _name_examples(report["most_confused"], ds)
    if output_dir is not None:
        out = Path(output_dir)
        pngs = write_report(out, report, classes, lambda i: _picture(ds, i, pre), f"{loaded.name} on {data}")
        summary |= pngs
        metrics = summary | {k: report[k] for k in ("confusion", "reliability", "most_confused")}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return summary


def _picture(ds: Dataset, i: int, pre: Preprocess) -> np.ndarray:
    """The i-th evaluated image as the model saw it (resized, cropped): uint8 (H, W, 3)."""
    from convnext.cam import to_image

    return to_image(ds[i][0], pre.mean, pre.std)


def _name_examples(pairs: list[dict], ds: Dataset) -> None:
    """Add "files" (the image files of each pair's examples) where the dataset knows them (an image folder)."""
    for pair in pairs:
        files = [_file_of(ds, i) for i in pair["examples"]]
        if all(files):
            pair["files"] = files


def _file_of(ds: Dataset, i: int) -> str | None:
    """The file behind item i of an image folder, through the Subset / class-remapping wrappers; else None."""
    while True:
        if isinstance(ds, Subset):
            ds, i = ds.dataset, ds.indices[i]
        elif isinstance(ds, _Remapped):
            ds = ds.dataset
        else:
            samples = getattr(ds, "samples", None)
            return str(samples[i][0]) if isinstance(samples, list) and i < len(samples) else None


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


@dataclass(frozen=True)
class CamRequest:
    """`predict --cam`: overlays into `folder`, for output `class_index` (None: each image's top class)."""

    folder: Path
    class_index: int | None = None
    method: str = "gradcam"  # gradcam | gradcam++


def predict(
    loaded: Resolved,
    inputs: Iterable[str | Path],
    topk: int = 5,
    batch_size: int = 32,
    workers: int = 0,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    tta: bool = False,
    features: bool = False,
    cam: CamRequest | None = None,
) -> Iterator[dict]:
    """Yield {"path", "topk": [{"label", "prob"}, ...]} or {"path", "error"} per image, in input order.

    `inputs` are files and folders (searched recursively for image files, `data.decode.find_images`). Bad files never
    stop the batch. `tta`: probabilities from `with_tta(preprocess)`. `features`: add "features", the pooled, normed
    features (`forward_head(pre_logits=True)`, float32 numpy (C,); averaged over the same views as the logits).
    `cam`: add "cam", the path of the class activation map overlay written for the image (on the plain view).
    """
    from tqdm import tqdm

    paths = find_images(inputs)
    device = torch.device(device)
    pre = with_tta(loaded.preprocess) if tta else loaded.preprocess
    loader = DataLoader(_ImageFiles(paths, pre.transform()), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate)  # fmt: skip
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress)
    for indices, batch, errors in loader:
        results: dict[int, dict] = {i: {"path": str(paths[i]), "error": err} for i, err in errors.items()}
        if batch is not None:
            batch = batch.to(device)
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits, pooled = _outputs(loaded.model, pre, batch, features)
            probs = logits.softmax(dim=1)
            p, idx = probs.topk(min(topk, probs.shape[1]), dim=1)
            for row, i in enumerate(indices):
                top = [{"label": loaded.label(c), "prob": v} for c, v in zip(idx[row].tolist(), p[row].tolist())]
                results[i] = {"path": str(paths[i]), "topk": top}
                if pooled is not None:
                    results[i]["features"] = pooled[row].cpu().numpy()
            if cam is not None:
                _write_cams(loaded, pre, batch, [paths[i] for i in indices], indices, cam, results)
        bar.update(len(results))
        yield from (results[i] for i in sorted(results))
    bar.close()


def _outputs(model: nn.Module, pre: Preprocess, x: torch.Tensor, features: bool):
    """(logits, pooled features or None) of a batch, both averaged over the preprocessing's test-time views, from
    one pass through the backbone."""
    if not features:
        return pre.logits(model, x), None

    pooled_width = []

    def both(v: torch.Tensor) -> torch.Tensor:
        fmap = model.forward_features(v)
        pooled = model.forward_head(fmap, pre_logits=True)  # (B, C)
        pooled_width[:] = [pooled.shape[1]]
        return torch.cat([model.forward_head(fmap), pooled], dim=1)

    out = pre.logits(both, x)
    width = out.shape[1] - pooled_width[0]
    return out[:, :width], out[:, width:]


def _write_cams(loaded: Resolved, pre: Preprocess, batch: torch.Tensor, files: list[Path], indices: list[int],
                request: CamRequest, results: dict[int, dict]) -> None:  # fmt: skip
    """Write the CAM overlay of each image of the batch and add its path to the image's result."""
    from convnext.cam import grad_cam, save_overlay, to_image

    wanted = None if request.class_index is None else torch.full((len(files),), request.class_index)
    maps, used = grad_cam(loaded.model, batch, wanted, request.method)
    for row, (i, file) in enumerate(zip(indices, files)):
        label = "".join(c if c.isalnum() or c in "-_" else "_" for c in loaded.label(int(used[row])))
        path = request.folder / f"{i:05d}-{file.stem}-{label}.png"
        save_overlay(path, to_image(batch[row], pre.mean, pre.std), maps[row])
        results[i] |= {"cam": str(path), "cam_class": loaded.label(int(used[row]))}


def class_index(loaded: Resolved, name: str, flag: str = "--cam-class") -> int:
    """The output index of class `name` (a class name, or an index where the model's classes are unknown)."""
    if loaded.classes:
        if name in loaded.classes:
            return loaded.classes.index(name)
        raise ValueError(
            f"{flag}: {name!r} is not one of the model's {len(loaded.classes)} classes {_some(loaded.classes)}"
        )
    n = int(getattr(loaded.model, "num_classes", 0) or 0)
    if name.isdigit() and int(name) < n:
        return int(name)
    raise ValueError(f"{flag}: the model's classes have no names; give an output index in [0, {n})")
