"""Training configs as typed dataclasses and the presets as plain functions (`convnext.config` reads and
overrides them: `--a.b value` flags, config files).

A run's resolved config is saved as a plain dict (`config.json`, and inside every checkpoint), so runs and
checkpoints never hold pickled objects. `batch_size` is the GLOBAL batch of one optimizer step (all processes,
all accumulation micro-batches); the lr is `optim.lr` when set, else `optim.base_lr * batch_size / optim.base_batch`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from convnext.config import apply_overrides  # noqa: F401  (callers move to convnext.config)
from convnext.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from convnext.weights.specs import resolve_spec


@dataclass
class ModelConfig:
    name: str = "convnext_tiny"  # a registered name (`convnext list`), optionally with a weight tag
    pretrained: bool = False  # start from the published weights of `name`
    checkpoint: str | None = None  # or from a local weight file (fine-tuning); the head adapts to the classes
    drop_path_rate: float | None = None  # None = the model's default
    head_init_scale: float | None = None
    patch_size: int | None = None  # stem stride: 1 or 2 for 32x32 images
    kernel_size: int | None = None
    layer_scale_init: float | None = None
    stem_init: str = "default"  # default | whiten: the stem as patch whitening of the training images (whiten.py)
    kwargs: dict[str, Any] = field(default_factory=dict)  # any other builder argument

    def build_kwargs(self) -> dict[str, Any]:
        """The builder overrides this config sets (None fields keep the model's default)."""
        named = ("drop_path_rate", "head_init_scale", "patch_size", "kernel_size", "layer_scale_init")
        out = {k: getattr(self, k) for k in named if getattr(self, k) is not None}
        return {**out, **self.kwargs}


@dataclass
class DataConfig:
    name: str = "digits"  # an image folder, cifar10, cifar100, or digits (embedded)
    data_dir: str | None = None  # where cifar10/cifar100 live (or are downloaded to)
    download: bool = True  # cifar: download into data_dir when missing
    val_split: float = 0.1  # fraction held out when an image folder has no val folder
    img_size: int = 224
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, center-crop img_size
    # None below = the published weights' when the run starts from them (model.pretrained), else ImageNet's / bicubic;
    # `resolve_preprocessing` fills them in when the run starts, so config.json holds the values used
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None  # eval resize filter: bicubic | bilinear | nearest
    crop: str = "rrc"  # train crop: rrc (RandomResizedCrop) | pad (pad + random crop) | resize
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    translate: int | None = None  # crop "pad": the most pixels an image moves each way; None = img_size // 8
    hflip: float = 0.5
    randaugment: bool = True  # rand-m9-mstd0.5 (2 ops)
    ra_magnitude: float = 9.0
    ra_magnitude_std: float = 0.5
    ra_num_ops: int = 2
    re_prob: float = 0.25  # random erasing
    mixup: float = 0.8  # Beta alpha; 0 = off
    cutmix: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5  # CutMix instead of Mixup with this probability, per batch
    label_smoothing: float = 0.1
    num_workers: int = 4
    pin_memory: bool = True
    skip_bad_images: bool = False  # skip (and count) unreadable images instead of stopping
    cache: str = "auto"  # auto | on | off: decode once into memory, augment batches in torch (convnext/data/cache.py)
    cache_memory_share: float = 0.5  # auto: cache only when it needs at most this share of the available memory
    tta_flip: bool = False  # evaluate (and predict) on the mean of the image's and its mirror's logits
    tta_shift: int = 0  # and of the image translated by this many pixels both ways (data.tta_logits)
    classes: list[str] = field(default_factory=list)  # filled in from the dataset when the run starts
    # imbalanced classes: none | sampler (every class equally likely per draw) | weights (cross-entropy weighted by
    # inverse class frequency) | auto (the rule of `train.auto.choose_balance` on the training set's class counts)
    balance: str = "none"


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd | muon (Muon on the blocks' weight matrices, AdamW on the rest)
    lr: float | None = None  # absolute lr; None = base_lr * batch_size / base_batch
    base_lr: float = 4e-3
    base_batch: int = 4096
    weight_decay: float = 0.05  # not on biases, norms, layer scale and other 1-D parameters
    layer_decay: float | None = None  # layer-wise lr decay (fine-tuning); None = off
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    clip_grad: float | None = None  # max global grad norm; None = no clipping


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | linear (to min_lr at the end) | step
    warmup_epochs: float = 20.0
    warmup_lr: float = 0.0  # lr at step 0 of the warmup
    min_lr: float = 1e-6  # cosine floor
    step_epochs: float = 30.0  # step: multiply by `gamma` every `step_epochs`
    gamma: float = 0.1


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: ScheduleConfig = field(default_factory=ScheduleConfig)
    output: str = "runs/train"
    epochs: int = 300
    batch_size: int = 4096  # global: all processes x accumulation steps
    accum_steps: int = 1
    budget_min: float | None = None  # wall-clock training budget in minutes; the schedule is fitted to it
    ema: bool = True
    ema_decay: float = 0.9999
    amp: str = "auto"  # auto (bf16 on a GPU that has it, fp16 on an older one, none on the CPU) | none | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    fast: bool = True  # CPU: ConvNeXt blocks through convnext.fast's training path (oneDNN 1x1 convs, C depthwise grad)
    # timed: each 1x1 product of the fast path runs the way measured faster at the start (near-ties can go either
    # way between two fresh runs); default: the untimed defaults, so two fresh runs make the same products
    fast_plan: str = "timed"
    grad_checkpointing: bool = False
    # FSDP (`engine.distributed.shard`): parameters, gradients, optimizer state and EMA split over the processes, for
    # the models too large for a replica per GPU (XL, XXL, V2-huge); resume state in last.dcp/ (docs/distributed.md)
    shard: bool = False
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch.set_num_threads on CPU
    seed: int = 0
    eval_every: int = 1  # epochs
    ckpt_every_steps: int = 0  # also save last.pt every N optimizer steps (mid-epoch); 0 = at epoch ends only
    tensorboard: bool = False
    trackers: list[str] = field(default_factory=list)  # mlflow and/or wandb, offline into the run folder (`--log`)
    select: str = "top1"  # the val metric that picks best.pt: top1 | macro_f1 | balanced_accuracy | loss
    early_stop: int = 0  # stop after this many evaluated epochs without a better `select`; 0 = off; not budgeted runs
    resume: str | None = None  # a run folder to continue
    overwrite: bool = False  # allow writing into a run folder that already has a run
    recipe: list[str] = field(default_factory=list)  # why each default was chosen (the `auto` recipe fills it)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- presets
# The paper's ImageNet-1k recipe (Liu et al. 2022, appendix A.1; official TRAINING.md): 300 epochs, AdamW lr 4e-3
# at batch 4096, 20 warmup epochs, cosine, wd 0.05, RandAugment m9-mstd0.5, Mixup 0.8, CutMix 1.0, random erasing
# 0.25, label smoothing 0.1, layer scale 1e-6, EMA 0.9999, eval crop 0.875. Only stochastic depth varies.
IN1K_DROP_PATH = {
    "convnext_tiny": 0.1,
    "convnext_small": 0.4,
    "convnext_base": 0.5,
    "convnext_large": 0.5,
    "convnext_isotropic_small": 0.1,
    "convnext_isotropic_base": 0.2,
    "convnext_isotropic_large": 0.5,
}
# ImageNet-22k -> 1k fine-tuning (appendix A.1): stochastic depth per size; EMA only for XL.
FT22K_DROP_PATH = {
    "convnext_tiny": 0.0,
    "convnext_small": 0.1,
    "convnext_base": 0.2,
    "convnext_large": 0.3,
    "convnext_xlarge": 0.4,
}


def in1k(model: str = "convnext_tiny") -> TrainConfig:
    """The paper's 300-epoch ImageNet-1k recipe for `model` (drop path from IN1K_DROP_PATH)."""
    arch = model.split(".")[0]
    if arch not in IN1K_DROP_PATH:
        raise KeyError(f"the paper gives no ImageNet-1k recipe for {arch!r}; presets: {sorted(IN1K_DROP_PATH)}")
    # The trained isotropic-L uses layer scale (the official isotropic default is off).
    ls = 1e-6 if arch == "convnext_isotropic_large" else None
    return TrainConfig(
        model=ModelConfig(name=model, drop_path_rate=IN1K_DROP_PATH[arch], layer_scale_init=ls),
        data=DataConfig(name="imagenet", img_size=224, crop_pct=0.875),
        optim=OptimConfig(name="adamw", base_lr=4e-3, base_batch=4096, weight_decay=0.05),
        sched=ScheduleConfig(name="cosine", warmup_epochs=20, min_lr=1e-6),
        output=f"runs/in1k_{arch.removeprefix('convnext_')}",
        epochs=300,
        batch_size=4096,
        ema=True,
        ema_decay=0.9999,
    )


def in22k_ft_in1k(model: str = "convnext_base") -> TrainConfig:
    """Fine-tune 22k-pretrained weights on ImageNet-1k: 30 epochs, lr 5e-5 at batch 512, no warmup, wd 1e-8,
    layer decay 0.8, head init 0.001, no Mixup/CutMix, EMA only for XL. Pass the 22k weights with
    `--model NAME.TAG` or `--model.checkpoint FILE`."""
    arch = model.split(".")[0]
    return TrainConfig(
        model=ModelConfig(
            name=model, pretrained="." in model, drop_path_rate=FT22K_DROP_PATH.get(arch, 0.2), head_init_scale=0.001
        ),
        data=DataConfig(name="imagenet", img_size=224, crop_pct=0.875, mixup=0.0, cutmix=0.0),
        optim=OptimConfig(name="adamw", base_lr=5e-5, base_batch=512, weight_decay=1e-8, layer_decay=0.8),
        sched=ScheduleConfig(name="cosine", warmup_epochs=0, min_lr=1e-6),
        output=f"runs/in22k_ft_in1k_{arch.removeprefix('convnext_')}",
        epochs=30,
        batch_size=512,
        ema=arch == "convnext_xlarge",
        ema_decay=0.9999,
    )


def finetune(model: str = "convnext_tiny") -> TrainConfig:
    """Fine-tune pretrained weights on a small dataset (an image folder): low lr, layer decay 0.7, short warmup,
    head init 0.001, RandAugment but no Mixup/CutMix (they slow convergence on small data, FB issues #39/#134)."""
    return TrainConfig(
        model=ModelConfig(name=model, pretrained=True, drop_path_rate=0.1, head_init_scale=0.001),
        data=DataConfig(img_size=224, crop_pct=0.875, scale=(0.25, 1.0), mixup=0.0, cutmix=0.0, re_prob=0.0),
        optim=OptimConfig(name="adamw", base_lr=1e-4, base_batch=256, weight_decay=0.05, layer_decay=0.7),
        sched=ScheduleConfig(name="cosine", warmup_epochs=2, min_lr=1e-6),
        output="runs/finetune",
        epochs=30,
        batch_size=64,
        ema=False,
    )


def cifar10(model: str = "convnext_atto") -> TrainConfig:
    """CIFAR-10 at 32x32 from scratch: stem patch size 2 (16x16 after the stem), pad-and-crop + flip,
    light RandAugment, no Mixup/CutMix, AdamW lr 2e-3 at batch 256; tuned for short CPU runs."""
    return TrainConfig(
        model=ModelConfig(name=model, patch_size=2, drop_path_rate=0.0),
        data=DataConfig(
            name="cifar10",
            img_size=32,
            crop_pct=1.0,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            crop="pad",
            randaugment=False,
            re_prob=0.0,
            mixup=0.0,
            cutmix=0.0,
            label_smoothing=0.1,
            num_workers=2,
        ),
        optim=OptimConfig(name="adamw", base_lr=2e-3, base_batch=256, weight_decay=0.05),
        sched=ScheduleConfig(name="cosine", warmup_epochs=1, min_lr=1e-5),
        output="runs/cifar10",
        epochs=30,
        batch_size=256,
        ema=False,
    )


def demo(model: str = "convnext_atto") -> TrainConfig:
    """The README's first command: the embedded 8x8 digits, upsampled 2x to 16x16 RGB, on ConvNeXt-atto with a
    2x2 stem, whose 8x8 token grid lines up with the digits' own pixels (nothing is lost, and it costs 4x less than
    32x32). No flips (a mirrored digit is another digit), mild crops, no RandAugment/Mixup/CutMix (too few steps)."""
    return TrainConfig(
        model=ModelConfig(name=model, patch_size=2, drop_path_rate=0.0),
        data=DataConfig(
            name="digits",
            img_size=16,
            crop_pct=1.0,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            crop="rrc",
            scale=(0.6, 1.0),
            hflip=0.0,
            randaugment=False,
            re_prob=0.0,
            mixup=0.0,
            cutmix=0.0,
            label_smoothing=0.1,
            num_workers=0,
            pin_memory=False,
        ),
        optim=OptimConfig(name="adamw", base_lr=2e-3, base_batch=32, weight_decay=0.05),
        sched=ScheduleConfig(name="cosine", warmup_epochs=1, min_lr=1e-5),
        output="runs/demo",
        epochs=15,
        batch_size=32,
        ema=False,
    )


def _in1k_preset(arch: str) -> Callable[..., TrainConfig]:
    def preset(model: str | None = None) -> TrainConfig:
        cfg = in1k(arch)  # the numbers are the variant's; --model only swaps the network (e.g. a V2 of that size)
        cfg.model.name = model or arch
        return cfg

    preset.__doc__ = f"The paper's ImageNet-1k recipe for {arch}."
    return preset


PRESETS: dict[str, Callable[..., TrainConfig]] = {
    **{f"in1k_{arch.removeprefix('convnext_')}": _in1k_preset(arch) for arch in IN1K_DROP_PATH},
    "in22k_ft_in1k": in22k_ft_in1k,
    "finetune": finetune,
    "cifar10": cifar10,
    "demo": demo,
}


def get_preset(name: str, model: str | None = None) -> TrainConfig:
    """A preset's config; `model` swaps the model (presets whose numbers depend on the size pick them for it)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]() if model is None else PRESETS[name](model)


def resolve_preprocessing(cfg: TrainConfig) -> list[str]:
    """Fill `cfg.data`'s mean, std and interpolation left None: from the spec of the published weights the run
    starts from (`model.pretrained` and a name with weights: `convnext_base.clip_laion2b_augreg_ft_in1k` gets
    CLIP's mean/std), else ImageNet's mean/std and bicubic. Values given explicitly are kept. Modifies `cfg`;
    returns a line per choice the weights made or contradict, for `cfg.recipe`."""
    d, spec = cfg.data, None
    if cfg.model.pretrained and not cfg.resume:  # a resumed run keeps its own (runs before data.interpolation: bicubic)
        arch, _, tag = cfg.model.name.partition(".")
        try:
            spec = resolve_spec(arch, tag or None)
        except KeyError:
            pass  # not a published weight (a Hub repo, say): building the model reports a bad name
    d.mean, d.std = (tuple(v) if v is not None else None for v in (d.mean, d.std))
    default = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bicubic"}
    weights = {"mean": spec.mean, "std": spec.std, "interpolation": spec.interpolation} if spec else default
    taken = [k for k in weights if getattr(d, k) is None]
    other = [k for k, v in weights.items() if getattr(d, k) not in (None, v)]
    why = []
    if spec is not None and taken:
        why.append(f"data: {', '.join(taken)} of {spec.name}, the weights the run starts from (mean "
                   f"{list(spec.mean)}, std {list(spec.std)}, eval resize {spec.interpolation})")  # fmt: skip
    if spec is not None and other:
        why.append(f"data: {', '.join(other)} as given, not as {spec.name} was trained")
    for k in taken:
        setattr(d, k, weights[k])
    return why
