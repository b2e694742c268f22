"""What a training run starts from: random weights, or weights that `convnext.resolve` reads - a published tag
(`convnext_atto.d2_in1k`), a registered name with `--pretrained` (its default published weights), a weight file in
any layout (`--model.checkpoint`), a Hub repo (`hf-hub:org/name`), a pretrained folder, a `convnext train` run or a
`convnext pretrain` run - with what they bring: the architecture, the preprocessing they were trained with, their
head, and whether they are a self-supervised (FCMAE) encoder rather than a supervised model. A source that cannot be
read is one error before any work, never random weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from convnext.model import ConvNeXt
from convnext.registry import create_model, split_name
from convnext.resolve import Resolved, is_pretrain_run, is_run_dir, resolve
from convnext.weights.hf import is_hub_name
from convnext.weights.hub import default_cache_dir
from convnext.weights.io import read_state_dict
from convnext.weights.layouts import detect_layout

# ConvNeXtConfig fields a run's config sets on their own (ModelConfig fields), and those a run never takes over
OWN_FIELDS = ("patch_size", "kernel_size", "layer_scale_init")
RUN_FIELDS = ("num_classes", "drop_path_rate", "drop_rate", "head_init_scale")


@dataclass(frozen=True)
class Start:
    """Starting weights: `overrides` are the dotted config fields that make a run start from them (model name,
    weights, architecture options, normalisation); `img_size` the resolution they were trained at (None: a
    bare weight file, which does not say); `classes` the
    outputs of their head (0: none); `kind` what they are (published, file, hub, folder, run, pre-training run);
    `fcmae` whether they are an FCMAE pre-training encoder (a `convnext pretrain` run or an FCMAE checkpoint file):
    features learnt without labels, which fine-tune with their own settings."""

    source: str
    arch: str
    overrides: dict[str, Any]
    img_size: int | None
    classes: int
    kind: str
    what: str
    patch_size: int = 4  # the stem's stride
    stride: int = 32  # the total stride: the last stage's pixels per token
    fcmae: bool = False


def is_source(model: str | None) -> bool:
    """Whether `--model` names weights rather than an architecture: a path, a Hub repo, or `arch.tag`."""
    if not model:
        return False
    return is_hub_name(model) or Path(model).exists() or split_name(model)[1] is not None


def starting_weights(model: str | None, pretrained: bool = False, checkpoint: str | None = None) -> Start | None:
    """The weights a run of `model` starts from (None: random weights). `checkpoint` is a weight file (or any
    source `resolve` reads) loaded into `model`; `pretrained` takes `model`'s default published weights."""
    if checkpoint:
        source, r = checkpoint, _read(checkpoint, model=arch_for(checkpoint, model))
    elif is_source(model) and (is_hub_name(model) or Path(model).exists()):
        source, r = model, _read(model)
    elif model and (pretrained or split_name(model)[1] is not None):
        source, r = model, _read(model, pretrained=True)
    else:
        return None
    kind = _kind(source, checkpoint is not None, r)
    if kind == "published":
        overrides: dict[str, Any] = {"model.name": source, "model.pretrained": True, "model.checkpoint": None}
    else:
        overrides = {"model.name": r.arch or r.name, "model.pretrained": False, "model.checkpoint": source}
        overrides |= _shape(r)
    p = r.preprocess
    if kind != "file":  # a bare weight file says nothing of its normalisation either
        overrides |= {"data.mean": tuple(p.mean), "data.std": tuple(p.std), "data.interpolation": p.interpolation}
    classes = int(getattr(r.model, "num_classes", 0) or 0)
    patch, stride = 4, 32
    if isinstance(r.model, ConvNeXt):
        patch = r.model.cfg.patch_size
        stride = patch * 2 ** (len(r.model.cfg.depths) - 1)
    size = None if kind == "file" else p.img_size  # a bare weight file says nothing of the resolution it saw
    fcmae = kind == "pre-training run" or kind == "file" and _is_fcmae(source)
    return Start(source, r.arch or r.name, overrides, size, classes, kind, r.provenance, patch, stride, fcmae)


def _is_fcmae(path: str) -> bool:
    """Whether a weight file is an FCMAE pre-training checkpoint (an encoder beside a decoder: the official
    `*_fcmae.pt` or a `convnext pretrain` run's last.pt); it was read once already, so it reads."""
    try:
        return detect_layout(read_state_dict(path)) == "fcmae"
    except ValueError:  # a layout only the model's own keys tell (loaded as "ours"): not FCMAE
        return False


def _read(source: str, **kw: Any) -> Resolved:
    """`resolve`, with the error a user can act on when published or Hub weights cannot be fetched."""
    try:
        return resolve(source, **kw)
    except (OSError, RuntimeError) as e:
        if Path(source).exists() or "download" not in str(e).lower() and not isinstance(e, OSError):
            raise
        offline = " (HF_HUB_OFFLINE is set: only cached files are read)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise OSError(
            f"--model {source}: its weights are not in the download cache ({default_cache_dir()}) and could not be "
            f"fetched{offline}: {e}. Put the file in the cache, or train without a tag for random weights"
        ) from e


def arch_for(checkpoint: str, model: str | None) -> str | None:
    """The architecture to load `checkpoint` into: `model` for a weight file (None: read off its shapes); a run, a
    folder or a Hub repo names its own (None)."""
    names_own = is_hub_name(checkpoint) or Path(checkpoint).is_dir()
    return None if names_own or not model else split_name(model)[0]


def _kind(source: str, as_checkpoint: bool, r: Resolved) -> str:
    path = Path(source)
    if is_hub_name(source):
        return "hub"
    if path.is_dir():
        return "pre-training run" if is_pretrain_run(path) else "run" if is_run_dir(path) else "folder"
    if as_checkpoint or path.exists():
        return "file"
    return "published"


def _shape(r: Resolved) -> dict[str, Any]:
    """The config fields that rebuild the weights' architecture from its registered name (a stem of another
    stride, other depths or widths, layer scale off)."""
    if not isinstance(r.model, ConvNeXt) or r.arch is None:
        return {}
    own, default = r.model.cfg, create_model(r.arch, num_classes=0).cfg
    out: dict[str, Any] = {f"model.{k}": getattr(own, k) for k in OWN_FIELDS if getattr(own, k) != getattr(default, k)}
    kwargs = {
        f.name: getattr(own, f.name)
        for f in fields(own)
        if f.name not in OWN_FIELDS + RUN_FIELDS and getattr(own, f.name) != getattr(default, f.name)
    }
    if kwargs:
        out["model.kwargs"] = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    return out
