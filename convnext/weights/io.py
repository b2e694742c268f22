"""Read weight files safely and load any published layout into our model.

Nothing here unpickles code: PyTorch files load with `weights_only=True`, safetensors hold only tensors.
`load_checkpoint` checks every key and shape before it copies anything, so a bad file leaves the model untouched.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from convnext.weights.hf import folder_weights, hub_weights, is_hub_name
from convnext.weights.layouts import FCMAE_ENCODER, detect_layout, to_ours

log = logging.getLogger(__name__)

MAIN_KEYS = ("model", "state_dict", "model_state_dict")  # official / timm and lightning / common training scripts
EMA_KEYS = ("model_ema", "state_dict_ema", "ema")  # official / timm / others
PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def read_file(path: str | Path) -> object:
    """The object stored in a .safetensors / .pth / .pt / .bin file (or a Hugging Face model folder, or the weight
    file of a Hub repo named `hf-hub:org/name[@revision]`, fetched through the HF cache)."""
    if is_hub_name(path):  # every --checkpoint reads through here
        path = hub_weights(path)
    path = Path(path)
    if path.is_dir():
        path = folder_weights(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weight file")
    try:
        if path.suffix == ".safetensors":
            return load_file(path, device="cpu")
        # Official checkpoints may carry the training `args` namespace: plain data, safe to allow.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, bad safetensors header, refused global, ...
        lines = str(e).strip().splitlines() or [""]
        refused = next((ln.strip() for ln in lines if "Unsupported global" in ln), None)
        if refused:
            raise ValueError(f"{path}: holds pickled Python objects, refusing to unpickle code ({refused})") from e
        raise ValueError(
            f"{path}: cannot read weights, the file is truncated or corrupt ({type(e).__name__}: {lines[0]})"
        ) from e


def unwrap(obj: object, ema: bool = False, name: str = "checkpoint") -> dict[str, Tensor]:
    """Find the state dict inside a checkpoint: `{"model": ...}`, `{"state_dict": ...}`, EMA entries, `module.`.

    The main weights win unless `ema` is set; a file holding only EMA weights gives those either way.
    """
    found_ema = False
    for _ in range(4):  # wrappers nest at most a few levels
        if not isinstance(obj, Mapping):
            raise ValueError(f"{name}: expected a dict of tensors, found {type(obj).__name__}")
        ema_key = next((k for k in EMA_KEYS if isinstance(obj.get(k), Mapping)), None)
        main_key = next((k for k in MAIN_KEYS if isinstance(obj.get(k), Mapping)), None)
        key = ema_key if (ema and ema_key) else (main_key or ema_key)
        if key is None:
            break
        found_ema |= key == ema_key
        obj = obj[key]
    if ema and not found_ema:
        warnings.warn(f"{name}: no EMA weights found ({EMA_KEYS}); using the main weights", stacklevel=3)
    sd = {_strip(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        shown = ", ".join(map(str, list(obj)[:8]))
        raise ValueError(f"{name}: no tensors found (top-level keys: {shown})")
    return sd


def _strip(key: str) -> str:
    while key.startswith(PREFIXES):
        key = key.split(".", 1)[1]
    return key


def read_state_dict(path: str | Path, ema: bool = False) -> dict[str, Tensor]:
    """The flat state dict of a weight file, in the file's own layout (unwrapped, prefixes stripped)."""
    return unwrap(read_file(path), ema=ema, name=str(path))


def adapt_in_chans(weight: Tensor, in_chans: int) -> Tensor:
    """Stem conv weight (O, I, k, k) -> (O, in_chans, k, k).

    One channel: sum over the input channels (a grey image gives what an RGB image of that grey gave).
    Otherwise: repeat the channels cyclically and rescale by I / in_chans (timm's rule), which keeps the
    response to a constant input when in_chans is a multiple of I.
    """
    w = weight.float()
    if in_chans == 1:
        out = w.sum(dim=1, keepdim=True)
    else:
        reps = math.ceil(in_chans / w.shape[1])
        out = w.repeat(1, reps, 1, 1)[:, :in_chans] * (w.shape[1] / in_chans)
    return out.to(weight.dtype)


def load_checkpoint(
    model: nn.Module,
    src: str | Path | Mapping[str, object],
    strict: bool = True,
    ema: bool = False,
    name: str | None = None,
) -> None:
    """Load weights in any layout (official V1/V2, timm, torchvision, HF transformers, ours) into `model`.

    src: a file path or an already loaded (possibly wrapped) state dict.
    strict: every model key must be filled and every checkpoint key used, except the head (adapted: a
        head for another number of classes is dropped and the model keeps its fresh one) and the stem
        (adapted to another `in_chans`). Shapes must always match.
    name: what to call `src` in messages (default: its path, or "state dict").
    Raises ValueError naming the file and the offending keys (the first 8 of each kind) with both shapes;
    the model is then untouched. Adaptations are reported with `warnings.warn`.
    """
    name = name or ("state dict" if isinstance(src, Mapping) else str(src))
    sd = unwrap(src, ema=ema, name=name) if isinstance(src, Mapping) else read_state_dict(src, ema=ema)
    target = model.state_dict()
    if set(sd) == set(target):  # already ours (also any model outside the ConvNeXt family, e.g. roadmap steps)
        layout, ours = "ours", sd
    else:
        try:
            layout = detect_layout(sd)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        ours = to_ours(sd, layout)
    if layout == "fcmae":  # a pre-training checkpoint: the encoder is the model's, the decoder has no place in it
        dropped = [k for k in sd if not k.startswith(FCMAE_ENCODER)]
        parts = sorted({k.split(".")[0] for k in dropped})
        log.info("%s: an FCMAE checkpoint: loading its encoder; dropped the decoder (%d tensors: %s)", name,
                 len(dropped), ", ".join(parts) or "none")  # fmt: skip
    final, problems, notes = _match(ours, target, strict)
    if problems:
        raise ValueError(f"{name} ({layout} layout) does not fit {type(model).__name__}: " + "; ".join(problems))
    for note in notes:
        warnings.warn(f"{name}: {note}", stacklevel=2)
    model.load_state_dict(final, strict=False)  # every key and shape checked above
    log.debug("loaded %s (%s layout, %d tensors)", name, layout, len(final))


def _match(ours: dict[str, Tensor], target: dict[str, Tensor], strict: bool):
    """Pair checkpoint tensors with model tensors, adapting head and stem: (tensors, problems, notes)."""
    final, unexpected, shapes, notes = {}, [], [], []
    head_dropped = False
    for k, v in ours.items():
        t = target.get(k)
        if t is None:
            if k.startswith("head."):  # the model has no classifier (num_classes=0)
                head_dropped = True
            else:
                unexpected.append(k)
        elif v.shape == t.shape:
            final[k] = v
        elif k.startswith("head.") and v.shape[1:] == t.shape[1:]:  # same features, another number of classes
            head_dropped = True
        elif k == "stem.0.weight" and v.ndim == 4 and (v.shape[0], *v.shape[2:]) == (t.shape[0], *t.shape[2:]):
            final[k] = adapt_in_chans(v, t.shape[1])
            notes.append(f"stem adapted from {v.shape[1]} to {t.shape[1]} input channels")
        else:
            shapes.append(f"{k} checkpoint {tuple(v.shape)} vs model {tuple(t.shape)}")
    if head_dropped:
        got, want = ours.get("head.weight"), target.get("head.weight")
        n_got, n_want = (x.shape[0] if x is not None else 0 for x in (got, want))
        notes.append(f"checkpoint head has {n_got} classes, the model {n_want}: dropped, the model keeps its own head")
    missing = [k for k in target if k not in final and k not in ours]  # present but mismatched: reported above
    has_head = any(k.startswith("head.") for k in ours)
    allowed = [k for k in missing if k.startswith("head.") or (k.startswith("norm.") and not has_head)]
    if allowed and not head_dropped:
        notes.append(f"checkpoint has no {sorted(allowed)}; the model keeps its fresh ones")
    missing = [k for k in missing if k not in allowed]

    problems = [f"shape mismatch: {_listing(shapes)}"] if shapes else []
    if strict and missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if not strict and (missing or unexpected):
        notes.append(f"ignored {len(missing)} missing and {len(unexpected)} unexpected keys")
    return final, problems, notes


def _listing(items: list[str], limit: int = 8) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def apply_umask(path: str | Path) -> None:
    """Give `path` the mode `open()` gives a new file, 0666 less the umask: files made through a temporary file
    (tempfile.mkstemp, safetensors' writer) are 0600, which nobody else can read whatever the user's umask."""
    mask = os.umask(0)  # the only way to read it; set back at once
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_weights(
    sd: Mapping[str, Tensor],
    path: str | Path,
    metadata: dict[str, str] | None = None,
    force: bool = False,
    wrap_key: str | None = None,
) -> None:
    """Write a state dict: safetensors for a `.safetensors` path, else `torch.save` (as `{wrap_key: sd}` if given).

    Writes a temporary file beside `path` and renames it, so `path` is either the old file or the complete
    new one. Refuses to replace an existing file unless `force`.
    """
    path = Path(path)
    if path.is_dir():  # even with force: a folder is never replaced by a weight file
        raise IsADirectoryError(f"{path} is a folder; give a file name for the weights")
    if path.exists() and not force:
        raise FileExistsError(f"{path}: already exists (pass force=True / --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if path.suffix == ".safetensors":
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, tmp, metadata=metadata)
        else:
            torch.save({wrap_key: dict(sd)} if wrap_key else dict(sd), tmp)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
