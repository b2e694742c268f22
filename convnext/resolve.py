"""One resolver: whatever a command is given as its model -> the model, its preprocessing, its classes, provenance.

`resolve` is the only place a name becomes a model, so the same input means the same thing in eval, predict,
export, bench, convert, push and the dense backbone:

  registered name     `convnext_tiny`: random weights (`pretrained=True`: its default published ones)
  arch.tag            `convnext_tiny.fb_in1k`: the published weights, through the download cache
  weight file         .pth / .pt / .bin / .safetensors in any layout `convnext.weights` reads (official, timm,
                      torchvision, HF, ours, FCMAE); the architecture is `model` if given, else read off its shapes
  classification run  a `convnext train` folder (config.json + best.pt / last.pt), or its best.pt / last.pt
  pre-training run    a `convnext pretrain` folder (config.json with an `fcmae` section + last.pt): the encoder
  Hub repo            `hf-hub:org/name[@revision]`: its weights, preprocessing and class names
  pretrained folder   config.json + model.safetensors (or pytorch_model.bin): ours, transformers', timm's
  ONNX file           a `convnext export --format onnx` .onnx: run by onnxruntime (`OnnxModel`, inference only),
                      with the preprocessing and class names its metadata holds

A run folder is read as plain data (config.json as a dict, the checkpoint with `weights_only=True`): nothing here
imports the training code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convnext.constants import IMAGENET_MEAN, IMAGENET_STD, imagenet_classes
from convnext.data import eval_transform, tta_logits
from convnext.engine import checkpoint
from convnext.engine.ema import ema_weights
from convnext.model import ConvNeXtConfig
from convnext.onnx_model import OnnxModel
from convnext.registry import build_convnext, create_model, split_name
from convnext.weights import WeightSpec, detect_layout, load_checkpoint, read_state_dict, resolve_spec, to_ours
from convnext.weights.hf import WEIGHT_FILES, HubModel, arch_of, is_hub_name, read_folder, resolve_hub
from convnext.weights.layouts import shape_config

CHECKPOINTS = ("best", "last")  # a classification run's checkpoints, <name>.pt
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


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
        return tta_logits(model, x, self.tta_flip, self.tta_shift)

    def transform(self):
        """The torchvision transforms.v2 pipeline: PIL RGB image -> normalised float tensor (3, S, S)."""
        return eval_transform(self.img_size, self.crop_pct, self.mean, self.std, self.interpolation, self.crop_mode)


@dataclass(frozen=True)
class Resolved:
    """A model ready for inference (eval mode, on the CPU) with what it needs around it."""

    model: nn.Module
    preprocess: Preprocess
    classes: list[str] | None  # label of each output index; None = unknown (indices are printed)
    provenance: str  # what was loaded from where, in words
    name: str  # what to call it: the registered or Hub name, or the run's model
    arch: str | None = None  # the registered architecture, when known
    run: dict[str, Any] | None = None  # a run's config.json, as plain data
    run_dir: Path | None = None
    random: bool = False  # random weights: a registered name without weights

    def label(self, index: int) -> str:
        return self.classes[index] if self.classes and index < len(self.classes) else str(index)


def is_run_dir(path: str | Path | None) -> bool:
    """A folder `convnext train` or `convnext pretrain` wrote: config.json and a checkpoint (best.pt or last.pt)."""
    p = Path(path) if path is not None else None
    return p is not None and (p / "config.json").is_file() and any((p / f"{w}.pt").is_file() for w in CHECKPOINTS)


def is_pretrain_run(path: str | Path) -> bool:
    """A folder `convnext pretrain` wrote (its config.json has an `fcmae` section)."""
    cfg = Path(path) / "config.json"
    try:
        return cfg.is_file() and "fcmae" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def resolve(
    source: str | Path,
    *,
    model: str | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
    ema: bool = False,
    which: str = "best",
    img_size: int | None = None,
    **options: Any,
) -> Resolved:
    """The model `source` names (any kind in the module's docstring), in eval mode on the CPU, with its eval
    preprocessing, class names and provenance.

    model: read `source` as weights (a file, a pretrained folder, an `hf-hub:` repo, a run's checkpoint file) and
        load them into this registered name (built with the weights' classes, input channels and stem stride;
        `arch.tag` also gives the tag's preprocessing) or Hub repo's model.
    pretrained: a registered name without a tag loads its default published weights.
    num_classes: a head of this many outputs; a head of another size in the weights is dropped (fine-tuning, a
        dense backbone). Default: the source's own head (a pre-training run's encoder: none).
    ema: the EMA weights (a run's, or a weight file's EMA entry).
    which: a run folder's "best" checkpoint (last.pt when there is none) or "last"; a checkpoint file says itself.
    img_size: evaluate at this size. Published weights otherwise evaluate at their test size with their test crop
        where the spec has one (as timm's validate.py does), else at their input size; a user's size keeps the crop
        that goes with it.
    options: model options the weights leave free (`drop_path_rate=0.1`, `drop_rate`, a builder's kwargs), over
        the source's own; an option the model does not take raises `UnknownOptionError`.
    Raises ValueError for weights holding NaN or infinite values (every prediction would be NaN).
    """
    if which not in CHECKPOINTS:
        raise ValueError(f"which must be one of {CHECKPOINTS}, not {which!r}")
    options = options | ({} if num_classes is None else {"num_classes": num_classes})
    path = Path(source)
    checkpoint_of_run = path.is_file() and path.stem in CHECKPOINTS and is_run_dir(path.parent)
    run_dir = path if is_run_dir(path) else path.parent if checkpoint_of_run else None
    if path.suffix == ".onnx" and path.is_file():
        out = _onnx(path, model, options, ema)
    elif model is not None:
        if run_dir is not None and not checkpoint_of_run:
            raise ValueError(f"{source} is a training run: it names its own model; give it without {model!r}")
        out = _weights(str(source), model, options, ema, img_size)
    elif is_hub_name(str(source)):
        out = _pretrained_folder(resolve_hub(str(source)), options, ema)
    elif run_dir is not None and is_pretrain_run(run_dir):
        out = _pretrain_run(run_dir, options, ema)
    elif run_dir is not None:
        out = _run(run_dir, path.stem if checkpoint_of_run else which, options, ema)
    elif path.is_dir() and (path / "config.json").is_file():
        if not any((path / f).is_file() for f in WEIGHT_FILES):
            raise ValueError(f"{path}: holds config.json but no checkpoint ({', '.join(f'{w}.pt' for w in CHECKPOINTS)}"
                             f") nor weights ({', '.join(WEIGHT_FILES)})")  # fmt: skip
        out = _pretrained_folder(read_folder(path), options, ema)
    elif path.is_dir() and not any((path / f).is_file() for f in WEIGHT_FILES):
        raise FileNotFoundError(f"{path}: not a run folder (config.json + best.pt or last.pt), a pretrained folder "
                                f"(config.json + {' or '.join(WEIGHT_FILES)}) nor a folder of weights")  # fmt: skip
    elif path.exists():
        out = _weights(str(source), None, options, ema, img_size)
    elif "/" in str(source) or path.suffix in (*WEIGHT_SUFFIXES, ".onnx"):
        raise FileNotFoundError(f"{source}: no such file or folder")
    else:  # a registered name (an unknown one: the registry's KeyError, with the names it is close to)
        out = _named(str(source), pretrained, options, img_size)
    if img_size is not None:
        if isinstance(out.model, OnnxModel) and not out.model.metadata.get("dynamic_size"):
            if img_size != out.preprocess.img_size:
                raise ValueError(f"{source} takes {out.preprocess.img_size} px only, not {img_size} (export it "
                                 "with --dynamic-size to run it at other sizes)")  # fmt: skip
        out = replace(out, preprocess=replace(out.preprocess, img_size=img_size))
    if not out.random:
        _check_finite(out.model, f"{source}: {'EMA ' if ema else ''}weight")
    out.model.cpu().eval()
    return out


def _named(name: str, pretrained: bool, options: dict[str, Any], img_size: int | None) -> Resolved:
    """A registered name: random weights, or the published ones of its tag (or of the default tag)."""
    arch, tag = split_name(name)
    pretrained = pretrained or tag is not None  # `convnext_tiny.fb_in1k` means its weights
    net = create_model(name, pretrained=pretrained, **options)
    if not pretrained:
        return Resolved(net, Preprocess(), _classes(net), f"{name}: random weights", name, arch, random=True)
    spec = resolve_spec(arch, tag)
    where = f"{spec.name}: the published weights ({spec.url}, through the download cache)"
    return Resolved(net, Preprocess.from_spec(spec, img_size), _classes(net), where, name, arch)


def _weights(source: str, model: str | None, options: dict[str, Any], ema: bool, img_size: int | None) -> Resolved:
    """A weight file (or folder, or Hub repo read as weights) into `model`, or into the ConvNeXt its shapes say."""
    sd = read_state_dict(source, ema=ema)
    try:
        layout = detect_layout(sd)
        shape = shape_config(to_ours(sd, layout))
    except ValueError:  # not a ConvNeXt layout (e.g. a roadmap step): load_checkpoint decides
        layout, shape = "its own", {}
    pre, hub, arch = Preprocess(), None, None
    if model is None:
        if "depths" not in shape:
            raise ValueError(f"{source}: its tensors describe no ConvNeXt (no stem.0.weight or stages.*.blocks.*); "
                             "name the model it loads into")  # fmt: skip
        net = build_convnext(ConvNeXtConfig(), **shape | options)
        name = arch = arch_of(net.cfg)
    elif is_hub_name(model):
        hub = resolve_hub(model, weights=False)
        net, name, arch = build_convnext(hub.config, **options), model, hub.arch or arch_of(hub.config)
        pre = _hub_preprocess(hub)
    else:
        arch, tag = split_name(model)
        given = {k: shape[k] for k in ("num_classes", "in_chans", "patch_size") if k in shape}  # its head and stem
        net, name = create_model(model, **given | options), model
        if tag:
            pre = Preprocess.from_spec(resolve_spec(arch, tag), img_size)
    load_checkpoint(net, sd, name=source)
    where = f"{source} ({layout} layout{', EMA' if ema else ''}) loaded into {name or 'a ConvNeXt'}"
    return Resolved(net, pre, _classes(net, hub.classes if hub else None), where, name or Path(source).name, arch)


def _pretrained_folder(hub: HubModel, options: dict[str, Any], ema: bool) -> Resolved:
    """A Hub repo or a local folder of the same files: the model its config.json describes, with its weights."""
    net = build_convnext(hub.config, **options)
    load_checkpoint(net, hub.weights, ema=ema)
    where = f"{hub.name} ({hub.form} config): {hub.weights}"
    return Resolved(net, _hub_preprocess(hub), _classes(net, hub.classes), where, hub.name,
                    hub.arch or arch_of(hub.config))  # fmt: skip


def _run(run_dir: Path, which: str, options: dict[str, Any], ema: bool) -> Resolved:
    """A classification run: the model its config.json builds, with the checkpoint's (or its EMA's) weights."""
    cfg = _read_config(run_dir)
    path = run_dir / f"{which}.pt"
    if which == "best" and not path.is_file():
        path = run_dir / "last.pt"
    state = checkpoint.load(path)
    weights = state["model"]
    if ema:
        if state.get("ema") is None:
            raise ValueError(f"{path} holds no EMA weights (the run had ema=false)")
        weights = ema_weights(state["ema"])
    classes = list(cfg.get("data", {}).get("classes") or [])
    if not classes:
        raise ValueError(f"{run_dir}: config.json lists no classes (data.classes): not a finished classification run")
    n = options.get("num_classes", len(classes))
    net, name, arch = _run_model(cfg, options | {"num_classes": n})
    if n == len(classes):
        checkpoint.check_compatible(net, weights, f"checkpoint {path}")
        net.load_state_dict(weights)
    else:  # another head: the run's is dropped
        load_checkpoint(net, weights, name=str(path))
        classes = None
    data = cfg.get("data", {})
    pre = Preprocess(
        int(data.get("img_size") or 224),
        float(data.get("crop_pct") or 0.875),
        tuple(data.get("mean") or IMAGENET_MEAN),
        tuple(data.get("std") or IMAGENET_STD),
        bool(data.get("tta_flip", False)),
        int(data.get("tta_shift", 0)),
        str(data.get("interpolation") or "bicubic"),  # runs older than data.interpolation evaluated bicubic
    )
    where = f"run {run_dir}: {path.name}{' (EMA)' if ema else ''}"
    return Resolved(net, pre, classes, where, name, arch, cfg, run_dir)


def _pretrain_run(run_dir: Path, options: dict[str, Any], ema: bool) -> Resolved:
    """A pre-training run's encoder (its last.pt; the decoder is dropped): without `num_classes` no head and no
    final norm, as it was pre-trained (FCMAE never pools, so that norm never learnt anything)."""
    if ema:
        raise ValueError(f"{run_dir}: a pre-training run keeps no EMA weights")
    cfg = _read_config(run_dir)
    path = run_dir / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no weights yet ({path.name} is missing)")
    net, name, arch = _run_model(cfg, {"num_classes": 0} | options)
    if not net.num_classes:
        net.norm = nn.Identity()
    load_checkpoint(net, path)
    data = cfg.get("data", {})
    pre = Preprocess(int(data.get("img_size") or 224), mean=tuple(data.get("mean") or IMAGENET_MEAN),
                     std=tuple(data.get("std") or IMAGENET_STD))  # fmt: skip
    return Resolved(net, pre, None, f"pre-training run {run_dir}: the encoder of {path.name}", name, arch, cfg, run_dir)


def _onnx(path: Path, model: str | None, options: dict[str, Any], ema: bool) -> Resolved:
    """An .onnx file `convnext export` wrote: onnxruntime runs it; its metadata gives the preprocessing and classes."""
    if model is not None or options or ema:
        given = [f"model={model!r}"] * (model is not None) + [f"{k}=" for k in options] + ["ema"] * ema
        raise ValueError(f"{path}: an ONNX file is a fixed model; it takes no {', '.join(given)}")
    net = OnnxModel(path)
    meta = net.metadata
    known = {f.name for f in fields(Preprocess)}
    pre = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta.items() if k in known})
    classes = meta["classes"] if meta["classes"] and len(meta["classes"]) == net.num_classes else None
    where = f"{path}: ONNX run by onnxruntime" + (
        f" (exported from {meta['provenance']})" if "provenance" in meta else ""
    )
    return Resolved(net, pre, classes, where, str(meta["model"]), meta.get("arch"))


def _read_config(run_dir: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{run_dir}: cannot read config.json ({type(e).__name__}: {e})") from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict) or "name" not in cfg["model"]:
        raise ValueError(f"{run_dir}: config.json names no model (no model.name)")
    return cfg


def _run_model(cfg: dict[str, Any], options: dict[str, Any]) -> tuple[nn.Module, str, str | None]:
    """(the architecture a run's config builds, `options` over its own, without weights; its name; its arch)."""
    m = cfg["model"]
    name = str(m["name"])
    arch = name if is_hub_name(name) else split_name(name)[0]  # a tag would mean its published weights
    config_fields = {f.name for f in fields(ConvNeXtConfig)}  # the model options a run's config sets beside kwargs
    kwargs = {k: v for k, v in m.items() if k in config_fields and v is not None} | dict(m.get("kwargs") or {})
    return create_model(arch, **kwargs | options), name, None if is_hub_name(name) else arch


def _hub_preprocess(hub: HubModel) -> Preprocess:
    pp = hub.preprocess
    return Preprocess(int(pp["img_size"]), float(pp["crop_pct"]), tuple(pp["mean"]), tuple(pp["std"]),
                      interpolation=pp["interpolation"], crop_mode=pp["crop_mode"])  # fmt: skip


def _classes(net: nn.Module, given: list[str] | None = None) -> list[str] | None:
    """The `given` names when there is one per output, else ImageNet-1k's for 1000 outputs, else unknown."""
    outputs = getattr(net, "num_classes", None)
    if given and len(given) == outputs:
        return list(given)
    return imagenet_classes() if outputs == 1000 else None


def _check_finite(net: nn.Module, what: str) -> None:
    bad = next((k for k, v in net.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ValueError(f"{what} {bad} holds NaN or infinite values, so every prediction would be NaN (weights of a "
                         "run that diverged?)")  # fmt: skip
