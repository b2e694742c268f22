"""`convnext pretrain`'s config: typed dataclasses (the model, optimizer and schedule sections are the trainer's own),
the two FCMAE recipes as plain functions, and the choice of input size and stem for a data set.

A run's resolved config is saved as config.json (a plain dict, also inside every checkpoint); `fcmae` is the
section that marks a folder as a pre-training run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from convnext.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from convnext.model import ConvNeXtConfig
from convnext.train.config import ModelConfig, OptimConfig, ScheduleConfig

MIN_GRID = 4  # the coarsest mask grid a chosen stem leaves (the paper's is 7x7 at 224 px)
STEMS = (4, 2, 1)  # stem strides tried, coarsest first, when no model.patch_size is given
PAPER_LR, PAPER_BATCH = 2.4e-3, 4096  # the official recipe: blr 1.5e-4 x 4096 / 256


@dataclass
class MaskConfig:
    mask_ratio: float = 0.6  # share of the patches removed
    decoder_dim: int | None = None  # None: the encoder's last width, at most 512 (320 for atto; 512 from pico on)
    decoder_depth: int = 1
    norm_pix_loss: bool = True  # targets normalised per patch


@dataclass
class PretrainDataConfig:
    name: str = ""  # an image folder (its train/ split; labels are not used), cifar10, cifar100 or digits
    data_dir: str | None = None  # where cifar10/cifar100 live (or are downloaded to)
    download: bool = True
    val_split: float = 0.1  # held out for the val loss and the pictures when the folder has no val/ folder
    img_size: int | None = None  # None: chosen from the images (`pick_input`)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range (the official FCMAE augmentation)
    hflip: float = 0.5
    num_workers: int = 4
    pin_memory: bool = True
    skip_bad_images: bool = False  # skip (and count) unreadable images instead of stopping
    cache: str = "auto"  # auto | on | off: decode once into memory, crop and flip batches in torch
    cache_memory_share: float = 0.5
    eval_images: int = 256  # val images scored each epoch (fixed masks); the first 8 are drawn as a PNG


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="convnextv2_atto"))
    fcmae: MaskConfig = field(default_factory=MaskConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(base_lr=1.5e-4, base_batch=256, weight_decay=0.05, betas=(0.9, 0.95))
    )
    sched: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_epochs=40.0, min_lr=0.0))
    output: str = "runs/pretrain"
    epochs: int = 800
    batch_size: int = 4096  # global: all processes x accumulation steps
    accum_steps: int = 1
    budget_min: float | None = None  # wall-clock training budget in minutes; the schedule is fitted to it
    amp: str = "none"  # none | bf16 | fp16 (CUDA)
    fast: bool = True  # CPU: the depthwise convolutions through convnext.fast's C-kernel backward
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    eval_every: int = 1  # epochs (the pictures are drawn every epoch)
    ckpt_every_steps: int = 0  # also save last.pt every N optimizer steps (mid-epoch); 0 = at epoch ends only
    tensorboard: bool = False
    resume: str | None = None
    overwrite: bool = False
    recipe: list[str] = field(default_factory=list)  # why each chosen value was chosen (logged, saved)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fcmae_in1k(model: str = "convnextv2_atto") -> PretrainConfig:
    """The paper's ImageNet-1k recipe (official TRAINING.md): 224 px, 800 epochs (40 warmup), batch 4096, AdamW
    lr 1.5e-4 x batch / 256, betas (0.9, 0.95), wd 0.05, random-resized crops of 20-100% and flips, decoder 512."""
    cfg = PretrainConfig(model=ModelConfig(name=model))
    cfg.data.img_size, cfg.fcmae.decoder_dim = 224, 512
    return cfg


def fcmae_small(model: str = "convnextv2_atto", batch_size: int = 128, epochs: int = 100) -> PretrainConfig:
    """The recipe for one machine and a short budget: batch 128, the paper's lr at 4096 scaled by the square root of
    the batch ratio (4.2e-4 at 128; the linear rule would give 7.5e-5, too slow for a short run), 5% warmup, a cosine
    to 0; the input size and stem chosen from the images, the decoder as wide as the encoder's last stage (at most
    512). `epochs` bounds a budgeted run (the schedule is fitted to the budget)."""
    lr = PAPER_LR * math.sqrt(batch_size / PAPER_BATCH)
    cfg = PretrainConfig(model=ModelConfig(name=model), batch_size=batch_size, epochs=epochs)
    cfg.optim.lr = lr
    cfg.sched.warmup_epochs = 0.05 * epochs
    cfg.data.num_workers = 2
    cfg.recipe.append(
        f"AdamW lr {lr:.3g} at batch {batch_size} (the paper's {PAPER_LR} at {PAPER_BATCH} x sqrt({batch_size}/"
        f"{PAPER_BATCH})), betas (0.9, 0.95), wd 0.05, 5% warmup, cosine to 0"
    )
    return cfg


PRESETS = {"small": fcmae_small, "in1k": fcmae_in1k}


def encoder_config(mcfg: ModelConfig) -> ConvNeXtConfig:
    """The ConvNeXtConfig `mcfg` builds, without building it; a ValueError when the model is not a ConvNeXt."""
    from convnext.registry import MODELS, split_name

    entry = MODELS.get(split_name(mcfg.name)[0])
    if not isinstance(entry.config, ConvNeXtConfig):
        raise ValueError(f"FCMAE pre-trains a ConvNeXt; {mcfg.name!r} is not one (`convnext list convnext*`)")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in mcfg.build_kwargs().items()}
    try:
        return entry.config.with_(**kwargs)
    except TypeError as e:
        raise ValueError(f"model options {sorted(kwargs)}: {e}") from None


def total_stride(enc: ConvNeXtConfig, patch_size: int | None = None) -> int:
    """The encoder's total stride (the masking patch side): stem x 2 per downsampling layer."""
    return (patch_size or enc.patch_size) * 2 ** (len(enc.depths) - 1)


def pick_input(
    enc: ConvNeXtConfig, source_side: int | None, img_size: int | None, patch_size: int | None
) -> tuple[int, int, list[str]]:
    """(input size, stem stride, the reasons in words) for images whose short side is `source_side`.

    Size: as given, else the source side rounded down to a multiple of 32 within 64..224 (CIFAR's 32 px -> 64).
    Stem: as given, else the coarsest of 4, 2, 1 whose mask grid is still at least 4x4 (224 px: 4, a 7x7 grid;
    64 px: 2, 4x4; 32 px: 1, 4x4); the isotropic model keeps its own.
    """
    why = []
    if img_size is None:
        img_size = 224 if source_side is None else max(64, min(224, source_side) // 32 * 32)
        why.append(f"input {img_size}px: the images' short side ({source_side or 'unknown'}px) rounded down to a "
                   "multiple of 32 within 64..224")  # fmt: skip
    if patch_size is None and len(enc.depths) > 1:
        fits = [p for p in STEMS if img_size // total_stride(enc, p) >= MIN_GRID]
        patch_size = fits[0] if fits else STEMS[-1]
        g = img_size // total_stride(enc, patch_size)
        why.append(f"stem {patch_size}x{patch_size}: the coarsest whose {total_stride(enc, patch_size)}px masking "
                   f"patches leave at least a {MIN_GRID}x{MIN_GRID} grid ({g}x{g} at {img_size}px)")  # fmt: skip
    return img_size, patch_size or enc.patch_size, why
