"""Evaluate and predict: load a model (registered name, checkpoint or training run), read images robustly, score.

- `load_model` resolves what a user names into a model plus the preprocessing and class names it was trained with.
- `load_image` (from `convnext.data.decode`, the decoder training reads with too) turns any image file into an
  8-bit RGB picture or raises `BadImageError` naming the file.
- `evaluate` returns top-1/top-5 (percent), mean loss, per-class accuracy and the confusion matrix.
- `predict` yields one dict per image, in input order, with the top-k labels or the reason it failed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from convnext.data.decode import BadImageError, load_image
from convnext.data.decode import to_rgb as to_rgb  # re-exported: convnext.infer.to_rgb predates the shared decoder
from convnext.data.transforms import first_resize_side
from convnext.weights.specs import IMAGENET_MEAN, IMAGENET_STD, WeightSpec

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


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


def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given (whatever their extension) and, for each directory, its image files recursively, sorted."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS))
        else:
            paths.append(p)  # a missing file becomes a per-file error in predict, not a crash
    return paths


# ----------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing: resize the shorter side (`crop_mode` "squash": both sides) to img_size / crop_pct with
    `interpolation`, center-crop img_size, normalise; with `tta_flip` / `tta_shift` (a run trained with
    data.tta_flip / tta_shift) the logits are the mean over the test-time views (`data.tta_logits`)."""

    img_size: int = 224
    crop_pct: float = 0.875
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    tta_flip: bool = False
    tta_shift: int = 0
    interpolation: str = "bicubic"  # bicubic | bilinear | nearest
    crop_mode: str = "center"  # center | squash

    @classmethod
    def from_spec(cls, spec: WeightSpec, img_size: int | None = None) -> Preprocess:
        """The eval preprocessing of published weights: at the spec's test size and test crop where it has them
        (timm's `use_test_size`, its validate.py default), else at its input size; `img_size` (the user's) instead
        keeps the crop that goes with that size."""
        size = img_size or spec.test_input_size or spec.input_size
        crop = spec.test_crop_pct if size == spec.test_input_size and spec.test_crop_pct else spec.crop_pct
        return cls(size, crop, tuple(spec.mean), tuple(spec.std), interpolation=spec.interpolation,
                   crop_mode=spec.crop_mode)  # fmt: skip

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The model's float32 logits for a preprocessed batch, averaged over the test-time views."""
        from convnext.data import tta_logits

        return tta_logits(model, x, self.tta_flip, self.tta_shift)

    def transform(self):
        """The torchvision transforms.v2 pipeline: PIL RGB image -> normalised float tensor (3, S, S)."""
        from convnext.data import eval_transform

        return eval_transform(self.img_size, self.crop_pct, self.mean, self.std, self.interpolation, self.crop_mode)


@dataclass
class LoadedModel:
    """A model ready for inference, with what it needs around it."""

    model: nn.Module
    preprocess: Preprocess
    classes: list[str] | None  # label of each output index; None = unknown (indices are printed)
    name: str
    ema: nn.Module | None = None  # the run's EMA weights, when asked for and present
    run_dir: Path | None = None
    extra: dict = field(default_factory=dict)

    def label(self, index: int) -> str:
        return self.classes[index] if self.classes and index < len(self.classes) else str(index)


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names, offline, from torchvision's weight metadata."""
    from torchvision.models import ConvNeXt_Tiny_Weights

    return list(ConvNeXt_Tiny_Weights.IMAGENET1K_V1.meta["categories"])


def is_run_dir(path: str | Path | None) -> bool:
    return path is not None and Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _is_run_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return p.is_file() and p.stem in ("best", "last") and is_run_dir(p.parent)


def load_model(
    model: str | None,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    ema: bool = False,
    img_size: int | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Resolve a model the way every command takes one.

    model: a registered name (`convnext_tiny`, `convnext_tiny.fb_in1k`), a training run folder (has config.json),
        a run's `best.pt` / `last.pt`, or a Hub repo `hf-hub:org/name[@revision]` (its weights and preprocessing).
    checkpoint: a weight file in any layout `convnext.weights` reads, or a run folder or run checkpoint (then
        `model` may be None).
    pretrained: load the published weights of the name's tag (or the architecture's default tag); a name with a
        tag loads its weights anyway unless a checkpoint is given.
    ema: also load the run's EMA weights into `LoadedModel.ema` (runs only; ignored when the run has none).
    img_size: evaluate at this size instead of the one the weights or run were made for (published weights: their
        test size where the spec has one, as timm measures them, else their input size).
    """
    run_file = next((Path(p) for p in (model, checkpoint) if p and _is_run_checkpoint(p)), None)
    if is_run_dir(model) or (model is None and is_run_dir(checkpoint)):
        loaded = _load_run(Path(model if is_run_dir(model) else checkpoint), ema)
    elif run_file is not None and (model is None or run_file == Path(model)):  # runs/x/last.pt
        loaded = _load_run(run_file.parent, ema, which=run_file.stem)
    elif isinstance(model, str) and model.startswith("hf-hub:"):  # a Hugging Face Hub repo (weights/hf.py)
        loaded = _load_hub(model, checkpoint)
    elif model is None:
        hint = " (a run folder needs config.json)" if checkpoint and Path(checkpoint).is_dir() else ""
        raise ValueError(f"name the model architecture for checkpoint {checkpoint}{hint}, e.g. `convnext_tiny`")
    elif Path(model).exists() and not is_run_dir(model):
        raise ValueError(
            f"{model} is a file or a folder without config.json; pass a registered name and `--checkpoint {model}`"
        )
    else:
        loaded = _load_named(model, checkpoint, pretrained, img_size)
    if img_size is not None:
        loaded.preprocess = replace(loaded.preprocess, img_size=img_size)
    for what, net in (("", loaded.model), ("EMA ", loaded.ema)):
        bad = next((k for k, v in (net.state_dict() if net is not None else {}).items()
                    if v.is_floating_point() and not torch.isfinite(v).all()), None)  # fmt: skip
        if bad is not None:
            raise ValueError(
                f"{checkpoint or model}: {what}weight {bad} holds NaN or infinite values, so every prediction "
                "would be NaN (weights of a run that diverged?)"
            )
    loaded.model.to(device).eval()
    if loaded.ema is not None:
        loaded.ema.to(device).eval()
    return loaded


def _load_named(name: str, checkpoint: str | Path | None, pretrained: bool, img_size: int | None = None) -> LoadedModel:
    from convnext.registry import create_model, split_name

    arch, tag = split_name(name)
    pretrained = pretrained or (tag is not None and checkpoint is None)  # `convnext_tiny.fb_in1k` means its weights
    if checkpoint is not None:  # build the model the checkpoint was made for, then load it
        from convnext.weights import load_checkpoint, read_state_dict

        sd = read_state_dict(checkpoint)
        model = create_model(name, **_checkpoint_shape(sd))
        load_checkpoint(model, sd)
    else:
        model = create_model(name, pretrained=pretrained)
    preprocess = Preprocess()
    if pretrained or tag:
        from convnext.weights import resolve_spec

        preprocess = Preprocess.from_spec(resolve_spec(arch, tag), img_size)  # its interpolation, test size, crop
    classes = imagenet_classes() if getattr(model, "num_classes", None) == 1000 else None
    extra = {} if (checkpoint or pretrained) else {"random_init": True}
    return LoadedModel(model, preprocess, classes, name, extra=extra)


def _load_hub(name: str, checkpoint: str | Path | None) -> LoadedModel:
    """A Hub repo's model with its preprocessing and class names (its weights, or `checkpoint`'s)."""
    from convnext.weights import load_checkpoint
    from convnext.weights.hf import build, resolve_hub

    hub = resolve_hub(name, weights=checkpoint is None)
    model = build(hub, pretrained=checkpoint is None)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    pp = hub.preprocess
    preprocess = Preprocess(int(pp["img_size"]), float(pp["crop_pct"]), tuple(pp["mean"]), tuple(pp["std"]),
                            interpolation=pp["interpolation"], crop_mode=pp["crop_mode"])  # fmt: skip
    classes = hub.classes or (imagenet_classes() if model.num_classes == 1000 else None)
    return LoadedModel(model, preprocess, classes, name)


def _checkpoint_shape(sd: dict[str, torch.Tensor]) -> dict:
    """{num_classes, in_chans} of a ConvNeXt state dict in any layout, so an inference model gets its own head
    rather than a fresh one (`load_checkpoint` drops a head of another size, which suits fine-tuning only)."""
    from convnext.weights import detect_layout, to_ours

    try:
        sd = to_ours(sd, detect_layout(sd))
    except ValueError:
        return {}  # not a ConvNeXt layout (e.g. a roadmap step): load_checkpoint decides
    out = {}
    if "head.weight" in sd:
        out["num_classes"] = int(sd["head.weight"].shape[0])
    elif "norm.weight" in sd:
        out["num_classes"] = 0  # a backbone without a head
    if "stem.0.weight" in sd:
        out["in_chans"] = int(sd["stem.0.weight"].shape[1])
    return out


def _load_run(run_dir: Path, with_ema: bool, which: str = "best") -> LoadedModel:
    from convnext.train.runs import load_run

    model, cfg = load_run(run_dir, which=which, ema=False)
    ema_model = load_run(run_dir, which=which, ema=True)[0] if with_ema and cfg.get("ema") else None
    data = cfg.get("data", {})
    preprocess = Preprocess(
        int(data.get("img_size", 224)),
        float(data.get("crop_pct", 0.875)),
        tuple(data.get("mean") or IMAGENET_MEAN),
        tuple(data.get("std") or IMAGENET_STD),
        bool(data.get("tta_flip", False)),
        int(data.get("tta_shift", 0)),
        str(data.get("interpolation") or "bicubic"),  # runs older than data.interpolation evaluated bicubic
    )
    classes = data.get("classes") or None
    name = cfg.get("model", {}).get("name", run_dir.name)
    return LoadedModel(model, preprocess, classes, str(name), ema_model, run_dir, cfg)


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
    data: str | Path, preprocess: Preprocess, model_classes: list[str] | None, run_cfg: dict | None = None, **kwargs
) -> tuple[Dataset, list[str]]:
    """The images to evaluate on, with targets in the model's class order: (dataset, class names).

    data: an image folder (its `val/` split when it has one, else every image in it), or a dataset name that
        `convnext.data` knows (`cifar10`, `digits`, ...). A run's own dataset gives the split it held out.
    Classes are matched to the model's by name; if the names differ but the counts agree (e.g. ImageNet wnid
    folders for a model whose classes are words), by sorted order.
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
    if set(classes) <= set(model_classes):
        index = {c: i for i, c in enumerate(model_classes)}
        return _Remapped(ds, [index[c] for c in classes]), list(model_classes)
    if len(classes) == len(model_classes):
        log.warning("class names of %s differ from the model's; matching them in sorted order", data)
        return ds, list(model_classes)
    raise ValueError(
        f"{data} has {len(classes)} classes ({', '.join(classes[:5])}, ...) that do not match the model's "
        f"{len(model_classes)} ({', '.join(model_classes[:5])}, ...)"
    )


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
    loaded: LoadedModel,
    data: str | Path,
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    output_dir: str | Path | None = None,
    progress: bool = False,
    **dataset_kwargs,
) -> dict:
    """Evaluate a loaded model (and its EMA) on an image folder; writes metrics.json and confusion.png to output_dir.

    Returns the summary: top1, top5, loss, n, per_class_accuracy ({class: percent}), and "ema" (same keys) when
    the run has EMA weights, plus "confusion_png" when output_dir is given.
    """
    ds, classes = eval_dataset(data, loaded.preprocess, loaded.classes, loaded.extra, **dataset_kwargs)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, pin_memory=torch.device(device).type == "cuda")
    summary: dict = {"model": loaded.name, "data": str(data), "preprocess": asdict(loaded.preprocess)}
    targets = {"": loaded.model} | ({"ema": loaded.ema} if loaded.ema is not None else {})
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
    loaded: LoadedModel,
    inputs: Iterable[str | Path],
    topk: int = 5,
    batch_size: int = 32,
    workers: int = 0,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Iterator[dict]:
    """Yield {"path", "topk": [{"label", "prob"}, ...]} or {"path", "error"} per image, in input order.

    `inputs` are files and folders (searched recursively for image files). Bad files never stop the batch.
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
