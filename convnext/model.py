"""ConvNeXt V1 and V2 ("A ConvNet for the 2020s", Liu et al. 2022; "ConvNeXt V2", Woo et al. 2023).

The whole network, smallest part first: LayerNorm2d, SimpleNorm -> GRN -> DropPath -> Block -> Stage -> stem ->
ConvNeXt. One frozen `ConvNeXtConfig` describes every variant; `VARIANTS`, at the end, is the table of them, timm's
own variants included (overlapping stems `_ols`, head norm first `_hnf`, SimpleNorm `zepto_rms`, MLP head
`large_mlp`: each is a config field, off by default).
This file imports only torch: no I/O, no downloads, no CLI.

Tensor layout: the trunk is NCHW (B, C, H, W) between blocks; inside a block the MLP runs channels-last
(B, H, W, C) so the two 1x1 convolutions are plain `nn.Linear`s, as in the official code.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class UnknownOptionError(TypeError, ValueError):
    """An option no config field takes: a TypeError, as for any unexpected keyword, and a ValueError, so the CLI
    reports it in one line (`--model.kwargs.foo 1`)."""


STEM_TYPES = ("patch", "overlap", "overlap_tiered", "overlap_act")  # timm's names for them
NORM_LAYERS = ("layernorm", "simplenorm")


@dataclass(frozen=True)
class ConvNeXtConfig:
    depths: tuple[int, ...] = (3, 3, 9, 3)  # blocks per stage; one entry = isotropic (no downsampling)
    dims: tuple[int, ...] = (96, 192, 384, 768)  # channels per stage
    grn: bool = False  # V2: Global Response Normalization after the GELU
    layer_scale_init: float = 1e-6  # gamma starts here; 0 disables layer scale (V2, isotropic default)
    kernel_size: int = 7  # depthwise kernel
    patch_size: int = 4  # stem patchify stride (4 for 224px ImageNet, 1 or 2 for 32px images, 16 isotropic)
    stem_norm: bool = True  # LayerNorm after the stem conv (off in the isotropic model)
    # "patch": one patch_size x patch_size conv, stride patch_size; "overlap": two 3x3 stride-2 convs (stride 4),
    # "overlap_tiered": the first of them half as wide, "overlap_act": a GELU between them (timm's _ols variants)
    stem_type: str = "patch"
    norm_layer: str = "layernorm"  # or "simplenorm": x / std(x) * weight, not centred, no bias (timm's zepto_rms)
    norm_eps: float = 1e-6  # every norm's eps (timm's xxlarge: 1e-5)
    head_norm_first: bool = False  # norm the final map, then pool (timm's _hnf); by default pool, then norm
    head_hidden_size: int = 0  # > 0: Linear + GELU of this width before the classifier (timm's large_mlp)
    mlp_ratio: int = 4  # inverted bottleneck expansion
    in_chans: int = 3
    num_classes: int = 1000  # 0 = features only (no head)
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly to this over all blocks
    drop_rate: float = 0.0  # dropout before the classifier
    head_init_scale: float = 1.0  # head weights and bias are multiplied by this at init

    def __post_init__(self) -> None:
        if self.stem_type not in STEM_TYPES or self.norm_layer not in NORM_LAYERS:
            raise ValueError(f"stem_type must be one of {STEM_TYPES} and norm_layer one of {NORM_LAYERS}, got "
                             f"{self.stem_type!r}, {self.norm_layer!r}")  # fmt: skip
        if self.stem_type != "patch" and self.patch_size != 4:
            raise ValueError(f"stem_type {self.stem_type!r} has stride 4; patch_size must be 4, got {self.patch_size}")
        if self.head_norm_first and self.head_hidden_size:
            raise ValueError("head_norm_first and head_hidden_size exclude each other (as in timm)")

    @property
    def isotropic(self) -> bool:
        return len(self.depths) == 1

    def with_(self, **overrides) -> ConvNeXtConfig:
        return replace(self, **overrides)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of an NCHW tensor (the official code's "channels_first" LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


class SimpleNorm(nn.Module):
    """timm's SimpleNorm over the last dim of (..., C): x / sqrt(var(x) + eps) * weight.

    Unlike LayerNorm it does not subtract the mean and has no bias; the variance is torch.var's (about the mean,
    divided by C - 1), as in timm."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.var(dim=-1, keepdim=True) + self.eps) * self.weight


class SimpleNorm2d(SimpleNorm):
    """SimpleNorm over the channel dim of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def make_norm(cfg: ConvNeXtConfig, dim: int, channels_first: bool = False) -> nn.Module:
    """The config's norm over `dim` channels: of (B, C, H, W) if `channels_first`, else of (..., C)."""
    if cfg.norm_layer == "simplenorm":
        return (SimpleNorm2d if channels_first else SimpleNorm)(dim, eps=cfg.norm_eps)
    return (LayerNorm2d if channels_first else nn.LayerNorm)(dim, eps=cfg.norm_eps)


class GRN(nn.Module):
    """Global Response Normalization (V2) on channels-last input (B, H, W, C).

    Each channel's L2 norm over space, divided by the mean norm over channels, re-weights the features.
    The norm is taken in fp32: in fp16 the sum of squares overflows (ConvNeXt-V2 issue #66).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))  # gamma; zero init makes GRN start as the identity
        self.bias = nn.Parameter(torch.zeros(dim))  # beta
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x.float(), ord=2, dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
        nx = (gx / (gx.mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype)
        return x + self.bias + self.weight * (x * nx)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability p (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """x + gamma * pwconv2(GRN?(GELU(pwconv1(LN(dwconv(x)))))), on (B, C, H, W)."""

    def __init__(self, dim: int, cfg: ConvNeXtConfig, drop_path: float = 0.0):
        super().__init__()
        k = cfg.kernel_size
        self.dwconv = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)
        self.norm = make_norm(cfg, dim)
        self.pwconv1 = nn.Linear(dim, cfg.mlp_ratio * dim)  # a 1x1 conv, as a Linear on (B, H, W, C)
        self.act = nn.GELU()
        self.grn = GRN(cfg.mlp_ratio * dim) if cfg.grn else nn.Identity()
        self.pwconv2 = nn.Linear(cfg.mlp_ratio * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), cfg.layer_scale_init)) if cfg.layer_scale_init > 0 else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(y)))))
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))  # (B, C, H, W)


class Stage(nn.Module):
    """Optional downsampling (LN + 2x2 conv stride 2) followed by `depth` blocks at one width."""

    def __init__(
        self, in_dim: int, dim: int, depth: int, cfg: ConvNeXtConfig, drop_paths: list[float], downsample: bool
    ):
        super().__init__()
        self.downsample = (
            nn.Sequential(make_norm(cfg, in_dim, channels_first=True), nn.Conv2d(in_dim, dim, 2, stride=2))
            if downsample
            else nn.Identity()
        )
        self.blocks = nn.ModuleList(Block(dim, cfg, drop_paths[i]) for i in range(depth))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            if self.grad_checkpointing and x.requires_grad:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


def make_stem(cfg: ConvNeXtConfig) -> nn.Sequential:
    """(B, in_chans, H, W) -> (B, dims[0], H / s, W / s), s = patch_size: the convs, then the norm (if stem_norm).

    The overlapping stems (stride 4) are timm's, with its module indices (stem.0 and stem.1 or stem.2 are the convs),
    so its weights keep their names; the tiered stem's first conv is dims[0] / 2 wide, rounded as timm's
    `make_divisible` does (to a multiple of 8, at least 8, never 10% below)."""
    c = cfg.dims[0]
    if cfg.stem_type == "patch":
        convs = [nn.Conv2d(cfg.in_chans, c, cfg.patch_size, stride=cfg.patch_size)]
    else:
        mid = c
        if cfg.stem_type == "overlap_tiered":
            mid = max(8, (c // 2 + 4) // 8 * 8)
            mid += 8 if mid < 0.9 * (c // 2) else 0
        act = [nn.GELU()] if cfg.stem_type == "overlap_act" else []
        convs = [nn.Conv2d(cfg.in_chans, mid, 3, stride=2, padding=1), *act, nn.Conv2d(mid, c, 3, stride=2, padding=1)]
    return nn.Sequential(*convs, make_norm(cfg, c, channels_first=True) if cfg.stem_norm else nn.Identity())


class ConvNeXt(nn.Module):
    """stem -> stages -> global average pool -> norm -> (Linear + GELU) -> (dropout) -> linear head.

    The hierarchical model has four stages (strides 4, 8, 16, 32 with the default patch size 4);
    the isotropic model (`depths` of length 1) has one stage at stride `patch_size` and no stem norm.
    With `head_norm_first` the norm acts on the final map before pooling (`norm_pre`, in `forward_head`, so
    `forward_features` is the last stage's map for every variant); `head_hidden_size` adds timm's MLP head.
    """

    def __init__(self, cfg: ConvNeXtConfig):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = cfg.dims[-1]  # the last stage's width
        self.head_hidden_size = cfg.head_hidden_size or self.num_features  # what the classifier reads
        self.stem = make_stem(cfg)

        n = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # linear over all blocks
        self.stages = nn.ModuleList()
        in_dim, start = cfg.dims[0], 0
        for i, (depth, dim) in enumerate(zip(cfg.depths, cfg.dims)):
            self.stages.append(Stage(in_dim, dim, depth, cfg, rates[start : start + depth], downsample=i > 0))
            in_dim, start = dim, start + depth
        self.feature_info = [
            {"num_chs": d, "reduction": cfg.patch_size * 2**i, "module": f"stages.{i}"} for i, d in enumerate(cfg.dims)
        ]

        c, hnf = self.num_features, cfg.head_norm_first
        self.norm_pre = make_norm(cfg, c, channels_first=True) if hnf else nn.Identity()  # on the final map
        self.norm = nn.Identity() if hnf else make_norm(cfg, c)  # head norm, on pooled features
        self.pre_logits = (
            nn.Sequential(OrderedDict(fc=nn.Linear(c, cfg.head_hidden_size), act=nn.GELU()))
            if cfg.head_hidden_size
            else nn.Identity()
        )
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(self.head_hidden_size, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.apply(init_weights)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(cfg.head_init_scale)
                self.head.bias.mul_(cfg.head_init_scale)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> last stage's map (B, C, H/32, W/32)."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs, NCHW (strides 4, 8, 16, 32 for the hierarchical model), with timm's contract: `indices`
        = the last n stages (int), those stages (a sequence; negative counts from the end) or all (None);
        `stop_early` skips the stages after the last one taken; returns the list, or (final features, list) unless
        `intermediates_only`. `norm` applies `norm_pre` to the last stage's map, as timm does: it changes nothing
        but with `head_norm_first`, where, unlike timm, the final features stay un-normed (`forward_head` norms
        them)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', not {output_fmt!r}")
        n = len(self.stages)
        if indices is None:
            take = list(range(n))
        elif isinstance(indices, int):
            if not 0 < indices <= n:
                raise ValueError(f"indices={indices}: the model has {n} stages")
            take = list(range(n - indices, n))
        else:
            take = [i + n if i < 0 else i for i in indices]
            if any(not 0 <= i < n for i in take):
                raise ValueError(f"indices {list(indices)} out of range for {n} stages")
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages[: max(take) + 1] if stop_early else self.stages):
            x = stage(x)
            if i in take:
                outs.append(self.norm_pre(x) if norm and i == n - 1 else x)
        return outs if intermediates_only else (x, outs)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, h, w) -> logits (B, num_classes), or the features the classifier reads if `pre_logits`."""
        x = self.norm(self.norm_pre(x).mean(dim=(2, 3)))  # (B, C): one of the two norms is an identity
        x = self.pre_logits(x)  # (B, head_hidden_size)
        if pre_logits:
            return x
        return self.head(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh one for `num_classes` (0 = no head: forward returns features)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            init_weights(self.head)
        self.cfg = self.cfg.with_(num_classes=num_classes)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them (less memory, more time)."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that take no weight decay: biases, norms, layer scale, GRN (all 1-D)."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1}


class ConvNeXtFeatures(nn.Module):
    """A ConvNeXt as a multi-scale backbone: returns {"0": stride-4 map, ..., "3": stride-32 map}.

    `norms=True` puts a LayerNorm2d on each output, as the official detection/segmentation backbones do.
    `out_indices` picks stages; `out_channels` lists their widths (for FPN and friends).
    """

    def __init__(
        self,
        model: ConvNeXt,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        norms: bool = True,
        as_list: bool = False,
    ):
        super().__init__()
        n = len(model.stages)
        self.out_indices = tuple(i + n if i < 0 else i for i in out_indices)
        if not self.out_indices or any(not 0 <= i < n for i in self.out_indices):
            raise ValueError(f"out_indices {tuple(out_indices)} out of range for {n} stages")
        self.stem, self.stages = model.stem, model.stages[: max(self.out_indices) + 1]
        self.out_channels = [model.cfg.dims[i] for i in self.out_indices]
        self.strides = [model.feature_info[i]["reduction"] for i in self.out_indices]
        self.feature_info = FeatureInfo([model.feature_info[i] for i in self.out_indices])
        self.as_list = as_list
        self.norms = nn.ModuleDict(
            {str(i): LayerNorm2d(model.cfg.dims[i], eps=1e-6) if norms else nn.Identity() for i in self.out_indices}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor] | list[torch.Tensor]:
        x = self.stem(x)
        outs = {}
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs[str(i)] = self.norms[str(i)](x)
        return list(outs.values()) if self.as_list else outs


class FeatureInfo(list):
    """timm's `feature_info` of a features-only model: one dict per output (num_chs, reduction, module), with
    `channels()` and `reduction()`."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]


def init_weights(m: nn.Module) -> None:
    """trunc_normal(std=0.02) for conv and linear weights, zero bias (the official init)."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------- variants


def _v1(depths: tuple[int, ...], dims: tuple[int, ...]) -> ConvNeXtConfig:
    return ConvNeXtConfig(depths=depths, dims=dims)


def _v2(depths: tuple[int, ...], dims: tuple[int, ...]) -> ConvNeXtConfig:
    return ConvNeXtConfig(depths=depths, dims=dims, grn=True, layer_scale_init=0.0)


def _iso(depth: int, dim: int) -> ConvNeXtConfig:
    # The official isotropic models default to no layer scale; pass layer_scale_init=1e-6 for the trained L.
    return ConvNeXtConfig(depths=(depth,), dims=(dim,), patch_size=16, stem_norm=False, layer_scale_init=0.0)


def _widths(c: int) -> tuple[int, ...]:
    return (c, 2 * c, 4 * c, 8 * c)


SMALL, T, DEEP = (2, 2, 6, 2), (3, 3, 9, 3), (3, 3, 27, 3)
ZEPTO = ConvNeXtConfig(depths=(2, 2, 4, 2), dims=_widths(32), norm_layer="simplenorm")
VARIANTS: dict[str, ConvNeXtConfig] = {
    "convnext_zepto_rms": ZEPTO,
    "convnext_zepto_rms_ols": ZEPTO.with_(stem_type="overlap_act"),
    "convnext_atto": _v1(SMALL, _widths(40)),
    "convnext_atto_ols": _v1(SMALL, _widths(40)).with_(stem_type="overlap_tiered"),
    "convnext_femto": _v1(SMALL, _widths(48)),
    "convnext_femto_ols": _v1(SMALL, _widths(48)).with_(stem_type="overlap_tiered"),
    "convnext_pico": _v1(SMALL, _widths(64)),
    "convnext_pico_ols": _v1(SMALL, _widths(64)).with_(stem_type="overlap_tiered"),
    "convnext_nano": _v1((2, 2, 8, 2), _widths(80)),
    "convnext_nano_ols": _v1((2, 2, 8, 2), _widths(80)).with_(stem_type="overlap"),
    "convnext_tiny": _v1(T, _widths(96)),
    "convnext_tiny_hnf": _v1(T, _widths(96)).with_(head_norm_first=True),
    "convnext_small": _v1(DEEP, _widths(96)),
    "convnext_base": _v1(DEEP, _widths(128)),
    "convnext_large": _v1(DEEP, _widths(192)),
    "convnext_large_mlp": _v1(DEEP, _widths(192)).with_(head_hidden_size=1536),
    "convnext_xlarge": _v1(DEEP, _widths(256)),
    "convnext_xxlarge": _v1((3, 4, 30, 3), _widths(384)),
    "convnextv2_atto": _v2(SMALL, _widths(40)),
    "convnextv2_femto": _v2(SMALL, _widths(48)),
    "convnextv2_pico": _v2(SMALL, _widths(64)),
    "convnextv2_nano": _v2((2, 2, 8, 2), _widths(80)),
    "convnextv2_tiny": _v2(T, _widths(96)),
    "convnextv2_base": _v2(DEEP, _widths(128)),
    "convnextv2_large": _v2(DEEP, _widths(192)),
    "convnextv2_huge": _v2(DEEP, _widths(352)),
    "convnext_isotropic_small": _iso(18, 384),
    "convnext_isotropic_base": _iso(18, 768),
    "convnext_isotropic_large": _iso(36, 1024),
}
