"""Typed configs for detection and segmentation runs, and the presets as plain functions.

The paper's downstream recipe (Liu et al. 2022, appendix A.3; the official mmdetection/mmsegmentation configs):
AdamW (wd 0.05), layer-wise lr decay on the backbone, stochastic depth, multi-scale training resize.
- COCO Mask R-CNN: lr 1e-4 (2e-4 for the 3x schedule), batch 16, layer decay 0.7 (T), drop path 0.4 (T),
  short side 480..800 (max 1333), test 800.
- ADE20K UperNet: lr 1e-4, batch 16, 160k iterations, warmup 1500, layer decay 0.9, drop path 0.4 (T),
  crop 512, scale 2048x512 x [0.5, 2.0], head channels 512, auxiliary FCN head with weight 0.4.
The paper decays the lr in steps (detection) or linearly (segmentation); here it is a cosine
(`convnext.engine.optim.lr_at`). The small presets (`pennfudan`, `camvid`) keep the recipe and shrink the
model and the images so that a run takes minutes on a CPU.
Configs are mutable dataclasses so `convnext.config.apply_overrides` can set `--optim.lr 3e-4`-style fields;
a run saves its resolved config as plain JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class BackboneConfig:
    model: str = "convnext_atto"  # any registered name (`convnext list`), or "resnet50" for the torchvision peer
    checkpoint: str | None = None  # weight file in any layout `convnext.create_model(checkpoint=...)` reads
    pretrained: bool = False  # the published weights of `model` (its tag, or the arch's default); a tag implies it
    pretrained_run: str | None = None  # a `convnext train` run folder (its best/last weights) or a pretrain run's
    drop_path_rate: float = 0.1  # stochastic depth, linear over all blocks (the paper: T 0.4 for COCO/ADE)
    frozen_stages: int = 0  # 0: all trainable; k: stem and the first k stages frozen (weights and eval mode)
    patch_size: int = 4  # stem stride: 4 gives strides 4/8/16/32; a pretrained stem of another size is resized
    norms: bool = True  # LayerNorm on each output, as the official dense backbones
    mean: tuple[float, float, float] | None = None  # input normalisation; None: ImageNet's, or the pretrained run's
    std: tuple[float, float, float] | None = None


@dataclass
class DenseOptim:
    lr: float = 1e-4
    weight_decay: float = 0.05  # not on biases, norms and other 1-D parameters
    layer_decay: float | None = 0.9  # backbone only; the neck and heads train at the full lr. None = off
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 1500  # linear warmup from 0
    min_lr: float = 0.0
    clip_grad: float | None = None  # max global grad norm


@dataclass
class RunConfig:
    output: str = "runs/dense"
    epochs: int = 12
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs); the schedule fits it
    budget_min: float | None = None  # wall-clock training budget; the schedule is fitted to it after a few steps
    batch_size: int = 2
    eval_every: int = 1  # epochs; 0 = only at the end
    ckpt_every_steps: int = 50  # also save last.pt every N steps (mid-epoch); epoch ends always save
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch.set_num_threads on CPU
    num_workers: int | None = None  # data-loading workers; None: the machine's cores shared by its processes, <= 8
    accum_steps: int = 1  # micro-batches per optimizer step (batch_size images in all)
    amp: str = "auto"  # auto (bf16 on GPUs that have it, else fp16; none on CPU) | none | bf16 | fp16 (CUDA)
    tf32: bool = True  # CUDA: TF32 for float32 matmuls and convolutions
    cudnn_benchmark: bool = True  # CUDA: pick the fastest convolution kernels for the sizes seen
    pin_memory: bool = True  # CUDA: page-locked batches, copied to the GPU without blocking
    grad_checkpointing: bool = False  # recompute the backbone's blocks in the backward pass (less memory)
    resume: str | None = None
    overwrite: bool = False  # allow replacing a finished or interrupted run in `output`


@dataclass
class DetectData:
    format: str = "pennfudan"  # pennfudan (images + instance-mask PNGs) | coco (JSON)
    root: str = "runs/data/PennFudanPed"  # pennfudan: the folder holding PNGImages/ and PedMasks/
    test_split: int = 50  # pennfudan: images held out by a seeded shuffle
    split_seed: int = 0
    train_images: str = ""  # coco: image folder and annotation JSON of each split
    train_ann: str = ""
    val_images: str = ""
    val_ann: str = ""
    train_sizes: tuple[int, ...] = (256, 288, 320, 352, 384)  # short side drawn per image in training
    test_size: int = 320
    max_size: int = 640  # long side cap
    classes: list[str] = field(default_factory=list)  # filled from the data: ["background", ...]


@dataclass
class DetectConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DetectData = field(default_factory=DetectData)
    optim: DenseOptim = field(default_factory=DenseOptim)
    run: RunConfig = field(default_factory=RunConfig)
    masks: bool = True  # Mask R-CNN; False: Faster R-CNN (boxes only)
    fpn_channels: int = 256
    detector_kwargs: dict[str, Any] = field(default_factory=dict)  # more torchvision (Mask/Faster) R-CNN arguments
    score_thresh: float = 0.5  # predict: draw detections above this score

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SegmentData:
    format: str = "camvid"  # camvid (root/{split}, root/{split}annot) | folder (the paths below)
    root: str = "runs/data/CamVid"
    train_split: str = "train"
    val_split: str = "val"
    train_images: str = ""  # folder: images and label PNGs of each split
    train_labels: str = ""
    val_images: str = ""
    val_labels: str = ""
    num_classes: int = 11
    ignore_ids: tuple[int, ...] = (11,)  # ids in the PNGs meaning "void"
    unknown_ids: str = "error"  # error | ignore: other ids outside the classes
    crop: tuple[int, int] = (176, 240)  # training crop (h, w)
    scale: tuple[int, int] = (180, 240)  # training images are rescaled to fit this (h, w) x ratio
    ratio_range: tuple[float, float] = (0.5, 2.0)
    test_scale: tuple[int, int] = (180, 240)  # evaluation: images resized to this (h, w); labels at full size
    mode: str = "whole"  # whole | slide
    slide_crop: tuple[int, int] = (176, 240)
    slide_stride: tuple[int, int] = (120, 160)
    classes: list[str] = field(default_factory=list)
    palette: list[list[int]] = field(default_factory=list)


@dataclass
class SegmentConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: SegmentData = field(default_factory=SegmentData)
    optim: DenseOptim = field(default_factory=DenseOptim)
    run: RunConfig = field(default_factory=RunConfig)
    channels: int = 512  # UperNet width
    aux: bool = True  # auxiliary FCN head on the stride-16 map
    aux_channels: int = 256
    aux_weight: float = 0.4

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- presets
def pennfudan(model: str = "convnext_atto") -> DetectConfig:
    """Penn-Fudan pedestrians (120 train / 50 test, seeded), Mask R-CNN, short side 256..384 (test 320)."""
    return DetectConfig(
        backbone=BackboneConfig(model=model, drop_path_rate=0.1),
        data=DetectData(),
        detector_kwargs=dict(  # fewer RoIs than COCO's defaults: at most 8 pedestrians per image; on a CPU the mask
            # head (4 convs of 256 channels per positive RoI) costs more than the whole backbone
            rpn_pre_nms_top_n_train=1000,
            rpn_post_nms_top_n_train=1000,
            rpn_pre_nms_top_n_test=500,
            rpn_post_nms_top_n_test=500,
            box_batch_size_per_image=64,
            box_detections_per_img=20,
        ),
        optim=DenseOptim(lr=2e-4, layer_decay=0.9, warmup_steps=50),
        run=RunConfig(output="runs/pennfudan", epochs=12, batch_size=2, ckpt_every_steps=50),
    )


def coco(model: str = "convnext_tiny") -> DetectConfig:
    """The paper's COCO Mask R-CNN 3x recipe (lr 2e-4 at batch 16, 36 epochs); set the data paths."""
    return DetectConfig(
        backbone=BackboneConfig(model=model, drop_path_rate=0.4),
        data=DetectData(
            format="coco",
            root="",
            train_sizes=tuple(range(480, 801, 32)),
            test_size=800,
            max_size=1333,
        ),
        optim=DenseOptim(lr=2e-4, layer_decay=0.7, warmup_steps=1000),
        run=RunConfig(output="runs/coco", epochs=36, batch_size=16, ckpt_every_steps=1000),
    )


def camvid(model: str = "convnext_atto") -> SegmentConfig:
    """CamVid (367 train / 101 val / 233 test, 11 classes) at half resolution (240x180), UperNet width 64 (the
    head's fusion conv at stride 4 would otherwise cost several times the atto backbone)."""
    return SegmentConfig(
        backbone=BackboneConfig(model=model, drop_path_rate=0.1),
        data=SegmentData(),
        optim=DenseOptim(lr=3e-4, layer_decay=0.9, warmup_steps=50),
        run=RunConfig(output="runs/camvid", epochs=30, batch_size=8, ckpt_every_steps=50),
        channels=64,
        aux_channels=32,
    )


def ade20k(model: str = "convnext_tiny") -> SegmentConfig:
    """The paper's ADE20K UperNet recipe (160k iterations at batch 16 = 127 epochs of 20,210 images)."""
    return SegmentConfig(
        backbone=BackboneConfig(model=model, drop_path_rate=0.4),
        data=SegmentData(
            format="folder",
            root="",
            num_classes=150,
            ignore_ids=(),
            crop=(512, 512),
            scale=(512, 2048),
            test_scale=(512, 2048),
            mode="slide",
            slide_crop=(512, 512),
            slide_stride=(341, 341),
        ),
        optim=DenseOptim(lr=1e-4, layer_decay=0.9, warmup_steps=1500),
        run=RunConfig(output="runs/ade20k", epochs=127, batch_size=16, ckpt_every_steps=2000),
        channels=512,
        aux_channels=256,
    )


DETECT_PRESETS: dict[str, Callable[..., DetectConfig]] = {"pennfudan": pennfudan, "coco": coco}
SEGMENT_PRESETS: dict[str, Callable[..., SegmentConfig]] = {"camvid": camvid, "ade20k": ade20k}


def get_preset(task: str, name: str, model: str | None = None) -> DetectConfig | SegmentConfig:
    """A preset of `task` ("detect" or "segment"); `model` swaps the backbone."""
    presets = DETECT_PRESETS if task == "detect" else SEGMENT_PRESETS
    if name not in presets:
        raise KeyError(f"unknown {task} preset {name!r}; presets: {', '.join(presets)}")
    return presets[name]() if model is None else presets[name](model)
