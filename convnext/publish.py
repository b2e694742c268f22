"""Publishing a model: a pretrained folder (config.json, model.safetensors, preprocessor_config.json) that this
package, transformers and the Hub read, its model card, and pushing it to the Hugging Face Hub.

What is published is a `convnext.resolve.Resolved`: any source `resolve` takes (a run, a weight file, a Hub repo,
a pretrained folder) keeps its preprocessing and class names, and a run its metrics (results.json). Reading such a
folder or repo back is `convnext.weights.hf`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor

from convnext.model import ConvNeXtConfig
from convnext.resolve import Preprocess, Resolved
from convnext.weights.hf import (
    DEFAULT_PREPROCESS,
    OURS_KEY,
    RESAMPLE,
    arch_of,
    failure,
    first_line,
    huggingface_hub,
    is_transport_error,
)
from convnext.weights.io import apply_umask
from convnext.weights.layouts import from_ours

FOLDER_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")  # what we write
RUN_METRICS = ("top1", "top5", "loss", "best_top1", "ema_top1", "ema_top5", "ema_loss", "n", "epochs", "steps")


# ----------------------------------------------------------------------------------------------- a pretrained folder


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
    if cfg.stem_type != "patch" or cfg.norm_layer != "layernorm" or cfg.head_norm_first or cfg.head_hidden_size:
        return "transformers' ConvNext has none of timm's options (overlapping stem, SimpleNorm, norm first, MLP head)"
    if cfg.norm_eps != 1e-6:
        return f"transformers' ConvNext has LayerNorm eps 1e-6; this model has {cfg.norm_eps}"
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


def preprocessor_config(preprocess: Preprocess) -> dict[str, Any]:
    """preprocessor_config.json for transformers' ConvNextImageProcessor: below 384 px it resizes the short side to
    img_size / crop_pct and center-crops img_size, as our "center" crop_mode does; at 384 px and above it resizes
    to a square, no crop (our "squash" with crop_pct 1). Other combinations it cannot say: the card states ours."""
    pp = plain_preprocess(preprocess)
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


def plain_preprocess(preprocess: Preprocess) -> dict[str, Any]:
    """The preprocessing a pretrained folder records (`DEFAULT_PREPROCESS`'s keys), as JSON holds it."""
    return _plain({k: getattr(preprocess, k) for k in DEFAULT_PREPROCESS})


def pretrained_files(resolved: Resolved, transformers: bool | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """({file name: JSON object}, weights for model.safetensors) of a pretrained folder for a resolved model.

    transformers: also make it a transformers folder (HF key layout, its config keys, preprocessor_config.json);
        True refuses, in one line, a model transformers cannot hold; None does it when it can.
    """
    model = resolved.model
    if not isinstance(getattr(model, "cfg", None), ConvNeXtConfig):
        raise ValueError(f"only ConvNeXt models make a pretrained folder, not a {type(model).__name__}")
    cfg, pp, classes = model.cfg, plain_preprocess(resolved.preprocess), resolved.classes
    reason = transformers_incompatibility(cfg)
    if transformers and reason:
        raise ValueError(reason)
    with_hf = reason is None and transformers is not False
    config = hf_config(cfg, classes, int(pp["img_size"])) if with_hf else {}
    config[OURS_KEY] = {"arch": resolved.arch or arch_of(cfg), "config": _plain(asdict(cfg)), "preprocess": pp,
                        "classes": classes}  # fmt: skip
    texts = {"config.json": config}
    if with_hf:
        texts["preprocessor_config.json"] = preprocessor_config(resolved.preprocess)
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
        apply_umask(tmp / "model.safetensors")  # safetensors writes 0600
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


def model_card(repo_id: str, resolved: Resolved, transformers: bool = False) -> str:
    """README.md of a pushed repo: what the model is, its metrics (a run's), its preprocessing and how to load it."""
    cfg, classes, pp = resolved.model.cfg, resolved.classes, plain_preprocess(resolved.preprocess)
    metrics, data = run_facts(resolved)
    name = resolved.arch or arch_of(cfg) or "a ConvNeXt"
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


def run_facts(resolved: Resolved) -> tuple[dict[str, Any], str | None]:
    """(a run's validation metrics from its results.json, the name of the data it was trained on); ({}, None) for
    any other source. The data set is named by its folder's name, not the trainer's local path."""
    if resolved.run_dir is None or resolved.run is None:
        return {}, None
    results = resolved.run_dir / "results.json"
    try:
        metrics = json.loads(results.read_text()) if results.is_file() else {}
    except (OSError, ValueError) as e:
        raise ValueError(f"{resolved.run_dir}: cannot read results.json ({type(e).__name__}: {e})") from e
    data = str((resolved.run.get("data") or {}).get("name") or "")
    return {k: metrics[k] for k in RUN_METRICS if k in metrics}, Path(data).name or None


# ----------------------------------------------------------------------------------------------- pushing


def check_repo_id(repo_id: str) -> None:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise ValueError(f"--repo {repo_id!r}: give ORG/NAME (or USER/NAME)")


def push_token(token: str | None = None) -> str:
    """The token a push uses: `token`, else HF_TOKEN or the saved login; PermissionError (one line) when none."""
    token = token or huggingface_hub().get_token()
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
    `revision`, made if missing); returns the commit's url. Every request waits at most `network_timeout()` s
    ($CONVNEXT_TIMEOUT); none is repeated by this package (a commit is not safe to repeat), and giving up is one line
    that names the endpoint and says whether the commit may have landed."""
    hf = huggingface_hub()
    check_repo_id(repo_id)
    api = hf.HfApi(token=push_token(token))
    ops = [hf.CommitOperationAdd(path_in_repo=Path(p).name, path_or_fileobj=str(p)) for p in files]
    step = "creating the repo"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            step = f"creating branch {revision}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "committing"
        info = api.create_commit(repo_id, ops, commit_message=message or "Upload with convnext push", revision=revision)
    except Exception as e:
        explained = _push_error(e, repo_id, api.endpoint, step)
        if explained is None:
            raise
        raise explained from e
    return str(info.commit_url)


def _push_error(e: Exception, repo_id: str, endpoint: str, step: str) -> Exception | None:
    hf = huggingface_hub()
    answered = isinstance(e, hf.utils.HfHubHTTPError)
    status = getattr(getattr(e, "response", None), "status_code", "?") if answered else None
    unsure = step == "committing" and not (isinstance(status, int) and status < 500)  # no answer, or a 5xx
    landed = (f"the commit may or may not have landed: look at {endpoint}/{repo_id} before pushing again" if unsure
              else "nothing was committed")  # fmt: skip
    if answered:
        server = " ".join(str(getattr(e, "server_message", None) or first_line(e)).split())
        if status in (401, 403):
            return PermissionError(f"push to {repo_id}: {endpoint} refused the token (HTTP {status}: {server}); it "
                                   "needs write access to the repo's namespace")  # fmt: skip
        return ConnectionError(f"push to {repo_id}: {endpoint} answered HTTP {status} while {step} ({server}); "
                               f"{landed}")  # fmt: skip
    if is_transport_error(e):
        return ConnectionError(f"push to {repo_id}: {endpoint} failed while {step} ({failure(e)}); {landed}")
    return None
