"""State-dict layouts of the published ConvNeXt implementations, and conversion to and from ours.

A layout is a table of key templates `(ours, theirs)` tried in order. `{i}` is a stage index, `{j}` a
block index; torchvision interleaves stages and downsampling layers, so its templates also use `{2i}`
(downsampling before stage i) and `{2i+1}` (the blocks of stage i). Templates match key prefixes, so one
rule maps `.weight` and `.bias` alike. Tensors whose shape differs between layouts (GRN, torchvision's
layer scale, 1x1 convolutions stored as 4-D) are reshaped on the way.

Our layout (model.py): `stem.0` conv, `stem.1` LN, `stages.i.downsample.{0,1}` (LN, conv; none in stage 0),
`stages.i.blocks.j.{dwconv,norm,pwconv1,pwconv2,gamma,grn.weight,grn.bias}`, `norm`, `head`. timm's own options
keep timm's names and exist only in the ours and timm layouts (`TIMM_ONLY`): overlapping stems (`stem.0`, `stem.1`
or `stem.2` convs, then the norm), SimpleNorm (norms without a bias), `norm_pre` (head norm first) and
`pre_logits.fc` (timm's `head.pre_logits.fc`, the MLP head).

FCMAE pre-training checkpoints (read only, detected as "fcmae") hold an encoder under `encoder.` beside the
decoder (`proj`, `mask_token`, `decoder`, `pred`): the official `*_fcmae.pt` files, whose encoder is a
MinkowskiEngine SparseConvNeXtV2, and `convnext pretrain` runs (our layout under `encoder.`). `split_fcmae` keeps
the encoder, as a dense state dict in its own layout, and names what it drops.

`shape_config` reads what a state dict's shapes say about the model it was made with.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

LAYOUTS = ("ours", "official", "timm", "torchvision", "hf")
_B = "stages.{i}.blocks.{j}."  # our block prefix

_OFFICIAL = [
    ("stem.0.", "downsample_layers.0.0."),
    ("stem.1.", "downsample_layers.0.1."),
    ("stages.{i}.downsample.", "downsample_layers.{i}."),
    (_B + "grn.weight", "stages.{i}.{j}.grn.gamma"),
    (_B + "grn.bias", "stages.{i}.{j}.grn.beta"),
    (_B, "stages.{i}.{j}."),
    ("norm.", "norm."),
    ("head.", "head."),
]
_OFFICIAL_ISOTROPIC = [
    ("stem.0.", "stem."),
    ("stages.0.blocks.{j}.grn.weight", "blocks.{j}.grn.gamma"),
    ("stages.0.blocks.{j}.grn.bias", "blocks.{j}.grn.beta"),
    ("stages.0.blocks.{j}.", "blocks.{j}."),
    ("norm.", "norm."),
    ("head.", "head."),
]
_TIMM = [
    ("stem.", "stem."),
    ("stages.{i}.downsample.", "stages.{i}.downsample."),
    (_B + "dwconv.", "stages.{i}.blocks.{j}.conv_dw."),
    (_B + "pwconv1.", "stages.{i}.blocks.{j}.mlp.fc1."),
    (_B + "pwconv2.", "stages.{i}.blocks.{j}.mlp.fc2."),
    (_B + "grn.", "stages.{i}.blocks.{j}.mlp.grn."),
    (_B, "stages.{i}.blocks.{j}."),  # norm, gamma
    ("norm_pre.", "norm_pre."),  # head norm first
    ("norm.", "head.norm."),
    ("pre_logits.fc.", "head.pre_logits.fc."),  # MLP head
    ("head.", "head.fc."),
]
_TORCHVISION = [
    ("stem.0.", "features.0.0."),
    ("stem.1.", "features.0.1."),
    ("stages.{i}.downsample.", "features.{2i}."),
    (_B + "dwconv.", "features.{2i+1}.{j}.block.0."),
    (_B + "norm.", "features.{2i+1}.{j}.block.2."),
    (_B + "pwconv1.", "features.{2i+1}.{j}.block.3."),
    (_B + "pwconv2.", "features.{2i+1}.{j}.block.5."),
    (_B + "gamma", "features.{2i+1}.{j}.layer_scale"),
    ("norm.", "classifier.0."),
    ("head.", "classifier.2."),
]
_HF = [  # after the model prefix ("convnext." or "convnextv2.") is taken off
    ("stem.0.", "embeddings.patch_embeddings."),
    ("stem.1.", "embeddings.layernorm."),
    ("stages.{i}.downsample.", "encoder.stages.{i}.downsampling_layer."),
    (_B + "norm.", "encoder.stages.{i}.layers.{j}.layernorm."),
    (_B + "gamma", "encoder.stages.{i}.layers.{j}.layer_scale_parameter"),
    (_B, "encoder.stages.{i}.layers.{j}."),  # dwconv, pwconv1, pwconv2, grn.weight, grn.bias
    ("norm.", "layernorm."),
    ("head.", "classifier."),
]
_HF_PREFIXES = ("convnextv2.", "convnext.")


@functools.cache
def _compile(template: str) -> re.Pattern:
    fields = {"{i}": r"(?P<i>\d+)", "{j}": r"(?P<j>\d+)", "{2i}": r"(?P<even>\d+)", "{2i+1}": r"(?P<odd>\d+)"}
    parts = re.split(r"(\{i\}|\{j\}|\{2i\}|\{2i\+1\})", template)
    return re.compile("".join(fields.get(p, re.escape(p)) for p in parts))


def _fill(template: str, i: int | None, j: int | None) -> str:
    values = {"{i}": i, "{j}": j, "{2i}": None if i is None else 2 * i, "{2i+1}": None if i is None else 2 * i + 1}
    parts = re.split(r"(\{i\}|\{j\}|\{2i\}|\{2i\+1\})", template)
    return "".join(str(values[p]) if p in values else p for p in parts)


def _indices(m: re.Match) -> tuple[int | None, int | None] | None:
    """(stage, block) of a match; None when an interleaved torchvision index has the wrong parity."""
    g = m.groupdict()
    i = int(g["i"]) if g.get("i") is not None else None
    if g.get("even") is not None:
        if int(g["even"]) % 2:
            return None
        i = int(g["even"]) // 2
    if g.get("odd") is not None:
        if int(g["odd"]) % 2 == 0:
            return None
        i = (int(g["odd"]) - 1) // 2
    return i, int(g["j"]) if g.get("j") is not None else None


def _rename(key: str, rules: list[tuple[str, str]], forward: bool) -> str | None:
    """Map one key through the first matching rule (ours -> theirs if `forward`); None if no rule matches."""
    for ours, theirs in rules:
        src, dst = (ours, theirs) if forward else (theirs, ours)
        m = _compile(src).match(key)
        if m is None:
            continue
        idx = _indices(m)
        if idx is None:
            continue
        return _fill(dst, *idx) + key[m.end() :]
    return None


def _is_isotropic_ours(sd: dict[str, Tensor]) -> bool:
    return not any(k.startswith("stages.1.") for k in sd)


def detect_layout(sd: dict[str, Tensor]) -> str:
    """Which implementation a (unwrapped) state dict comes from: one of `LAYOUTS`."""
    keys = list(sd)

    def has(pred) -> bool:
        return any(pred(k) for k in keys)

    if has(lambda k: k.startswith("features.0.0.") or re.match(r"features\.\d+\.\d+\.block\.", k)):
        return "torchvision"
    if has(lambda k: "embeddings.patch_embeddings." in k):
        return "hf"
    if has(lambda k: k.startswith(FCMAE_ENCODER)):
        inner = {k[len(FCMAE_ENCODER) :]: v for k, v in sd.items() if k.startswith(FCMAE_ENCODER)}
        try:
            detect_layout(inner)
            return "fcmae"
        except ValueError:
            pass
    if has(lambda k: k.startswith("downsample_layers.")) or (
        "stem.weight" in sd and has(lambda k: k.startswith("blocks."))
    ):
        return "official"
    if has(lambda k: ".conv_dw." in k or ".mlp.fc1." in k or k.startswith(("head.fc.", "head.norm."))):
        return "timm"
    if has(lambda k: k.startswith("stem.0.") or re.match(r"stages\.\d+\.blocks\.\d+\.dwconv\.", k)):
        return "ours"
    shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
    raise ValueError(f"unrecognised ConvNeXt checkpoint layout (keys: {shown}); expected one of {LAYOUTS}")


def to_ours(sd: dict[str, Tensor], layout: str) -> dict[str, Tensor]:
    """Rename (and reshape) a state dict from `layout` into ours. Unknown keys pass through unchanged."""
    if layout == "fcmae":
        encoder, _ = split_fcmae(sd)
        return to_ours(encoder, detect_layout(encoder))
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    if layout == "ours":
        return {k: _squeeze(k, v) for k, v in sd.items()}
    rules = _rules(layout, isotropic=layout == "official" and any(k.startswith("blocks.") for k in sd))
    out = {}
    for key, value in sd.items():
        if layout == "hf":
            key = next((key[len(p) :] for p in _HF_PREFIXES if key.startswith(p)), key)
        new = _rename(key, rules, forward=False) or key
        out[new] = _squeeze(new, value)
    return out


FCMAE_ENCODER = "encoder."
_SPARSE_WRAPPERS = ("ln", "linear")  # MinkowskiLayerNorm.ln, MinkowskiLinear.linear


def split_fcmae(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """An FCMAE checkpoint -> (its encoder as a dense state dict in its own layout, the keys dropped: the decoder's).

    The official sparse encoder is converted as the official fine-tuning code does (`remap_checkpoint_keys`):
    MinkowskiEngine kernels `*.kernel` of shape (k*k, C) (depthwise) or (k*k, C_in, C_out) become (C, 1, k, k) and
    (C_out, C_in, k, k) weights, (1, C) biases become (C,), `norm.ln.*` and `pwconv1.linear.*` lose the wrapper's
    name; GRN's (1, C) gamma/beta are left to `to_ours`, which flattens every GRN shape.
    """
    encoder, dropped = {}, []
    for key, value in sd.items():
        if not key.startswith(FCMAE_ENCODER):
            dropped.append(key)
            continue
        parts = [p for p in key[len(FCMAE_ENCODER) :].split(".") if p not in _SPARSE_WRAPPERS]
        if parts[-1] == "kernel":
            parts[-1], value = "weight", _dense_kernel(value)
        elif parts[-1] == "bias" and value.ndim > 1:
            value = value.reshape(-1)
        encoder[".".join(parts)] = value
    return encoder, dropped


def _dense_kernel(v: Tensor) -> Tensor:
    """A MinkowskiEngine convolution kernel -> a dense Conv2d weight (the official remap, axes included)."""
    if v.ndim == 3:  # (k*k, C_in, C_out): a strided convolution (the downsampling layers)
        kv, c_in, c_out = v.shape
        k = math.isqrt(kv)
        return v.permute(2, 1, 0).reshape(c_out, c_in, k, k).transpose(3, 2).contiguous()
    kv, c = v.shape  # (k*k, C): depthwise
    k = math.isqrt(kv)
    return v.permute(1, 0).reshape(c, 1, k, k).transpose(3, 2).contiguous()


def timm_options(sd: Mapping[str, Tensor]) -> list[str]:
    """timm's own options a state dict in our layout has (none of them: []): what only the timm layout holds."""
    stem = shape_config(sd)
    found = [f"stem_type={stem['stem_type']!r}"] if stem.get("stem_type", "patch") != "patch" else []
    found += ["norm_layer='simplenorm'"] if stem.get("norm_layer") == "simplenorm" else []
    found += ["head_norm_first"] if "norm_pre.weight" in sd else []
    return found + (["head_hidden_size"] if "pre_logits.fc.weight" in sd else [])


def from_ours(sd: dict[str, Tensor], layout: str, conv_mlp: bool | None = None) -> dict[str, Tensor]:
    """Rename (and reshape) our state dict into `layout`, so it loads into that implementation.

    conv_mlp (timm only): store the block MLP as 1x1 convolutions (O, I, 1, 1), as timm's zepto, atto, femto,
        pico, nano and tiny_hnf do; None picks that for first widths <= 80 (exactly those five) or a head norm
        first, and Linear weights otherwise.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    if layout == "ours":
        return dict(sd)
    extra = timm_options(sd)
    if extra and layout != "timm":
        raise ValueError(f"the {layout!r} layout cannot hold timm's options {', '.join(extra)}: convert to 'timm' "
                         "(or 'ours') instead")  # fmt: skip
    isotropic = _is_isotropic_ours(sd)
    v2 = any(".grn." in k for k in sd)
    if isotropic and layout != "official":
        raise ValueError(f"the isotropic ConvNeXt exists only in the official layout, not in {layout!r}")
    if v2 and layout == "torchvision":
        raise ValueError("torchvision has no ConvNeXt V2 (GRN); convert to 'official', 'timm' or 'hf' instead")
    if conv_mlp is None:
        width = sd.get("stages.0.blocks.0.dwconv.weight", sd.get("stem.0.weight"))
        conv_mlp = layout == "timm" and (("norm_pre.weight" in sd) or (width is not None and width.shape[0] <= 80))
    rules = _rules(layout, isotropic)
    prefix = ("convnextv2." if v2 else "convnext.") if layout == "hf" else ""
    out = {}
    for key, value in sd.items():
        new = _rename(key, rules, forward=True)
        if new is None:
            raise ValueError(f"key {key!r} has no counterpart in the {layout!r} layout")
        if prefix and not new.startswith("classifier."):
            new = prefix + new
        out[new] = _unsqueeze(key, value, layout, conv_mlp)
    return out


def _rules(layout: str, isotropic: bool) -> list[tuple[str, str]]:
    if layout == "official":
        return _OFFICIAL_ISOTROPIC if isotropic else _OFFICIAL
    return {"timm": _TIMM, "torchvision": _TORCHVISION, "hf": _HF}[layout]


def _squeeze(key: str, v: Tensor) -> Tensor:
    """Theirs -> our shapes: GRN (1,1,1,C) and layer scale (C,1,1) -> (C,); 1x1 conv MLP (O,I,1,1) -> (O,I)."""
    if key.endswith((".gamma", ".grn.weight", ".grn.bias")) and v.ndim > 1:
        return v.reshape(-1)
    if ".pwconv" in key and key.endswith(".weight") and v.ndim == 4:
        return v.reshape(v.shape[0], v.shape[1])
    return v


def _unsqueeze(key: str, v: Tensor, layout: str, conv_mlp: bool = False) -> Tensor:
    """Our shapes -> theirs (the inverse of `_squeeze` for each layout)."""
    if conv_mlp and ".pwconv" in key and key.endswith(".weight"):
        return v.reshape(*v.shape, 1, 1)
    if ".grn." in key and layout in ("official", "hf"):
        return v.reshape(1, 1, 1, -1)
    if key.endswith(".gamma") and layout == "torchvision":
        return v.reshape(-1, 1, 1)
    return v


def shape_config(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """The `ConvNeXtConfig` fields the shapes of a state dict in our layout fix: `num_classes` (0: no head), `in_chans`,
    `patch_size` and `stem_type` (the stem), `head_norm_first` and `head_hidden_size` (the head), and, when it holds
    blocks, `depths`, `dims`, `grn`, `layer_scale_init` (1e-6 where it has layer scale), `kernel_size`, `stem_norm`,
    `mlp_ratio` and `norm_layer`. Drop path, dropout and the norms' eps leave no trace; a field it cannot read is left
    out (a state dict of another family gives what it can)."""
    out: dict[str, Any] = {}
    head, stem = sd.get("head.weight"), sd.get("stem.0.weight")
    blocks = sorted({(int(m[1]), int(m[2])) for k in sd if (m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", k))})
    if head is not None and head.ndim == 2:
        out["num_classes"] = int(head.shape[0])
    elif "norm.weight" in sd or "norm_pre.weight" in sd or blocks:
        out["num_classes"] = 0  # a backbone without a head
    if "norm_pre.weight" in sd or "pre_logits.fc.weight" in sd:
        out["head_norm_first"] = "norm_pre.weight" in sd
        out["head_hidden_size"] = int(sd["pre_logits.fc.weight"].shape[0]) if "pre_logits.fc.weight" in sd else 0
    convs = [i for i in range(4) if getattr(sd.get(f"stem.{i}.weight"), "ndim", 0) == 4]  # stem.i is a conv
    if stem is not None and stem.ndim == 4:
        out |= {"in_chans": int(stem.shape[1]), "patch_size": int(stem.shape[-1]) if convs == [0] else 4}
        out["stem_type"] = {(0,): "patch", (0, 1): "overlap", (0, 2): "overlap_act"}.get(tuple(convs), "patch")
    first = "stages.0.blocks.0."
    if stem is None or first + "dwconv.weight" not in sd:
        return out
    stages = sorted({i for i, _ in blocks})
    dims = tuple(int(sd[f"stages.{i}.blocks.0.dwconv.weight"].shape[0]) for i in stages)
    if out["stem_type"] == "overlap" and stem.shape[0] != dims[0]:
        out["stem_type"] = "overlap_tiered"  # the first conv narrower than the second
    return out | {
        "depths": tuple(1 + max(j for i2, j in blocks if i2 == i) for i in stages),
        "dims": dims,
        "grn": first + "grn.weight" in sd,
        "layer_scale_init": 1e-6 if first + "gamma" in sd else 0.0,
        "kernel_size": int(sd[first + "dwconv.weight"].shape[-1]),
        "stem_norm": f"stem.{convs[-1] + 1}.weight" in sd,
        "mlp_ratio": int(sd[first + "pwconv1.weight"].shape[0]) // dims[0],
        "norm_layer": "layernorm" if first + "norm.bias" in sd else "simplenorm",
    }
