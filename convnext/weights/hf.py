"""The Hugging Face Hub: `hf-hub:org/name[@revision]` names, reading what a Hub repo holds, writing a folder that
transformers loads, and pushing one.

A repo is read in one of three forms, told apart by its config.json:
  ours          a `"convnext"` entry {arch, config, preprocess, classes}: what `convnext push` writes (when
                transformers has the architecture the same folder is also a transformers one)
  transformers  `"model_type": "convnext" | "convnextv2"` (ConvNextForImageClassification / ConvNextV2...)
  timm          `"architecture": "convnext_..."` with its `pretrained_cfg`
The weights are model.safetensors, else pytorch_model.bin (refused when it holds pickled code), in any layout
`convnext.weights` reads. Everything goes through huggingface_hub, so its cache (HF_HOME, HF_HUB_CACHE), token
(HF_TOKEN, `hf auth login`), endpoint (HF_ENDPOINT) and HF_HUB_OFFLINE apply, and its downloads are atomic (a
temporary file renamed into the cache when complete). huggingface_hub is imported only when a Hub name is used.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from torch import Tensor

from convnext.model import ConvNeXt, ConvNeXtConfig, UnknownOptionError
from convnext.weights.specs import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # tried in this order
FOLDER_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")  # what we write
OURS_KEY = "convnext"  # our entry in config.json
DEFAULT_PREPROCESS = MappingProxyType({"img_size": 224, "crop_pct": 0.875, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                                       "interpolation": "bicubic", "crop_mode": "center"})  # fmt: skip
RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL's codes, as ConvNextImageProcessor stores them


def _hub():
    from convnext.extras import require

    require("huggingface_hub", what="hf-hub: names and `convnext push`")
    import huggingface_hub

    return huggingface_hub


# ----------------------------------------------------------------------------------------------- names


def is_hub_name(name: object) -> bool:
    return isinstance(name, str) and name.startswith(HUB_PREFIX)


def parse_hub_name(name: str) -> tuple[str, str | None]:
    """'hf-hub:org/name@rev' -> ('org/name', 'rev'); without '@rev' the revision is None (the main branch)."""
    repo, _, revision = name.removeprefix(HUB_PREFIX).partition("@")
    if not is_hub_name(name) or not re.fullmatch(r"([\w.-]+/)?[\w.-]+", repo) or "@" in revision:
        raise ValueError(f"{name!r}: a Hub name reads hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    return repo, revision or None


# ----------------------------------------------------------------------------------------------- downloads


class MissingFileError(FileNotFoundError):
    """The repo has no such file (`remote`), or, offline, the cache has none."""

    def __init__(self, message: str, remote: bool):
        super().__init__(message)
        self.remote = remote


def hub_file(name: str, filename: str) -> Path:
    """`filename` of the repo `name` names, from the HF cache or downloaded into it. Raises one-line errors:
    FileNotFoundError (no such repo, revision or file; offline cache miss), PermissionError (gated, refused token),
    ConnectionError (Hub unreachable and nothing cached)."""
    hf = _hub()
    repo, revision = parse_hub_name(name)
    try:
        return Path(hf.hf_hub_download(repo, filename, revision=revision))
    except Exception as e:
        explained = _explain(e, name, filename)
        if explained is None:
            raise
        raise explained from e


def hub_weights(name: str) -> Path:
    """The repo's weight file in the HF cache: model.safetensors, else pytorch_model.bin (what `--checkpoint
    hf-hub:...` reads, through `io.read_file`)."""
    misses = []
    for filename in WEIGHT_FILES:
        try:
            return hub_file(name, filename)
        except MissingFileError as e:
            misses.append(e)
    if all(m.remote for m in misses):
        raise FileNotFoundError(f"{name}: the repository holds no weights ({' or '.join(WEIGHT_FILES)})")
    raise next(m for m in misses if not m.remote)


def _explain(e: Exception, name: str, filename: str) -> Exception | None:
    """One line for what huggingface_hub raised (None: not a Hub error, re-raise it as it is)."""
    hf = _hub()
    errors, constants = hf.utils, hf.constants
    repo, revision = parse_hub_name(name)
    endpoint = constants.ENDPOINT
    if isinstance(e, errors.GatedRepoError):
        return PermissionError(f"{name}: {repo} is gated: accept its conditions at {endpoint}/{repo}, then set "
                               "HF_TOKEN (or run `hf auth login`)")  # fmt: skip
    if isinstance(e, errors.RepositoryNotFoundError):  # the Hub answers so for private repos too, without a token
        if hf.get_token() is None:
            return FileNotFoundError(f"{name}: no repository {repo} on {endpoint}, or it is private and no token "
                                     "was given (set HF_TOKEN or run `hf auth login`)")  # fmt: skip
        return FileNotFoundError(f"{name}: no repository {repo} on {endpoint}, or the token cannot read it")
    if isinstance(e, errors.RevisionNotFoundError):
        return FileNotFoundError(f"{name}: {repo} has no revision {revision!r}")
    if isinstance(e, errors.LocalEntryNotFoundError):  # before EntryNotFoundError: it is one
        if constants.HF_HUB_OFFLINE:
            return MissingFileError(f"{name}: {filename} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                                    "and HF_HUB_OFFLINE is set: fetch it once online, or unset HF_HUB_OFFLINE",
                                    remote=False)  # fmt: skip
        return ConnectionError(f"{name}: cannot reach {endpoint} and {filename} is not in the Hugging Face cache "
                               f"({constants.HF_HUB_CACHE}); check the connection (and HF_ENDPOINT)")  # fmt: skip
    if isinstance(e, errors.EntryNotFoundError):
        return MissingFileError(f"{name}: {repo} has no file {filename}", remote=True)
    if isinstance(e, errors.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", "?")
        if status in (401, 403):
            return PermissionError(f"{name}: {endpoint} refused access to {repo} (HTTP {status}); check the token")
        return ConnectionError(f"{name}: {endpoint} answered HTTP {status} for {filename}")
    if isinstance(e, errors.HFValidationError):
        return ValueError(f"{name}: not a valid Hub repository name ({_first_line(e)})")
    if _is_transport_error(e):  # a dropped connection, a short or corrupt body: huggingface_hub kept nothing of it
        return ConnectionError(f"{name}: downloading {filename} from {endpoint} failed ({type(e).__name__}: "
                               f"{_first_line(e)}); nothing was cached")  # fmt: skip
    return None


def _is_transport_error(e: Exception) -> bool:
    """An OSError or an error of the HTTP client huggingface_hub uses (httpx, or requests before 1.0)."""
    return isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2",
                                                                          "requests", "urllib3")  # fmt: skip


def _first_line(e: Exception) -> str:
    return " ".join((str(e).strip().splitlines() or [""])[0].split())


# ----------------------------------------------------------------------------------------------- reading a repo


@dataclass(frozen=True)
class HubModel:
    """What a Hub repo holds, its files resolved into the HF cache."""

    name: str  # hf-hub:org/name[@revision]
    form: str  # "convnext" (ours), "transformers" or "timm"
    config: ConvNeXtConfig
    weights: Path | None  # the weight file (None when not asked for)
    preprocess: dict[str, Any]  # img_size, crop_pct, mean, std, interpolation, crop_mode (as infer.Preprocess)
    classes: list[str] | None  # label of each output; None = unknown
    arch: str | None = None  # the registered architecture, when the repo names one


def resolve_hub(name: str, weights: bool = True) -> HubModel:
    """Read the repo `name` names: its config.json (which form, which architecture, preprocessing, class names)
    and, with `weights`, its weight file."""
    raw = _read_json(hub_file(name, "config.json"), name)
    processor = {}
    if raw.get("model_type") in ("convnext", "convnextv2") and not isinstance(raw.get(OURS_KEY), Mapping):
        try:
            processor = _read_json(hub_file(name, "preprocessor_config.json"), name)
        except MissingFileError:
            pass  # transformers' defaults
    form, config, preprocess, classes, arch = describe(raw, processor, name)
    return HubModel(name, form, config, hub_weights(name) if weights else None, preprocess, classes, arch)


def read_folder(folder: str | Path) -> HubModel:
    """`resolve_hub` for a local folder: what `convnext convert --to hf` writes, a `save_pretrained` folder, a
    downloaded timm or Hub repo."""
    folder = Path(folder)
    raw = _read_json(folder / "config.json", str(folder))
    pp = folder / "preprocessor_config.json"
    processor = _read_json(pp, str(folder)) if pp.is_file() else {}
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder}: a folder without any of {WEIGHT_FILES}")
    form, config, preprocess, classes, arch = describe(raw, processor, str(folder))
    return HubModel(str(folder), form, config, weights, preprocess, classes, arch)


def describe(raw: Mapping[str, Any], processor: Mapping[str, Any], name: str):
    """(form, ConvNeXtConfig, preprocess, classes, arch) of a repo's config.json (and preprocessor_config.json)."""
    if isinstance(raw.get(OURS_KEY), Mapping):
        return "convnext", *_from_ours(raw[OURS_KEY], name)
    if raw.get("model_type") in ("convnext", "convnextv2"):
        return "transformers", *_from_transformers(raw, processor, name)
    if isinstance(raw.get("architecture"), str):
        return "timm", *_from_timm(raw, name)
    raise ValueError(f"{name}: config.json describes no ConvNeXt this package reads (no '{OURS_KEY}' entry, no "
                     "model_type convnext/convnextv2, no timm 'architecture')")  # fmt: skip


def load_hub_model(name: str, pretrained: bool = True, **overrides) -> tuple[ConvNeXt, HubModel]:
    """The model a Hub repo describes, with its weights when `pretrained` (a head for another `num_classes`, a stem
    for another `in_chans` adapt as `load_checkpoint` does)."""
    hub = resolve_hub(name, weights=pretrained)
    return build(hub, pretrained, **overrides), hub


def build(hub: HubModel, pretrained: bool = True, **overrides) -> ConvNeXt:
    """The model `hub` describes (config fields in `overrides` replace its own), with its weights if `pretrained`."""
    from convnext.weights.io import load_checkpoint

    allowed = {f.name for f in fields(ConvNeXtConfig)}
    if set(overrides) - allowed:
        unknown = sorted(set(overrides) - allowed)
        raise UnknownOptionError(f"unknown option(s) {unknown}; ConvNeXtConfig takes {sorted(allowed)}")
    model = ConvNeXt(hub.config.with_(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}))
    if pretrained:
        load_checkpoint(model, hub.weights)
    return model


def _read_json(path: Path, name: str) -> dict[str, Any]:
    try:
        out = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{name}: cannot read {Path(path).name} ({type(e).__name__}: {e})") from e
    if not isinstance(out, dict):
        raise ValueError(f"{name}: {Path(path).name} holds no JSON object")
    return out


def _preprocess(**given: Any) -> dict[str, Any]:
    out = {**DEFAULT_PREPROCESS, **{k: v for k, v in given.items() if v is not None}}
    return {**out, "mean": tuple(out["mean"]), "std": tuple(out["std"])}


def _from_ours(entry: Mapping[str, Any], name: str) -> tuple:
    given = dict(entry.get("config") or {})
    allowed = {f.name for f in fields(ConvNeXtConfig)}
    if not given or set(given) - allowed:
        raise ValueError(f"{name}: config.json's '{OURS_KEY}' entry has no model config, or unknown fields "
                         f"{sorted(set(given) - allowed)}")  # fmt: skip
    config = ConvNeXtConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    return config, _preprocess(**(entry.get("preprocess") or {})), entry.get("classes") or None, entry.get("arch")


def _from_transformers(raw: Mapping[str, Any], processor: Mapping[str, Any], name: str) -> tuple:
    v2 = raw["model_type"] == "convnextv2"
    if raw.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{name}: hidden_act {raw['hidden_act']!r}; this package's ConvNeXt uses gelu")
    patch = raw.get("patch_size", 4)
    labels = raw.get("id2label") or {}
    num_classes = len(labels) if labels else int(raw.get("num_labels", 2))  # transformers' default is 2
    config = ConvNeXtConfig(
        depths=tuple(raw.get("depths", (3, 3, 9, 3))),
        dims=tuple(raw.get("hidden_sizes", (96, 192, 384, 768))),
        grn=v2,
        layer_scale_init=0.0 if v2 else float(raw.get("layer_scale_init_value", 1e-6)),
        patch_size=int(patch[0] if isinstance(patch, list) else patch),
        in_chans=int(raw.get("num_channels", 3)),
        num_classes=num_classes,
        drop_path_rate=float(raw.get("drop_path_rate", 0.0)),
    )
    classes = [str(labels[k]) for k in sorted(labels, key=int)] if labels else None
    if classes and all(c == f"LABEL_{i}" for i, c in enumerate(classes)):
        classes = None  # transformers' placeholders
    size = processor.get("size") or {}
    img_size = size.get("shortest_edge") or size.get("height") or raw.get("image_size")
    warp = img_size is not None and img_size >= 384  # ConvNextImageProcessor resizes to a square there, no crop
    interpolation = {v: k for k, v in RESAMPLE.items()}.get(processor.get("resample"))
    preprocess = _preprocess(img_size=img_size, crop_pct=1.0 if warp else processor.get("crop_pct"),
                             mean=processor.get("image_mean"), std=processor.get("image_std"),
                             interpolation=interpolation, crop_mode="squash" if warp else None)  # fmt: skip
    return config, preprocess, classes, None


def _from_timm(raw: Mapping[str, Any], name: str) -> tuple:
    from convnext.registry import VARIANTS

    arch = raw["architecture"]
    if arch not in VARIANTS:
        raise ValueError(f"{name}: timm architecture {arch!r} is not one of this package's ConvNeXt variants "
                         "(`convnext list` shows them)")  # fmt: skip
    pcfg = raw.get("pretrained_cfg") or {}
    num_classes = raw.get("num_classes", pcfg.get("num_classes", 1000))
    config = VARIANTS[arch].with_(num_classes=int(num_classes), in_chans=int(raw.get("in_chans", 3)))
    size = pcfg.get("input_size")
    preprocess = _preprocess(img_size=size[-1] if size else None, crop_pct=pcfg.get("crop_pct"),
                             mean=pcfg.get("mean"), std=pcfg.get("std"), interpolation=pcfg.get("interpolation"),
                             crop_mode="squash" if pcfg.get("crop_mode") == "squash" else None)  # fmt: skip
    return config, preprocess, raw.get("label_names") or None, arch


# ----------------------------------------------------------------------------------------------- writing a folder


@dataclass
class Source:
    """A trained model with what a pretrained folder says around it."""

    model: ConvNeXt
    arch: str | None
    preprocess: dict[str, Any]
    classes: list[str] | None
    metrics: dict[str, Any]  # the run's results.json (empty for a weight file)
    data: str | None = None  # what it was trained on (a dataset name or a folder's name)


def load_source(src: str | Path, model_name: str | None = None, ema: bool = False) -> Source:
    """What `convert --to hf` and `push` take: a training run (its folder, best.pt or last.pt), a pretrained folder
    (config.json + weights: ours, transformers', timm's), an `hf-hub:` name, or a weight file in any layout.

    model_name: for a weight file, the registered name it must load into (a tag gives its published preprocessing);
        without it the architecture is read off the tensors' shapes.
    ema: a run's EMA weights; a weight file's EMA entry.
    """
    if is_hub_name(str(src)):
        model, hub = load_hub_model(str(src))
        return Source(model, hub.arch, hub.preprocess, hub.classes, {})
    path = Path(src)
    run_dir = path.parent if path.is_file() and path.stem in ("best", "last") else path
    if run_dir.is_dir() and (run_dir / "config.json").is_file() and any((run_dir / f).is_file()
                                                                        for f in ("best.pt", "last.pt")):  # fmt: skip
        return _run_source(run_dir, "last" if path.stem == "last" else "best", ema)
    if path.is_dir() and (path / "config.json").is_file():
        hub = read_folder(path)
        return Source(build(hub), hub.arch, hub.preprocess, hub.classes, {})
    return _file_source(path, model_name, ema)


def _run_source(run_dir: Path, which: str, ema: bool) -> Source:
    from convnext.train.runs import load_run

    model, cfg = load_run(run_dir, which=which, ema=ema)
    data = cfg.get("data", {})
    results = run_dir / "results.json"
    metrics = _read_json(results, str(run_dir)) if results.is_file() else {}
    keep = ("top1", "top5", "loss", "best_top1", "ema_top1", "ema_top5", "ema_loss", "n", "epochs", "steps")
    preprocess = _preprocess(img_size=data.get("img_size"), crop_pct=data.get("crop_pct"), mean=data.get("mean"),
                             std=data.get("std"), interpolation=data.get("interpolation"))  # fmt: skip
    arch = str(cfg.get("model", {}).get("name", "")).split(".")[0] or None
    name = str(data.get("name") or "")
    return Source(model, arch, preprocess, data.get("classes") or None, {k: metrics[k] for k in keep if k in metrics},
                  Path(name).name or None)  # fmt: skip


def _file_source(path: Path, model_name: str | None, ema: bool) -> Source:
    from convnext.weights.io import load_checkpoint, read_state_dict
    from convnext.weights.layouts import detect_layout, to_ours

    sd = read_state_dict(path, ema=ema)
    ours = to_ours(sd, detect_layout(sd))
    preprocess, arch = _preprocess(), None
    if model_name:
        from convnext.registry import create_model, split_name

        head, stem = ours.get("head.weight"), ours.get("stem.0.weight")
        shape = {"num_classes": 0 if head is None else int(head.shape[0])}
        if stem is not None:
            shape["in_chans"] = int(stem.shape[1])
        model = create_model(model_name, **shape)
        arch, tag = split_name(model_name)
        if tag:
            from convnext.weights.specs import resolve_spec

            spec = resolve_spec(arch, tag)
            preprocess = _preprocess(img_size=spec.input_size, crop_pct=spec.crop_pct, mean=spec.mean, std=spec.std,
                                     interpolation=spec.interpolation,
                                     crop_mode=getattr(spec, "crop_mode", None))  # fmt: skip
    else:
        model = ConvNeXt(config_from_state_dict(ours))
    load_checkpoint(model, ours, strict=True)
    classes = None
    if getattr(model, "num_classes", 0) == 1000:
        from convnext.infer import imagenet_classes

        classes = imagenet_classes()
    return Source(model.eval(), arch or arch_of(model.cfg), preprocess, classes, {})


def config_from_state_dict(sd: Mapping[str, Tensor]) -> ConvNeXtConfig:
    """The ConvNeXtConfig a state dict in our layout was made with (what shapes tell: not drop path, dropout)."""
    stem = sd.get("stem.0.weight")
    blocks = sorted({(int(m[1]), int(m[2])) for k in sd if (m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", k))})
    if stem is None or not blocks:
        raise ValueError("not a ConvNeXt state dict (no stem.0.weight, no stages.*.blocks.*)")
    stages = sorted({i for i, _ in blocks})
    depths = tuple(1 + max(j for i2, j in blocks if i2 == i) for i in stages)
    dims = tuple(int(sd[f"stages.{i}.blocks.0.dwconv.weight"].shape[0]) for i in stages)
    first = "stages.0.blocks.0."
    head = sd.get("head.weight")
    return ConvNeXtConfig(
        depths=depths,
        dims=dims,
        grn=first + "grn.weight" in sd,
        layer_scale_init=1e-6 if first + "gamma" in sd else 0.0,
        kernel_size=int(sd[first + "dwconv.weight"].shape[-1]),
        patch_size=int(stem.shape[-1]),
        stem_norm="stem.1.weight" in sd,
        mlp_ratio=int(sd[first + "pwconv1.weight"].shape[0]) // dims[0],
        in_chans=int(stem.shape[1]),
        num_classes=0 if head is None else int(head.shape[0]),
    )


def arch_of(cfg: ConvNeXtConfig) -> str | None:
    """The registered variant with `cfg`'s depths, widths and version, if any."""
    from convnext.registry import VARIANTS

    key = (cfg.depths, cfg.dims, cfg.grn)
    return next((n for n, v in VARIANTS.items() if (v.depths, v.dims, v.grn) == key), None)


def transformers_incompatibility(cfg: ConvNeXtConfig) -> str | None:
    """Why transformers' ConvNext / ConvNextV2 cannot hold a model of `cfg` (None: it can)."""
    if cfg.isotropic:
        return "transformers has no isotropic ConvNeXt; convert to 'official' (or 'ours') instead"
    odd = [f"{what} {got}" for what, got, want in (("kernel", cfg.kernel_size, 7), ("mlp_ratio", cfg.mlp_ratio, 4),
           ("stem_norm", cfg.stem_norm, True)) if got != want]  # fmt: skip
    if odd:
        return f"transformers' ConvNext has kernel 7, mlp_ratio 4 and a stem norm; this model has {', '.join(odd)}"
    if cfg.grn and cfg.layer_scale_init > 0:
        return "transformers' ConvNextV2 has no layer scale; this V2 model has one"
    return None


def hf_config(cfg: ConvNeXtConfig, classes: Sequence[str] | None = None, image_size: int = 224) -> dict[str, Any]:
    """config.json for transformers' ConvNextForImageClassification (V1) / ConvNextV2ForImageClassification (GRN)."""
    reason = transformers_incompatibility(cfg)
    if reason:
        raise ValueError(reason)
    names = list(classes) if classes and len(classes) == cfg.num_classes else None
    names = names or [f"LABEL_{i}" for i in range(cfg.num_classes)]
    out = {
        "architectures": ["ConvNextV2ForImageClassification" if cfg.grn else "ConvNextForImageClassification"],
        "model_type": "convnextv2" if cfg.grn else "convnext",
        "num_channels": cfg.in_chans,
        "patch_size": cfg.patch_size,
        "num_stages": len(cfg.depths),
        "hidden_sizes": list(cfg.dims),
        "depths": list(cfg.depths),
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,  # the head norm's, ours (transformers' default is 1e-12); the others are fixed 1e-6
        "drop_path_rate": cfg.drop_path_rate,
        "image_size": image_size,
        "initializer_range": 0.02,
        "num_labels": cfg.num_classes,
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
    }
    if not cfg.grn:  # > 0 gives the layer scale parameter; its value is only the init
        out["layer_scale_init_value"] = cfg.layer_scale_init
    return out


def preprocessor_config(preprocess: Mapping[str, Any]) -> dict[str, Any]:
    """preprocessor_config.json for transformers' ConvNextImageProcessor: below 384 px it resizes the short side to
    img_size / crop_pct and center-crops img_size, as our "center" crop_mode does; at 384 px and above it resizes
    to a square, no crop (our "squash" with crop_pct 1). Other combinations it cannot say: the card states ours."""
    pp = _preprocess(**preprocess)
    return {
        "image_processor_type": "ConvNextImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": int(pp["img_size"])},
        "crop_pct": float(pp["crop_pct"]),
        "resample": RESAMPLE.get(pp["interpolation"], 3),
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pp["mean"]),
        "image_std": list(pp["std"]),
    }


def pretrained_files(
    model: ConvNeXt,
    arch: str | None = None,
    preprocess: Mapping[str, Any] | None = None,
    classes: Sequence[str] | None = None,
    transformers: bool | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """({file name: JSON object}, weights for model.safetensors) of a pretrained folder for `model`.

    transformers: also make it a transformers folder (HF key layout, its config keys, preprocessor_config.json);
        True refuses, in one line, a model transformers cannot hold; None does it when it can.
    """
    from convnext.weights.layouts import from_ours

    if not isinstance(getattr(model, "cfg", None), ConvNeXtConfig):
        raise ValueError(f"only ConvNeXt models make a pretrained folder, not a {type(model).__name__}")
    cfg, pp = model.cfg, _preprocess(**(preprocess or {}))
    classes = list(classes) if classes else None
    reason = transformers_incompatibility(cfg)
    if transformers and reason:
        raise ValueError(reason)
    with_hf = reason is None and transformers is not False
    config = hf_config(cfg, classes, int(pp["img_size"])) if with_hf else {}
    config[OURS_KEY] = {"arch": arch or arch_of(cfg), "config": _plain(asdict(cfg)), "preprocess": _plain(pp),
                        "classes": classes}  # fmt: skip
    texts = {"config.json": config}
    if with_hf:
        texts["preprocessor_config.json"] = preprocessor_config(pp)
    sd = model.state_dict()
    return texts, from_ours(sd, "hf") if with_hf else dict(sd)


def write_folder(folder: str | Path, texts: Mapping[str, Any], weights: Mapping[str, Tensor], force: bool = False,
                 extra: Mapping[str, str] | None = None) -> list[Path]:  # fmt: skip
    """Write the JSON `texts`, model.safetensors and the `extra` text files into `folder`, all or nothing: they are
    written into a temporary folder beside it and moved into place once complete. Refuses to replace existing
    files of those names unless `force`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    names = [*texts, "model.safetensors", *(extra or {})]
    check_folder(folder, names, force)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        for name, obj in texts.items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        if not folder.exists():
            os.replace(tmp, folder)
        else:
            for name in names:
                os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [folder / n for n in names]


def check_folder(folder: str | Path, names: Sequence[str], force: bool = False) -> None:
    """Refuse (one line) a `folder` that is a file, or that holds any of `names` unless `force`."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file; give a folder for the pretrained files")
    clash = [n for n in names if (folder / n).exists()]
    if clash and not force:
        raise FileExistsError(f"{folder}: already holds {', '.join(clash)}; pass --force to replace them")


def _plain(obj: Any) -> Any:
    """Tuples -> lists, recursively: what JSON holds."""
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------- model card


def model_card(
    repo_id: str,
    cfg: ConvNeXtConfig,
    arch: str | None,
    preprocess: Mapping[str, Any],
    classes: Sequence[str] | None = None,
    metrics: Mapping[str, Any] | None = None,
    data: str | None = None,
    transformers: bool = False,
) -> str:
    """README.md of a pushed repo: what the model is, its metrics, its preprocessing and how to load it."""
    pp = _preprocess(**preprocess)
    name = arch or "a ConvNeXt"
    version = "V2 (GRN)" if cfg.grn else "V1"
    tags = ["image-classification", "convnext", "pytorch"] + (["transformers"] if transformers else [])
    lines = ["---", "tags:", *[f"- {t}" for t in tags], "pipeline_tag: image-classification"]
    lines += (["library_name: transformers"] if transformers else []) + ["---", "", f"# {repo_id}", ""]
    trained = f", trained on {data}" if data else ""
    lines += [f"{name}: ConvNeXt {version}, depths {list(cfg.depths)}, widths {list(cfg.dims)}, "
              f"{cfg.num_classes or 'no'} classes{trained}; made with the `convnext` package.", ""]  # fmt: skip
    shown = {k: v for k, v in (metrics or {}).items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if shown:
        lines += ["## Metrics (validation)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in shown.items()]
        lines.append("")
    size, crop = int(pp["img_size"]), float(pp["crop_pct"])
    side = "both sides" if pp["crop_mode"] == "squash" else "the shorter side"
    lines += ["## Preprocessing", "",
              f"RGB; resize {side} to {round(size / crop)} px ({pp['interpolation']}), center-crop "
              f"{size} px (crop_pct {crop:g}); scale to [0, 1]; normalize with mean {list(pp['mean'])}, "
              f"std {list(pp['std'])}.", ""]  # fmt: skip
    if classes:
        more = f", ... ({len(classes)} in all)" if len(classes) > 20 else ""
        lines += ["## Classes", "", ", ".join(map(str, classes[:20])) + more, ""]
    lines += ["## Use", "", "```", f"convnext predict hf-hub:{repo_id} image.jpg", "```", "", "```python",
              "from convnext.registry import create_model", "",
              f'model = create_model("hf-hub:{repo_id}", pretrained=True).eval()', "```", ""]  # fmt: skip
    if transformers:
        cls = "ConvNextV2ForImageClassification" if cfg.grn else "ConvNextForImageClassification"
        lines += ["```python", f"from transformers import AutoImageProcessor, {cls}", "",
                  f'processor = AutoImageProcessor.from_pretrained("{repo_id}")',
                  f'model = {cls}.from_pretrained("{repo_id}")', "```", ""]  # fmt: skip
    else:
        lines += ["transformers cannot load this model: " + (transformers_incompatibility(cfg) or "not asked"), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- pushing


def check_repo_id(repo_id: str) -> None:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise ValueError(f"--repo {repo_id!r}: give ORG/NAME (or USER/NAME)")


def push_token(token: str | None = None) -> str:
    """The token a push uses: `token`, else HF_TOKEN or the saved login; PermissionError (one line) when none."""
    token = token or _hub().get_token()
    if not token:
        raise PermissionError("pushing needs a Hugging Face token with write access: pass --token, set HF_TOKEN or "
                              "run `hf auth login`")  # fmt: skip
    return token


def push_files(
    files: Sequence[str | Path],
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    message: str | None = None,
) -> str:
    """Create the model repo `repo_id` if needed and commit `files` to its top level in one commit (on branch
    `revision`, made if missing); returns the commit's url."""
    hf = _hub()
    check_repo_id(repo_id)
    api = hf.HfApi(token=push_token(token))
    ops = [hf.CommitOperationAdd(path_in_repo=Path(p).name, path_or_fileobj=str(p)) for p in files]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, ops, commit_message=message or "Upload with convnext push", revision=revision)
    except Exception as e:
        explained = _push_error(e, repo_id, api.endpoint)
        if explained is None:
            raise
        raise explained from e
    return str(info.commit_url)


def _push_error(e: Exception, repo_id: str, endpoint: str) -> Exception | None:
    hf = _hub()
    if isinstance(e, hf.utils.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", "?")
        server = " ".join(str(getattr(e, "server_message", None) or _first_line(e)).split())
        if status in (401, 403):
            return PermissionError(f"push to {repo_id}: {endpoint} refused the token (HTTP {status}: {server}); it "
                                   "needs write access to the repo's namespace")  # fmt: skip
        return ConnectionError(f"push to {repo_id}: {endpoint} answered HTTP {status} ({server})")
    if _is_transport_error(e):
        return ConnectionError(f"push to {repo_id}: cannot reach {endpoint} ({type(e).__name__}: {_first_line(e)})")
    return None
