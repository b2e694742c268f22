"""Train and evaluate detection (Mask/Faster R-CNN) and segmentation (UperNet) runs on the run engine.

`train_detection(cfg)` / `train_segmentation(cfg)` check the data and the run folder before any work, then train
with the paper's downstream recipe (AdamW, layer-wise lr decay on the backbone, stochastic depth, multi-scale
resize), evaluate (COCO box/mask mAP; mIoU), and return the metrics. The engine (`convnext.engine.trainer`) gives
them what every job has: the run folder (config.json, metrics.csv/.jsonl, last.pt every `ckpt_every_steps` steps,
at every epoch end and on an error or Ctrl-C, best.pt, results.json), exact resume after SIGKILL (augmentation is
a function of (seed, epoch, index)), the time budget's refits, accumulation and autocast.

Under torchrun (or srun) the model trains as DistributedDataParallel (BatchNorm as SyncBatchNorm on CUDA), each
process evaluates its shard of the validation images and rank 0 scores them all, each image once. The random draws
of a micro-batch (drop path, dropout, the R-CNN's proposal sampling) come from a generator keyed by (seed, the
micro-batch's place in the global order) and the sampler deals the shuffled images out in micro-batch blocks, so
N processes train as one process accumulating N micro-batches of the same size (BatchNorm's batches included).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from tqdm import tqdm

from convnext.config import from_dict
from convnext.data import SeededDataset
from convnext.dense.backbone import backbone_of, build_backbone, detector
from convnext.dense.coco import CocoDetection
from convnext.dense.config import DetectConfig, SegmentConfig
from convnext.dense.data import (
    CAMVID_CLASSES,
    CAMVID_PALETTE,
    LabelSpec,
    SegmentationFolder,
    camvid,
    collate_lists,
    detection_transforms,
    pennfudan,
    segmentation_transforms,
    split_indices,
)
from convnext.dense.metrics import CocoEvaluator, ConfusionMatrix
from convnext.dense.segmentation import Segmentor, predict_slide, predict_whole, segmentation_loss
from convnext.engine import checkpoint as ckpt
from convnext.engine.distributed import (
    DistInfo,
    ResumableSampler,
    ShardSampler,
    all_reduce_sum,
    broadcast_buffers,
    broadcast_object,
    gather_object,
    joined,
    per_rank_batch,
    sync_batchnorm,
    wrap,
)
from convnext.engine.loop import autocast, cuda_switches, loader_workers, resolve_amp
from convnext.engine.optim import no_weight_decay, param_groups
from convnext.engine.run import RunFolder
from convnext.engine.trainer import Loop, LrShape, Trainer, restore_weights, schedule
from convnext.extras import require

log = logging.getLogger("convnext.dense")
RUN_FILES = ("config.json", "last.pt", "best.pt", "metrics.csv", "metrics.jsonl", "results.json")


# ---------------------------------------------------------------- models
def build_detection_model(cfg: DetectConfig) -> nn.Module:
    """torchvision's Mask R-CNN (or Faster R-CNN) on the configured backbone; classes from `cfg.data.classes`."""
    if not cfg.data.classes:
        raise ValueError("the config has no classes yet: they come from the data when a run starts")
    d = cfg.data
    sizes = (d.train_sizes, d.test_size, d.max_size)
    return detector(cfg.backbone, len(d.classes), cfg.masks, *sizes, cfg.fpn_channels, **cfg.detector_kwargs)


def build_segmentation_model(cfg: SegmentConfig) -> Segmentor:
    backbone = build_backbone(cfg.backbone)
    return Segmentor(backbone, cfg.data.num_classes, cfg.channels, cfg.aux_channels, cfg.aux, **_norm_stats(backbone))


def _norm_stats(backbone: nn.Module) -> dict:
    return {k: getattr(backbone, k) for k in ("mean", "std") if hasattr(backbone, k)}


def optimizer_groups(model: nn.Module, weight_decay: float, layer_decay: float | None) -> list[dict[str, Any]]:
    """AdamW groups: the ConvNeXt trunk by `convnext.engine.optim.param_groups` (layer-wise lr decay, no decay on
    1-D params); the per-stage output norms, the neck and the heads at the full lr (as the official configs)."""
    trunk = backbone_of(model)
    groups, seen = [], set()
    if trunk is not None:
        own = {id(p) for p in model.parameters() if p.requires_grad}
        for g in param_groups(trunk, weight_decay, layer_decay):
            params = [p for p in g["params"] if id(p) in own]
            if params:
                groups.append({**g, "params": params, "param_names": None})
                seen.update(id(p) for p in params)
    rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    for decay in (True, False):
        params = [p for n, p in rest if no_weight_decay(n, p) != decay]
        if params:
            groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_scale": 1.0})
    for g in groups:
        g.pop("param_names", None)
    return groups


# ---------------------------------------------------------------- data
def _with_transforms(ds: Dataset, transforms: Callable) -> Dataset:
    out = copy.copy(ds)
    out.transforms = transforms
    return out


def detection_datasets(cfg: DetectConfig) -> tuple[Dataset, Dataset, list[str]]:
    """(train, val, class names with "background" first), every file checked."""
    require("pycocotools", what="detection")
    d = cfg.data
    if d.format == "pennfudan":
        full = pennfudan(d.root)
        train_idx, val_idx = split_indices(len(full), d.test_split, d.split_seed)
        train = Subset(_with_transforms(full, detection_transforms(True)), train_idx)
        val = Subset(_with_transforms(full, detection_transforms(False)), val_idx)
        classes = ["background", "pedestrian"]
    elif d.format == "coco":
        for key in ("train_images", "train_ann", "val_images", "val_ann"):
            if not getattr(d, key):
                raise ValueError(f"data.format coco needs --data.{key}")
        train = CocoDetection(d.train_images, d.train_ann, cfg.masks, transforms=detection_transforms(True))
        val = CocoDetection(d.val_images, d.val_ann, cfg.masks, keep_crowd=True, transforms=detection_transforms(False))
        if val.names != train.names:
            raise ValueError(f"categories differ between {d.train_ann} and {d.val_ann}")
        classes = train.names
    else:
        raise ValueError(f"data.format must be pennfudan or coco, not {d.format!r}")
    if d.classes and d.classes != classes:
        raise ValueError(f"the run was made for classes {d.classes}, the data has {classes}")
    return train, val, classes


def segmentation_datasets(cfg: SegmentConfig, val_split: str | None = None) -> tuple[Dataset, Dataset]:
    """(train, val) label-PNG folders, every pair and every label checked; `val_split` picks another camvid split."""
    d = cfg.data
    train_tf = segmentation_transforms(True, tuple(d.crop), tuple(d.ratio_range), ignore_index=255)
    train_tf = _scaled(train_tf, tuple(d.scale))
    if d.format == "camvid":
        if d.num_classes != 11:
            raise ValueError("data.format camvid has 11 classes; use data.format folder for other label sets")
        train = camvid(d.root, d.train_split, train_tf, d.unknown_ids)
        val = camvid(d.root, val_split or d.val_split, segmentation_transforms(False, tuple(d.crop)), d.unknown_ids)
    elif d.format == "folder":
        spec = LabelSpec(d.num_classes, 255, tuple(d.ignore_ids), d.unknown_ids)
        train = SegmentationFolder(d.train_images, d.train_labels, spec, train_tf)
        val = SegmentationFolder(d.val_images, d.val_labels, spec, segmentation_transforms(False, tuple(d.crop)))
    else:
        raise ValueError(f"data.format must be camvid or folder, not {d.format!r}")
    return train, val


def _scaled(tf: Callable, scale: tuple[int, int]) -> Callable:
    """Point the ScaleJitter of a training pipeline at the configured base scale (it was built with the crop)."""
    for t in getattr(tf, "transforms", []):
        if type(t).__name__ == "ScaleJitter":
            t.target_size = scale
    return tf


def _plain(target: dict, device: torch.device) -> dict:
    """tv_tensors -> plain tensors on `device` (torchvision's detectors want those)."""
    return {
        k: v.as_subclass(torch.Tensor).to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in target.items()
    }


# ---------------------------------------------------------------- evaluation
@torch.inference_mode()
def evaluate_detection(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    masks: bool = True,
    num_workers: int = 0,
    info: DistInfo | None = None,
) -> dict[str, float]:
    """COCO box (and mask) AP of `model` on `dataset`; keys box_AP, box_AP50, ..., mask_AP, ..., images (scored).
    In a process group each rank scores its shard (`ShardSampler`) and rank 0 pools them: every image once."""
    info = info or DistInfo()
    model.eval()
    kinds = ("bbox", "segm") if masks else ("bbox",)
    evaluator = CocoEvaluator(kinds)
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_lists, num_workers=num_workers,
                        sampler=ShardSampler(len(dataset), info))  # fmt: skip
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=True if not info.is_main else None):
        outputs = model([im.as_subclass(torch.Tensor).to(device) for im in images])
        evaluator.update(targets, [{k: v.cpu() for k, v in o.items()} for o in outputs])
    if not info.distributed:
        return evaluator.compute() | {"images": len(evaluator.images)}
    parts = gather_object((evaluator.images, evaluator.gts, evaluator.dets), info)  # RLE masks: small
    pooled = _pooled(parts, kinds) if parts is not None else None
    result = pooled.compute() | {"images": len(pooled.images)} if pooled is not None else None
    return broadcast_object(result, info)


def _pooled(parts: list[tuple[list, list, dict]], kinds: tuple[str, ...]) -> CocoEvaluator:
    """One evaluator holding every rank's images, ground truth and detections, ids renumbered to stay unique."""
    out = CocoEvaluator(kinds)
    for images, gts, dets in parts:
        first_image, first_ann = len(out.images), len(out.gts)
        out.images += [{**im, "id": im["id"] + first_image} for im in images]
        out.gts += [{**g, "id": g["id"] + first_ann, "image_id": g["image_id"] + first_image} for g in gts]
        for kind in kinds:
            out.dets[kind] += [{**d, "image_id": d["image_id"] + first_image} for d in dets[kind]]
    return out


def fit_within(image: torch.Tensor, scale: tuple[int, int]) -> torch.Tensor:
    """Resize (B, 3, H, W) to fit inside `scale` (h, w), keeping the aspect ratio (mmseg's keep_ratio)."""
    h, w = image.shape[-2:]
    r = min(scale[0] / h, scale[1] / w)
    size = (max(round(h * r), 1), max(round(w * r), 1))
    if size == (h, w):
        return image
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)


@torch.inference_mode()
def segment_logits(
    model: nn.Module, image: torch.Tensor, cfg: SegmentConfig, out_size: tuple[int, int]
) -> torch.Tensor:
    """(1, K, *out_size) logits of a [0, 1] image (1, 3, H, W): resized to the test scale, whole or sliding window."""
    d = cfg.data
    x = fit_within(image, tuple(d.test_scale))
    if d.mode == "slide":
        return predict_slide(model, x, tuple(d.slide_crop), tuple(d.slide_stride), out_size)
    if d.mode != "whole":
        raise ValueError(f"data.mode must be whole or slide, not {d.mode!r}")
    return predict_whole(model, x, out_size)


@torch.inference_mode()
def evaluate_segmentation(
    model: nn.Module,
    dataset: Dataset,
    cfg: SegmentConfig,
    device: torch.device,
    num_workers: int = 0,
    info: DistInfo | None = None,
) -> dict[str, Any]:
    """mIoU, pixel accuracy (aAcc), mean class accuracy, per-class IoU and the images scored, at the labels' full
    size.
    In a process group each rank scores its shard and the pixel counts are summed: every image once."""
    info = info or DistInfo()
    model.eval()
    cm = ConfusionMatrix(cfg.data.num_classes, 255)
    loader = DataLoader(dataset, batch_size=1, num_workers=num_workers, sampler=ShardSampler(len(dataset), info))
    for image, label in tqdm(loader, desc="eval", leave=False, disable=True if not info.is_main else None):
        logits = segment_logits(model, image.as_subclass(torch.Tensor).to(device), cfg, tuple(label.shape[-2:]))
        cm.update(logits.argmax(1).cpu(), label.as_subclass(torch.Tensor))
    all_reduce_sum(cm.mat, info)
    result = cm.compute() | {"images": int(all_reduce_sum(torch.tensor(len(loader)), info))}
    names = cfg.data.classes or [str(i) for i in range(cfg.data.num_classes)]
    result["IoU"] = dict(zip(names, result["IoU"]))
    return result


# ---------------------------------------------------------------- training
def train_detection(cfg: DetectConfig) -> dict[str, Any]:
    """Train (or resume) a detection run; returns the final COCO metrics plus steps and the run folder."""
    train_ds, val_ds, classes = detection_datasets(cfg)
    cfg.data.classes = classes
    log.info("detection: %d train / %d val images, classes %s", len(train_ds), len(val_ds), classes[1:])
    return _fit(cfg, build_detection_model, train_ds, DenseTask(cfg, val_ds, "mask_AP" if cfg.masks else "box_AP"))


def train_segmentation(cfg: SegmentConfig) -> dict[str, Any]:
    """Train (or resume) a segmentation run; returns the final mIoU, aAcc, per-class IoU, steps, run folder."""
    train_ds, val_ds = segmentation_datasets(cfg)
    d = cfg.data
    if d.format == "camvid":
        d.classes, d.palette = d.classes or list(CAMVID_CLASSES), d.palette or [list(c) for c in CAMVID_PALETTE]
    log.info("segmentation: %d train / %d val images, %d classes", len(train_ds), len(val_ds), d.num_classes)
    return _fit(cfg, build_segmentation_model, train_ds, DenseTask(cfg, val_ds, "mIoU"))


@dataclass
class DenseTask:
    """The engine's task for detection (torchvision's R-CNN losses, COCO AP) and segmentation (UperNet's
    cross-entropy with the auxiliary head, mIoU). `best_key`: the metric that makes best.pt."""

    cfg: DetectConfig | SegmentConfig
    val_ds: Dataset
    best_key: str
    info: DistInfo = DistInfo()

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def columns(self) -> tuple[str, ...]:
        detection = ("box_AP", "box_AP50", "mask_AP", "mask_AP50")
        metrics = ("mIoU", "aAcc", "mAcc") if self.best_key == "mIoU" else detection
        return ("epoch", "step", "lr", "train_loss", *metrics, "img_per_s", "epoch_time_s", "elapsed_s",
                "skipped_images", "data_wait_pct")  # fmt: skip

    def loss(self, model: nn.Module, images: Any, targets: Any, index: int) -> torch.Tensor:
        dev, info = self.device, self.info
        torch.manual_seed(micro_batch_seed(self.cfg.run.seed, index * info.world_size + info.rank))
        with autocast(dev, self.cfg.run.amp):
            if isinstance(self.cfg, DetectConfig):
                inputs = [im.as_subclass(torch.Tensor).to(dev, non_blocking=True) for im in images]
                losses = model(inputs, [_plain(t, dev) for t in targets])
            else:
                x = images.as_subclass(torch.Tensor).to(dev, non_blocking=True)
                y = targets.as_subclass(torch.Tensor).to(dev, non_blocking=True)
                losses = segmentation_loss(model(x), y, 255, self.cfg.aux_weight)
        return sum(v.float() for v in losses.values())

    def evaluate(self, model: nn.Module, ema: nn.Module | None) -> dict[str, Any]:
        workers, info = self.cfg.run.num_workers, self.info
        broadcast_buffers(model, info)  # every rank scores its shard with the weights rank 0 saves
        if isinstance(self.cfg, DetectConfig):
            return evaluate_detection(model, self.val_ds, self.device, self.cfg.masks, workers, info)
        return evaluate_segmentation(model, self.val_ds, self.cfg, self.device, workers, info)

    def summary(self, row: dict[str, Any]) -> str:
        keys = [self.best_key] + [k for k in ("box_AP", "box_AP50", "mask_AP50", "aAcc") if k != self.best_key]
        return "  ".join(f"{k} {row[k]:.4f}" for k in keys if isinstance(row.get(k), (int, float)))

    def epoch_end(self, model: nn.Module, rows: list[dict[str, Any]]) -> None:
        pass


class _Batches:
    """A collate function that gives the engine its (inputs, targets, skipped images) batches (picklable for
    loader workers)."""

    def __init__(self, collate: Callable | None):
        self.collate = collate or default_collate

    def __call__(self, batch: list) -> tuple[Any, Any, int]:
        inputs, targets = self.collate(batch)
        return inputs, targets, 0


def _fit(cfg: DetectConfig | SegmentConfig, build: Callable, train_ds: Dataset, task: DenseTask) -> dict[str, Any]:
    r = cfg.run
    with joined(r.device) as info, contextlib.ExitStack() as held:  # the lock is held until the run ends
        run = RunFolder(r.resume or r.output, resume=r.resume is not None, overwrite=r.overwrite, files=RUN_FILES)
        r.output, r.resume = str(run.path), r.resume if run.resume else None  # stopped before a checkpoint: anew
        task.info = info
        _device_defaults(r, info)
        if r.threads and info.device.type == "cpu":
            torch.set_num_threads(r.threads)
        if r.batch_size < 1 or r.batch_size > len(train_ds):
            raise ValueError(
                f"batch size {r.batch_size} must be between 1 and the training set's {len(train_ds)} images"
            )
        per_rank = per_rank_batch(r.batch_size, r.accum_steps, info, len(train_ds))

        torch.manual_seed(r.seed)
        state = run.load_last() if r.resume else None
        model = build(cfg if state is None else _architecture_only(cfg))
        if state is not None:
            restore_weights(model, state, str(run.last))
        model.to(info.device)
        if r.grad_checkpointing:
            trunk = backbone_of(model)
            if trunk is None or not hasattr(trunk, "set_grad_checkpointing"):
                raise ValueError("run.grad_checkpointing: this backbone cannot checkpoint its blocks")
            trunk.set_grad_checkpointing(True)
        model = sync_batchnorm(model, info)  # the saved weights keep their names: SyncBatchNorm's are BatchNorm's
        forward = wrap(model, info)
        o = cfg.optim
        optimizer = torch.optim.AdamW(optimizer_groups(model, o.weight_decay, o.layer_decay), lr=o.lr,
                                      betas=tuple(o.betas))  # fmt: skip
        scaler = torch.amp.GradScaler("cuda") if r.amp == "fp16" else None
        train_set = SeededDataset(train_ds, r.seed)
        sampler = ResumableSampler(train_set, info, r.seed, shuffle=True, drop_last=True, block=per_rank)
        loader = DataLoader(  # its own generator: starting an epoch must not draw from the global RNG (exact resume)
            train_set, batch_size=per_rank, sampler=sampler, drop_last=True, num_workers=r.num_workers,
            pin_memory=r.pin_memory and info.device.type == "cuda",
            collate_fn=_Batches(collate_lists if isinstance(cfg, DetectConfig) else None), generator=torch.Generator(),
        )  # fmt: skip
        loop = Loop(r.epochs, len(loader) // r.accum_steps, per_rank, r.accum_steps, o.clip_grad, r.budget_min,
                    r.ckpt_every_steps, r.eval_every, max_steps=r.max_steps)  # fmt: skip
        trainer = Trainer(
            task, run, model=model, optimizer=optimizer, loader=loader, sampler=sampler, info=info, loop=loop,
            lr=LrShape(o.lr, "cosine", o.min_lr), sched=schedule(loop, o.warmup_steps), config=cfg.to_dict(),
            forward=forward, scaler=scaler, state=state,
        )  # fmt: skip
        out = trainer.fit(held)
        result = {k: v for k, v in out["row"].items() if k not in _TRAIN_KEYS}
        result |= {"steps": out["steps"], "epochs_done": trainer.epoch + trainer.epoch_step / loop.steps_per_epoch,
                   "run_dir": str(run.path), "params": sum(p.numel() for p in model.parameters()),
                   "train_time_s": round(out["train_s"], 1)}  # fmt: skip
        if info.is_main:
            run.write_json("results.json", result)
        return result


def _device_defaults(r: Any, info: DistInfo) -> None:
    """Resolve amp "auto" and the loader workers into the run's config (saved in config.json), set the CUDA
    switches, and say once what the run uses."""
    r.amp = resolve_amp(r.amp, info.device)
    if r.amp == "fp16" and info.device.type != "cuda":
        raise ValueError("run.amp fp16 needs CUDA; use bf16 or none on the CPU")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    r.num_workers = loader_workers(r.num_workers, local)
    on = cuda_switches(info.device, r.tf32, r.cudnn_benchmark)
    if info.is_main:
        switches = "".join(f", {k} {'on' if v else 'off'}" for k, v in on.items())
        pinned = ", pinned memory" if r.pin_memory and info.device.type == "cuda" else ""
        log.info("device %s x %d: amp %s%s%s, %d loader workers per process", info.device, info.world_size, r.amp,
                 switches, pinned, r.num_workers)  # fmt: skip


def micro_batch_seed(seed: int, position: int) -> int:
    """The seed of the micro-batch at `position` in the run's global order (rank r of N processes holds
    positions r, r + N, ...: the sampler's interleaving), so its random draws do not depend on N."""
    key = hashlib.blake2b(f"dense:{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(key, "little") & (2**63 - 1)


_TRAIN_KEYS = ("epoch", "step", "lr", "train_loss", "img_per_s", "epoch_time_s", "skipped_images", "data_wait_pct",
               "elapsed_s")  # fmt: skip


# ---------------------------------------------------------------- run folders
def _architecture_only(cfg: DetectConfig | SegmentConfig) -> DetectConfig | SegmentConfig:
    """A copy that builds the run's model without its initial weights (the run's checkpoint replaces them)."""
    out = copy.deepcopy(cfg)
    out.backbone.checkpoint, out.backbone.pretrained_run, out.backbone.pretrained = None, None, False
    if not out.backbone.model.startswith("hf-hub:"):
        out.backbone.model = out.backbone.model.split(".")[0]  # a weight tag would mean its weights
    return out


def load_config(run_dir: str | Path) -> DetectConfig | SegmentConfig:
    """The typed config saved in a run folder (detection or segmentation, told apart by its fields)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json)")
    d = json.loads(path.read_text())
    return from_dict(d, DetectConfig if "masks" in d else SegmentConfig)


def load_dense_run(run_dir: str | Path, which: str = "best") -> tuple[nn.Module, DetectConfig | SegmentConfig]:
    """(model in eval mode on CPU, config) from a detection or segmentation run folder ("best" or "last")."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    path = run_dir / f"{which}.pt"
    if which == "best" and not path.exists():
        path = run_dir / "last.pt"
    state = ckpt.load(path)
    arch = _architecture_only(cfg)
    model = build_detection_model(arch) if isinstance(cfg, DetectConfig) else build_segmentation_model(arch)
    ckpt.check_compatible(model, state["model"], f"checkpoint {path}")
    model.load_state_dict(state["model"])
    return model.eval(), cfg
