"""ConvNeXt as a multi-scale backbone for torchvision's FPN, Faster R-CNN and Mask R-CNN (and for UperNet).

`build_backbone` turns any registered model into a `MultiScaleBackbone`: a dict of feature maps
{"0": stride 4, "1": stride 8, "2": stride 16, "3": stride 32} with a LayerNorm on each output (as the
official detection and segmentation backbones do), optional frozen stages and stochastic depth.

- hierarchical ConvNeXt (V1, V2): `convnext.model.ConvNeXtFeatures`;
- isotropic ConvNeXt (one stage at stride 16): a ViTDet-style simple pyramid (deconvolutions up to
  stride 4 and 8, max-pool down to 32), since the model itself has a single scale;
- any other registered model built as `stem` + `stages` (the roadmap steps).

`detector` wraps a backbone in torchvision's `FeaturePyramidNetwork` and hands it, unchanged, to
`torchvision.models.detection.FasterRCNN` or `MaskRCNN`. The torchvision ResNet-50 peers used by the
transfer benchmark live here too.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN, MaskRCNN, fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from convnext.constants import IMAGENET_MEAN, IMAGENET_STD
from convnext.dense.config import BackboneConfig
from convnext.model import ConvNeXt, ConvNeXtFeatures, DropPath, LayerNorm2d

log = logging.getLogger(__name__)


class MultiScaleBackbone(nn.Module):
    """features: image (B, 3, H, W) -> {"0": (B, C0, H/4, W/4), ..., "3": (B, C3, H/32, W/32)}.

    `out_channels` lists the widths of the returned maps (for FPN / UperNet); `frozen` names the modules
    whose weights are frozen: they stay in eval mode (no stochastic depth) whatever `train()` says.
    `trunk` is the classification model the features were cut from, kept (not as a submodule: its parameters
    are the features') so the optimizer can group them by layer for layer-wise lr decay.
    """

    def __init__(
        self,
        features: nn.Module,
        out_channels: list[int],
        frozen: list[nn.Module] | None = None,
        trunk: nn.Module | None = None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ):
        super().__init__()
        self.features = features
        self.out_channels = list(out_channels)
        self.__dict__["trunk"] = trunk  # unregistered on purpose (see above)
        self.mean, self.std = tuple(mean), tuple(std)
        self._frozen = list(frozen or [])  # plain list: the modules are already registered under `features`
        for m in self._frozen:
            m.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> MultiScaleBackbone:
        super().train(mode)
        for m in self._frozen:
            m.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.features(x)


class SimplePyramid(nn.Module):
    """Isotropic ConvNeXt (one stride-16 map of width D) -> strides 4/8/16/32 with widths D/4, D/2, D, D.

    As ViTDet: two 2x2 deconvolutions up to stride 4, one up to stride 8, identity at 16, max-pool to 32.
    """

    def __init__(self, model: ConvNeXt, norms: bool = True):
        super().__init__()
        d = model.cfg.dims[0]
        self.stem, self.stages = model.stem, model.stages
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(d, d // 2, 2, stride=2),
            LayerNorm2d(d // 2),
            nn.GELU(),
            nn.ConvTranspose2d(d // 2, d // 4, 2, 2),
        )
        self.up8 = nn.ConvTranspose2d(d, d // 2, 2, stride=2)
        self.out_channels = [d // 4, d // 2, d, d]
        self.norms = nn.ModuleDict(
            {str(i): LayerNorm2d(c) if norms else nn.Identity() for i, c in enumerate(self.out_channels)}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stages[0](self.stem(x))  # (B, D, H/16, W/16)
        maps = [self.up4(x), self.up8(x), x, F.max_pool2d(x, 2)]
        return {str(i): self.norms[str(i)](m) for i, m in enumerate(maps)}


class StagesFeatures(nn.Module):
    """Any model built as `stem` + `stages` (e.g. the roadmap steps): each stage's output, with a LayerNorm.

    The widths are read off one forward pass of a small image at construction.
    """

    def __init__(self, model: nn.Module, norms: bool = True, in_chans: int = 3):
        super().__init__()
        self.stem, self.stages = model.stem, model.stages
        was_training = model.training
        model.eval()  # BatchNorm steps (roadmap 00-10) must not update running stats on the probe
        with torch.no_grad():
            self.out_channels = [m.shape[1] for m in self._maps(torch.zeros(1, in_chans, 64, 64))]
        model.train(was_training)
        self.norms = nn.ModuleDict(
            {str(i): LayerNorm2d(c) if norms else nn.Identity() for i, c in enumerate(self.out_channels)}
        )

    def _maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, outs = self.stem(x), []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {str(i): self.norms[str(i)](m) for i, m in enumerate(self._maps(x))}


def set_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly from 0 to `rate` over every DropPath in `model` (in module order)."""
    paths = [m for m in model.modules() if isinstance(m, DropPath)]
    for i, m in enumerate(paths):
        m.p = rate * i / max(len(paths) - 1, 1)


def resize_stem(model: ConvNeXt, patch_size: int) -> None:
    """Give a ConvNeXt's patchify stem a new stride, keeping what it computes on content scaled to match.

    The kernel is upsampled (nearest) by r = new / old and divided by r^2: on an image enlarged r times, each
    output equals the old stem's on the original image. This is how a 32x32 CIFAR model (patch 1 or 2) becomes a
    stride-4 backbone for 320px detection.
    """
    conv = model.stem[0]
    old = conv.kernel_size[0]
    if old == patch_size:
        return
    w = F.interpolate(conv.weight.data, size=(patch_size, patch_size), mode="nearest") * (old / patch_size) ** 2
    new = nn.Conv2d(conv.in_channels, conv.out_channels, patch_size, stride=patch_size)
    new.weight.data.copy_(w)
    new.bias.data.copy_(conv.bias.data)
    model.stem[0] = new
    model.cfg = model.cfg.with_(patch_size=patch_size)
    model.feature_info = [{**f, "reduction": patch_size * 2**i} for i, f in enumerate(model.feature_info)]


def load_model(cfg: BackboneConfig) -> nn.Module:
    """The classification model behind a backbone, with its weights (a run folder, a weight file, published weights
    or none), all through `convnext.resolve`.

    Pretrained ConvNeXt stems of another patch size (CIFAR runs use 1 or 2) are resized to `cfg.patch_size`.
    Sets `cfg.mean`/`cfg.std` from a pretrained run or published weights (the normalisation they were trained with).
    """
    from convnext.registry import create_model, split_name
    from convnext.resolve import resolve
    from convnext.weights.hf import is_hub_name

    tagged = not is_hub_name(cfg.model) and split_name(cfg.model)[1] is not None
    if cfg.pretrained_run is not None:  # a classification run's model, or a pre-training run's encoder
        r = resolve(cfg.pretrained_run)
        if r.name != cfg.model:
            log.warning("backbone: %s holds a %s; using it", cfg.pretrained_run, r.name)
            cfg.model = r.name  # so the run's own checkpoints rebuild the right architecture
    elif cfg.checkpoint is not None:  # a weight file (its head dropped, its stem's patch size kept): no statistics
        r = resolve(cfg.checkpoint, model=cfg.model, num_classes=0)
    elif cfg.pretrained or tagged:  # a weight tag means its weights
        r = resolve(cfg.model, pretrained=True, num_classes=0)
    else:  # random weights (a Hub name: its architecture only)
        r = None
    if r is None:
        model = create_model(cfg.model, num_classes=0)
    else:
        model = r.model
        log.info("backbone: %s", r.provenance)
        if cfg.mean is None and (cfg.pretrained_run is not None or cfg.checkpoint is None):
            cfg.mean, cfg.std = r.preprocess.mean, r.preprocess.std  # normalise as trained; saved in the run's config
    if isinstance(model, ConvNeXt) and not model.cfg.isotropic:
        resize_stem(model, cfg.patch_size)
    set_drop_path(model, cfg.drop_path_rate)
    return model


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """A `MultiScaleBackbone` (or the torchvision ResNet-50 peer when `cfg.model == "resnet50"`)."""
    if cfg.model == "resnet50":
        return resnet50_backbone(cfg.frozen_stages)
    model = load_model(cfg)
    if isinstance(model, ConvNeXt) and model.cfg.isotropic:
        features = SimplePyramid(model, cfg.norms)
    elif isinstance(model, ConvNeXt):
        features = ConvNeXtFeatures(model, norms=cfg.norms)
    elif isinstance(getattr(model, "stem", None), nn.Module) and isinstance(
        getattr(model, "stages", None), nn.ModuleList
    ):
        features = StagesFeatures(model, cfg.norms)
    else:
        raise ValueError(f"model {cfg.model!r} exposes no stages (needs a `stem` and a `stages` ModuleList)")
    frozen = _frozen_modules(features, cfg.frozen_stages, cfg.model)
    stats = {"mean": cfg.mean or IMAGENET_MEAN, "std": cfg.std or IMAGENET_STD}
    return MultiScaleBackbone(features, features.out_channels, frozen, trunk=model, **stats)


def _frozen_modules(features: nn.Module, k: int, name: str) -> list[nn.Module]:
    if k == 0:
        return []
    stem, stages = features.stem, features.stages
    if not 0 <= k <= len(stages):
        raise ValueError(f"frozen_stages={k}: model {name!r} has {len(stages)} stages")
    return [stem, *stages[:k]]


class BackboneWithFPN(nn.Module):
    """A multi-scale backbone followed by torchvision's FPN (plus a max-pooled level), as torchvision's own
    `BackboneWithFPN`: the same attributes (`body`, `fpn`, `out_channels`), so detectors take it unchanged."""

    def __init__(self, body: nn.Module, out_channels: int = 256):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def detector(
    backbone: BackboneConfig,
    num_classes: int,
    masks: bool = True,
    train_sizes: tuple[int, ...] = (800,),
    test_size: int = 800,
    max_size: int = 1333,
    fpn_channels: int = 256,
    **kwargs: Any,
) -> nn.Module:
    """torchvision's Mask R-CNN (`masks=True`) or Faster R-CNN on a ConvNeXt + FPN; `num_classes` counts background.

    Multi-scale training is torchvision's own: during training the short side is drawn from `min_size`, in eval
    it is `min_size[-1]`; so test_size goes last (and is one of the training sizes too).
    kwargs: any other torchvision detector argument (box_batch_size_per_image, rpn_post_nms_top_n_test, ...).
    `backbone.model == "resnet50"` gives torchvision's own `maskrcnn_resnet50_fpn` / `fasterrcnn_resnet50_fpn`
    with no weights (its FPN is 256 wide whatever `fpn_channels`), the peer of the transfer benchmark.
    """
    min_size = tuple(s for s in train_sizes if s != test_size) + (test_size,)
    if backbone.model == "resnet50":  # the peer: torchvision's own model, no weights, every layer trainable
        if backbone.frozen_stages:
            raise ValueError("frozen_stages: torchvision trains every ResNet-50 layer when it has no weights")
        build = maskrcnn_resnet50_fpn if masks else fasterrcnn_resnet50_fpn
        sizes = {"min_size": min_size, "max_size": max_size}
        return build(weights=None, weights_backbone=None, num_classes=num_classes, **sizes, **kwargs)
    body = BackboneWithFPN(build_backbone(backbone), fpn_channels)
    kind = MaskRCNN if masks else FasterRCNN
    return kind(
        body,
        num_classes=num_classes,
        min_size=min_size,
        max_size=max_size,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        **kwargs,
    )


def resnet50_backbone(frozen_stages: int = 0) -> MultiScaleBackbone:
    """torchvision's ResNet-50 (no weights) as a 4-map backbone (strides 4..32, widths 256..2048), the peer."""
    net = resnet50(weights=None)
    body = IntermediateLayerGetter(net, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"})
    stem = nn.ModuleList([body.conv1, body.bn1])
    frozen = [stem, *[getattr(body, f"layer{i + 1}") for i in range(frozen_stages)]] if frozen_stages else []
    return MultiScaleBackbone(body, [256, 512, 1024, 2048], frozen)


def backbone_of(model: nn.Module) -> nn.Module | None:
    """The classification trunk inside a dense model (for layer-wise lr decay), or None for the peers."""
    body = getattr(getattr(model, "backbone", None), "body", None)  # torchvision detectors
    if body is None:
        body = getattr(model, "backbone", None)  # our segmentors
    return body.trunk if isinstance(body, MultiScaleBackbone) else None
