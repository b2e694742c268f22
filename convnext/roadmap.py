"""The paper's modernization roadmap (Liu et al. 2022, Figure 2): ResNet-50 -> ConvNeXt-T in thirteen steps.

One frozen `RoadmapConfig` describes a ResNet-ish / ConvNeXt-ish network; `STEP_CONFIGS` is the table of the
thirteen steps, each differing from the previous by exactly the change the paper describes; `STEPS` maps each
registered name (`roadmap_00_resnet50` ... `roadmap_12_convnext_tiny`) to a builder taking overrides.

Choices the paper leaves open, made once here for every step:
- Downsampling inside blocks (steps 00-11) is ResNet v1.5's (torchvision, the paper's baseline): the spatial
  conv of a stage's first block has stride 2 and the shortcut is a strided 1x1 conv + norm.
- A conv has a bias unless a BatchNorm follows it directly; weights start as ConvNeXt's (trunc_normal 0.02,
  zero bias) in every step, so initialisation is not one of the differences between steps.
- The stem is conv + norm + activation as in ResNet; the patchify stem (step 03) swaps the 7x7/2 conv and the
  max-pool for a 4x4/4 conv; "one activation per block" (step 09) removes the stem's activation too, and
  step 12 adds the head norm and the separate downsampling layers, leaving exactly ConvNeXt-T.
- Layer scale is a setting of the modern recipe (the paper's Table 5), so it is off in every config before
  step 12 (ConvNeXt-T has it built in); the roadmap ladder passes `layer_scale_init` to steps 01-11.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
from torch import nn

from convnext.model import ConvNeXt, ConvNeXtConfig, DropPath, LayerNorm2d, UnknownOptionError


@dataclass(frozen=True)
class RoadmapConfig:
    depths: tuple[int, ...] = (3, 4, 6, 3)  # blocks per stage
    dims: tuple[int, ...] = (64, 128, 256, 512)  # per stage: bottleneck inner width / inverted-bottleneck trunk width
    stem: Literal["resnet", "patchify"] = "resnet"  # 7x7/2 conv + 3x3/2 max-pool, or a patch_size x patch_size conv
    stem_dim: int = 64  # channels out of the stem
    patch_size: int = 4  # the stem's total stride: 4 for 224px images, 2 or 1 for 32px CIFAR images
    block: Literal["bottleneck", "inverted"] = "bottleneck"  # 1x1 down, kxk, 1x1 up (out 4*dim) / 1x1 up ... (out dim)
    depthwise: bool = False  # the kxk conv has one group per channel (ResNeXt-ify taken to the limit)
    kernel_size: int = 3
    dw_first: bool = False  # inverted block only: the kxk conv comes before the 1x1 expansion ("moving it up")
    act: Literal["relu", "gelu"] = "relu"
    acts: Literal["all", "one"] = "all"  # after every conv but the last and after the sum / only between the 1x1s
    norms: Literal["all", "one"] = "all"  # after every conv / only after the block's first conv
    norm: Literal["bn", "ln"] = "bn"
    downsample: Literal["block", "separate"] = "block"  # stride-2 first block / LN + 2x2 stride-2 conv between stages
    layer_scale_init: float = 0.0  # per-channel gamma on the residual branch; 0 = none
    in_chans: int = 3
    num_classes: int = 1000
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly to this over all blocks

    def with_(self, **overrides) -> RoadmapConfig:
        return replace(self, **overrides)


def _norm(kind: str, dim: int) -> nn.Module:
    return nn.BatchNorm2d(dim) if kind == "bn" else LayerNorm2d(dim, eps=1e-6)


def _act(kind: str) -> nn.Module:
    return nn.ReLU(inplace=True) if kind == "relu" else nn.GELU()


class ConvUnit(nn.Sequential):
    """conv -> optional norm -> optional activation; the conv has a bias unless a BatchNorm follows it."""

    def __init__(self, cin: int, cout: int, k: int, cfg: RoadmapConfig, *, stride=1, groups=1, norm=True, act=False):
        layers = {"conv": nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=not (norm and cfg.norm == "bn"))}
        if norm:
            layers["norm"] = _norm(cfg.norm, cout)
        if act:
            layers["act"] = _act(cfg.act)
        super().__init__(OrderedDict(layers))


class RoadmapBlock(nn.Module):
    """A residual block of three convs: act?(shortcut(x) + drop_path(gamma * convs(x))), on (B, C, H, W).

    bottleneck:        1x1 cin->d,  kxk d->d (groups),  1x1 d->4d      (out 4d)
    inverted:          1x1 cin->4d, kxk dw 4d,          1x1 4d->d      (out d)
    inverted dw_first: kxk dw cin,  1x1 cin->4d,        1x1 4d->d      (out d; ConvNeXt's order)
    The kxk conv carries the stride. norms="one" keeps the norm after the first conv, acts="one" keeps the
    activation after the second: ConvNeXt's LN after the depthwise conv and GELU between the 1x1s.
    """

    def __init__(self, cin: int, dim: int, stride: int, cfg: RoadmapConfig, drop_path: float = 0.0):
        super().__init__()
        k, wide = cfg.kernel_size, 4 * dim
        if cfg.block == "bottleneck":
            spec = [(cin, dim, 1, 1, 1), (dim, dim, k, stride, dim if cfg.depthwise else 1), (dim, wide, 1, 1, 1)]
        elif not cfg.dw_first:
            spec = [(cin, wide, 1, 1, 1), (wide, wide, k, stride, wide if cfg.depthwise else 1), (wide, dim, 1, 1, 1)]
        else:
            spec = [(cin, cin, k, stride, cin if cfg.depthwise else 1), (cin, wide, 1, 1, 1), (wide, dim, 1, 1, 1)]
        cout = spec[-1][1]
        norm_at = {0, 1, 2} if cfg.norms == "all" else {0}
        act_at = {0, 1} if cfg.acts == "all" else {1}
        self.convs = nn.Sequential(
            *(
                ConvUnit(i, o, kk, cfg, stride=s, groups=g, norm=n in norm_at, act=n in act_at)
                for n, (i, o, kk, s, g) in enumerate(spec)
            )
        )
        self.gamma = nn.Parameter(torch.full((cout,), cfg.layer_scale_init)) if cfg.layer_scale_init > 0 else None
        self.drop_path = DropPath(drop_path)
        project = stride != 1 or cin != cout
        self.shortcut = ConvUnit(cin, cout, 1, cfg, stride=stride) if project else nn.Identity()
        self.act = _act(cfg.act) if cfg.acts == "all" else nn.Identity()  # ResNet's ReLU after the sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.convs(x)
        if self.gamma is not None:
            y = y * self.gamma[:, None, None]
        return self.act(self.shortcut(x) + self.drop_path(y))


class RoadmapStage(nn.Module):
    def __init__(self, cin: int, dim: int, depth: int, stride: int, cfg: RoadmapConfig, drop_paths: list[float]):
        super().__init__()
        blocks = []
        for i in range(depth):
            blocks.append(RoadmapBlock(cin, dim, stride if i == 0 else 1, cfg, drop_paths[i]))
            cin = blocks[-1].convs[-1].conv.out_channels
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class RoadmapNet(nn.Module):
    """stem -> four stages (the first block of stages 2-4 downsamples) -> global average pool -> linear head.

    Steps 00-11 of the roadmap; step 12 (separate downsampling layers) is built as `ConvNeXt` itself.
    """

    def __init__(self, cfg: RoadmapConfig):
        super().__init__()
        if cfg.downsample != "block":
            raise ValueError("RoadmapNet downsamples inside blocks; build separate downsampling with build_roadmap()")
        self.cfg = cfg
        self.stem = _stem(cfg)
        n = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # linear over all blocks
        self.stages = nn.ModuleList()
        cin, start = cfg.stem_dim, 0
        for i, (depth, dim) in enumerate(zip(cfg.depths, cfg.dims)):
            stage = RoadmapStage(cin, dim, depth, 1 if i == 0 else 2, cfg, rates[start : start + depth])
            self.stages.append(stage)
            cin, start = stage.blocks[-1].convs[-1].conv.out_channels, start + depth
        self.num_features = cin
        self.head = nn.Linear(cin, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> last stage's map (B, C, H/32, W/32) with the default patch size."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))  # (B, C)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that take no weight decay: biases, norms, layer scale (all 1-D)."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1}


def _stem(cfg: RoadmapConfig) -> nn.Sequential:
    """ResNet: 7x7/2 conv + norm + act + 3x3/2 max-pool at patch_size 4; 7x7/2 conv only at 2; 3x3/1 conv at 1.

    Patchify: a patch_size x patch_size conv with stride patch_size + norm (+ act while blocks have all theirs).
    """
    p = cfg.patch_size
    if p not in (1, 2, 4) and cfg.stem == "resnet":
        raise ValueError(f"patch_size: the ResNet stem takes 1, 2 or 4, got {p}")
    if cfg.stem == "resnet":
        k, stride = (7, 2) if p >= 2 else (3, 1)
    else:
        k, stride = p, p
    conv = nn.Conv2d(cfg.in_chans, cfg.stem_dim, k, stride, (k // 2) if cfg.stem == "resnet" else 0)
    conv.bias = None if cfg.norm == "bn" else conv.bias
    layers = {"conv": conv, "norm": _norm(cfg.norm, cfg.stem_dim)}
    if cfg.acts == "all":
        layers["act"] = _act(cfg.act)
    if cfg.stem == "resnet" and p == 4:
        layers["pool"] = nn.MaxPool2d(3, 2, 1)
    return nn.Sequential(OrderedDict(layers))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def convnext_config(cfg: RoadmapConfig) -> ConvNeXtConfig:
    """The ConvNeXtConfig of a separate-downsampling roadmap config; raises if the config is not a ConvNeXt."""
    convnext_like = dict(
        stem="patchify", block="inverted", depthwise=True, dw_first=True, act="gelu", acts="one", norms="one", norm="ln"
    )
    differ = [k for k, v in convnext_like.items() if getattr(cfg, k) != v]
    if differ or cfg.stem_dim != cfg.dims[0]:
        raise ValueError(f"separate downsampling is built as ConvNeXt, which needs {convnext_like} (differs: {differ})")
    return ConvNeXtConfig(
        depths=cfg.depths,
        dims=cfg.dims,
        layer_scale_init=cfg.layer_scale_init,
        kernel_size=cfg.kernel_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        num_classes=cfg.num_classes,
        drop_path_rate=cfg.drop_path_rate,
    )


def build_roadmap(cfg: RoadmapConfig) -> nn.Module:
    """A RoadmapNet, or for separate downsampling (step 12) the ConvNeXt of model.py itself."""
    return ConvNeXt(convnext_config(cfg)) if cfg.downsample == "separate" else RoadmapNet(cfg)


def _steps() -> dict[str, RoadmapConfig]:
    """The thirteen steps; each line is the previous config plus the paper's change."""
    s00 = RoadmapConfig()  # torchvision ResNet-50 (v1.5)
    s01 = s00  # the modern training recipe: same model
    s02 = s01.with_(depths=(3, 3, 9, 3))  # stage compute ratio of Swin-T
    s03 = s02.with_(stem="patchify")  # 4x4 stride-4 "patchify" stem
    s04 = s03.with_(depthwise=True, stem_dim=96, dims=(96, 192, 384, 768))  # ResNeXt-ify: depthwise, width 64 -> 96
    s05 = s04.with_(block="inverted")  # inverted bottleneck (hidden 4x, trunk 96..768)
    s06 = s05.with_(dw_first=True)  # move the depthwise conv up
    s07 = s06.with_(kernel_size=7)  # large kernel
    s08 = s07.with_(act="gelu")  # ReLU -> GELU
    s09 = s08.with_(acts="one")  # fewer activations
    s10 = s09.with_(norms="one")  # fewer normalization layers
    s11 = s10.with_(norm="ln")  # BatchNorm -> LayerNorm
    s12 = s11.with_(downsample="separate", layer_scale_init=1e-6)  # LN + 2x2/2 conv between stages: ConvNeXt-T
    names = [
        "resnet50", "modern_recipe", "stage_ratio", "patchify_stem", "resnextify", "inverted_bottleneck",
        "dwconv_up", "kernel7", "gelu", "fewer_acts", "fewer_norms", "layernorm", "convnext_tiny",
    ]  # fmt: skip
    configs = [s00, s01, s02, s03, s04, s05, s06, s07, s08, s09, s10, s11, s12]
    return {f"roadmap_{i:02d}_{name}": cfg for i, (name, cfg) in enumerate(zip(names, configs))}


STEP_CONFIGS: dict[str, RoadmapConfig] = _steps()

# The paper's ImageNet-1k numbers per step (top-1, GMACs read off Figure 2; the end points are exact).
PAPER: dict[str, tuple[float, float]] = dict(
    zip(
        STEP_CONFIGS,
        [(76.1, 4.1), (78.8, 4.1), (79.4, 4.5), (79.5, 4.4), (80.5, 5.3), (80.6, 4.6), (79.9, 4.1),
         (80.6, 4.2), (80.6, 4.2), (81.3, 4.2), (81.4, 4.2), (81.5, 4.2), (82.0, 4.47)],
    )
)  # fmt: skip


def step_builder(cfg: RoadmapConfig) -> Callable[..., nn.Module]:
    """build(**overrides) for one step: any RoadmapConfig field (num_classes, patch_size, kernel_size, ...)."""
    allowed = {f.name for f in fields(RoadmapConfig)}

    def build(**overrides) -> nn.Module:
        unknown = set(overrides) - allowed
        if unknown:
            raise UnknownOptionError(f"unknown option(s) {sorted(unknown)}; RoadmapConfig takes {sorted(allowed)}")
        return build_roadmap(cfg.with_(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}))

    return build


STEPS: dict[str, Callable[..., nn.Module]] = {name: step_builder(cfg) for name, cfg in STEP_CONFIGS.items()}


def step_index(name: str) -> int:
    """'roadmap_07_kernel7' -> 7."""
    m = re.match(r"roadmap_(\d\d)_", name)
    if not m:
        raise ValueError(f"not a roadmap step name: {name!r}")
    return int(m.group(1))
