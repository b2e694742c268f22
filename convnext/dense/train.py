"""Train and evaluate detection (Mask/Faster R-CNN) and segmentation (UperNet) runs: plain functions.

`train_detection(cfg)` / `train_segmentation(cfg)` check the data and the run folder before any work, then train
with the paper's downstream recipe (AdamW, layer-wise lr decay on the backbone, stochastic depth, multi-scale
resize), evaluate (COCO box/mask mAP; mIoU), and return the metrics. A run folder holds config.json,
metrics.jsonl, last.pt (written atomically every `ckpt_every_steps` steps, at every epoch end and when the run is
interrupted by an error or Ctrl-C), best.pt and results.json. `run.resume` continues from last.pt at the step it
stopped; augmentation is a function of (seed, epoch, index) so the resumed run sees the same samples.
Optimizer groups, schedules, checkpoints, samplers and overrides are the classification trainer's
(`convnext.train`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from convnext.data import SeededDataset
from convnext.dense.backbone import backbone_of, build_backbone, detector
from convnext.dense.config import DetectConfig, SegmentConfig
from convnext.dense.data import (
    CAMVID_CLASSES,
    CAMVID_PALETTE,
    CocoDetection,
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
from convnext.engine import interrupt
from convnext.engine.distributed import DistInfo, ResumableSampler, resolve_device
from convnext.extras import require
from convnext.train.config import from_dict
from convnext.train.loop import NonFiniteLossError
from convnext.train.optim import lr_at as _lr_at
from convnext.train.optim import no_weight_decay, param_groups, set_lr
from convnext.train.runs import check_run_dir, claim_run_dir

log = logging.getLogger("convnext.dense")
RUN_FILES = ("config.json", "last.pt", "best.pt", "metrics.jsonl", "results.json")
CALIBRATION_STEPS = 5  # with a time budget, the schedule is fitted after this many steps (past the first)


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
    """AdamW groups: the ConvNeXt trunk by `convnext.train.optim.param_groups` (layer-wise lr decay, no decay on
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
    return {k: v.as_subclass(torch.Tensor).to(device) if isinstance(v, torch.Tensor) else v for k, v in target.items()}


# ---------------------------------------------------------------- evaluation
@torch.inference_mode()
def evaluate_detection(
    model: nn.Module, dataset: Dataset, device: torch.device, masks: bool = True, num_workers: int = 0
) -> dict[str, float]:
    """COCO box (and mask) AP of `model` on `dataset`; keys box_AP, box_AP50, ..., mask_AP, ..."""
    model.eval()
    evaluator = CocoEvaluator(("bbox", "segm") if masks else ("bbox",))
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_lists, num_workers=num_workers)
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=None):
        outputs = model([im.as_subclass(torch.Tensor).to(device) for im in images])
        evaluator.update(targets, [{k: v.cpu() for k, v in o.items()} for o in outputs])
    return evaluator.compute()


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
    model: nn.Module, dataset: Dataset, cfg: SegmentConfig, device: torch.device, num_workers: int = 0
) -> dict[str, Any]:
    """mIoU, pixel accuracy (aAcc), mean class accuracy and per-class IoU, scored at the labels' full size."""
    model.eval()
    cm = ConfusionMatrix(cfg.data.num_classes, 255)
    for image, label in tqdm(
        DataLoader(dataset, batch_size=1, num_workers=num_workers), desc="eval", leave=False, disable=None
    ):
        logits = segment_logits(model, image.as_subclass(torch.Tensor).to(device), cfg, tuple(label.shape[-2:]))
        cm.update(logits.argmax(1).cpu(), label.as_subclass(torch.Tensor))
    result = cm.compute()
    names = cfg.data.classes or [str(i) for i in range(cfg.data.num_classes)]
    result["IoU"] = dict(zip(names, result["IoU"]))
    return result


# ---------------------------------------------------------------- training
def train_detection(cfg: DetectConfig) -> dict[str, Any]:
    """Train (or resume) a detection run; returns the final COCO metrics plus steps and the run folder."""
    train_ds, val_ds, classes = detection_datasets(cfg)
    cfg.data.classes = classes
    log.info("detection: %d train / %d val images, classes %s", len(train_ds), len(val_ds), classes[1:])

    def loss_fn(model: nn.Module, batch: tuple, device: torch.device) -> dict[str, torch.Tensor]:
        images, targets = batch
        return model([im.as_subclass(torch.Tensor).to(device) for im in images], [_plain(t, device) for t in targets])

    def evaluate(model: nn.Module, device: torch.device) -> dict[str, float]:
        return evaluate_detection(model, val_ds, device, cfg.masks, cfg.run.num_workers)

    main = "mask_AP" if cfg.masks else "box_AP"
    with contextlib.ExitStack() as held:  # the run folder's lock, released when the run ends
        return _fit(cfg, build_detection_model, train_ds, collate_lists, loss_fn, evaluate, main, held)


def train_segmentation(cfg: SegmentConfig) -> dict[str, Any]:
    """Train (or resume) a segmentation run; returns the final mIoU, aAcc, per-class IoU, steps, run folder."""
    train_ds, val_ds = segmentation_datasets(cfg)
    d = cfg.data
    if d.format == "camvid":
        d.classes, d.palette = d.classes or list(CAMVID_CLASSES), d.palette or [list(c) for c in CAMVID_PALETTE]
    log.info("segmentation: %d train / %d val images, %d classes", len(train_ds), len(val_ds), d.num_classes)

    def loss_fn(model: nn.Module, batch: tuple, device: torch.device) -> dict[str, torch.Tensor]:
        images, labels = (b.as_subclass(torch.Tensor).to(device) for b in batch)
        return segmentation_loss(model(images), labels, 255, cfg.aux_weight)

    def evaluate(model: nn.Module, device: torch.device) -> dict[str, Any]:
        return evaluate_segmentation(model, val_ds, cfg, device, cfg.run.num_workers)

    with contextlib.ExitStack() as held:  # the run folder's lock, released when the run ends
        return _fit(cfg, build_segmentation_model, train_ds, None, loss_fn, evaluate, "mIoU", held)


def _fit(
    cfg: DetectConfig | SegmentConfig,
    build: Callable,
    train_ds: Dataset,
    collate: Callable | None,
    loss_fn: Callable,
    evaluate: Callable,
    main_metric: str,
    held: contextlib.ExitStack,
) -> dict[str, Any]:
    r = cfg.run
    run_dir = Path(r.resume or r.output)
    r.output = str(run_dir)
    old_files = check_run_dir(run_dir, r.resume is not None, r.overwrite, RUN_FILES)
    device = resolve_device(r.device)
    if r.threads and device.type == "cpu":
        torch.set_num_threads(r.threads)
    if r.batch_size < 1 or r.batch_size > len(train_ds):
        raise ValueError(f"batch size {r.batch_size} must be between 1 and the training set's {len(train_ds)} images")
    steps_per_epoch = len(train_ds) // r.batch_size

    torch.manual_seed(r.seed)
    state = ckpt.load(run_dir / "last.pt") if r.resume else None
    model = build(cfg if state is None else _architecture_only(cfg))
    if state is not None:
        ckpt.check_compatible(model, state["model"], f"checkpoint {run_dir / 'last.pt'}")
        model.load_state_dict(state["model"])
    model.to(device)
    o = cfg.optim
    optimizer = torch.optim.AdamW(optimizer_groups(model, o.weight_decay, o.layer_decay), lr=o.lr, betas=tuple(o.betas))

    planned = r.epochs * steps_per_epoch
    sched = {"total_steps": min(planned, r.max_steps or planned), "steps_per_epoch": steps_per_epoch}
    epoch, epoch_step, step, best = 0, 0, 0, -math.inf
    if state is not None:
        if state["steps_per_epoch"] != steps_per_epoch:
            raise ValueError(
                f"{run_dir}: the run had {state['steps_per_epoch']} steps per epoch, now {steps_per_epoch}"
            )
        optimizer.load_state_dict(state["optimizer"])
        sched = state["scheduler"]
        epoch, epoch_step, step, best = state["epoch"], state["epoch_step"], state["step"], state["best"]
        ckpt.set_rng_state(state["rng"])
        log.info("resuming %s at epoch %d, step %d of %d", run_dir, epoch, step, sched["total_steps"])

    claim_run_dir(run_dir, old_files, held)  # --overwrite: the old run goes only now data and model are built
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    train_set = SeededDataset(train_ds, r.seed)
    sampler = ResumableSampler(train_set, DistInfo(device=device), r.seed, shuffle=True, drop_last=True)
    loader = DataLoader(  # its own generator: starting an epoch must not draw from the global RNG (exact resume)
        train_set,
        batch_size=r.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=r.num_workers,
        collate_fn=collate,
        generator=torch.Generator(),
    )

    def save(path: Path) -> None:
        ckpt.save_atomic(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": dict(sched),
                "rng": ckpt.rng_state(),
                "epoch": epoch,
                "epoch_step": epoch_step,
                "step": step,
                "steps_per_epoch": steps_per_epoch,
                "best": best,
                "config": cfg.to_dict(),
            },
            path,
        )

    t0, step0, saved_step = time.perf_counter(), step, step
    eval_s = 0.0  # evaluation time, not counted in the training budget

    def train_s() -> float:
        return time.perf_counter() - t0 - eval_s

    budget_s = r.budget_min * 60 if r.budget_min is not None else None
    metrics: dict[str, Any] = {}
    lr = 0.0
    bar = tqdm(total=sched["total_steps"], initial=step, desc="train", disable=None)
    try:
        while step < sched["total_steps"]:
            sampler.set_epoch(epoch, skip=epoch_step * r.batch_size)
            train_set.set_epoch(epoch)
            model.train()
            sums: dict[str, float] = {}
            n = 0
            for batch in loader:
                lr = lr_at(step, o, sched)
                set_lr(optimizer, lr)
                losses = loss_fn(model, batch, device)
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    parts = ", ".join(f"{k} {v.item():.4g}" for k, v in losses.items())
                    raise NonFiniteLossError(f"non-finite loss at step {step} ({parts})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if o.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
                optimizer.step()
                step, epoch_step, n = step + 1, epoch_step + 1, n + 1
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.item()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
                interrupt.check()  # a Ctrl-C whose KeyboardInterrupt was swallowed (convnext/interrupt.py)
                if budget_s is not None and step - step0 == CALIBRATION_STEPS + 1:
                    sched["total_steps"] = _fit_to_budget(step, step0, train_s(), budget_s, planned)
                    bar.total = sched["total_steps"]
                if step >= sched["total_steps"] or (budget_s is not None and train_s() >= budget_s):
                    sched["total_steps"] = step  # a spent budget ends the schedule here (a resume does not go on)
                    break
                if r.ckpt_every_steps and step % r.ckpt_every_steps == 0 and epoch_step < steps_per_epoch:
                    save(run_dir / "last.pt")
                    saved_step = step
            if epoch_step >= steps_per_epoch:
                epoch, epoch_step = epoch + 1, 0
            finished = step >= sched["total_steps"]
            row = {"epoch": epoch, "step": step, "lr": lr, "train_time_s": round(train_s(), 1)}
            row |= {k: v / max(n, 1) for k, v in sums.items()}
            if finished or (r.eval_every and epoch_step == 0 and epoch % r.eval_every == 0):
                t_eval = time.perf_counter()
                metrics = evaluate(model, device)
                eval_s += time.perf_counter() - t_eval
                row |= metrics
                log.info("epoch %d step %d: %s", epoch, step, _summary(metrics, main_metric))
            improved = main_metric in row and _num(row[main_metric]) > best
            best = max(best, _num(row.get(main_metric, -math.inf)))
            save(run_dir / "last.pt")
            saved_step = step
            if improved:
                shutil.copyfile(run_dir / "last.pt", run_dir / ".best.pt.tmp")
                (run_dir / ".best.pt.tmp").replace(run_dir / "best.pt")
            with (run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
    except NonFiniteLossError as e:
        last = run_dir / "last.pt"
        keep = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        raise NonFiniteLossError(f"{e}: stopping; {keep}. Try a lower --optim.lr or --optim.clip_grad 1.0") from None
    except BaseException:
        if step > saved_step:  # keep the work done: resume continues from here
            save(run_dir / "last.pt")
            log.warning(
                "interrupted at step %d; saved %s (continue with --resume %s)", step, run_dir / "last.pt", run_dir
            )
        raise
    finally:
        bar.close()
    if not metrics:  # resumed a finished run
        metrics = evaluate(model, device)
    result = {**metrics, "steps": step, "epochs_done": epoch + epoch_step / steps_per_epoch, "run_dir": str(run_dir)}
    result["params"] = sum(p.numel() for p in model.parameters())
    result["train_time_s"] = round(train_s(), 1)
    (run_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def lr_at(step: int, o: Any, sched: dict[str, int]) -> float:
    """Linear warmup over `o.warmup_steps`, then cosine to `o.min_lr` at the schedule's last step."""
    total = sched["total_steps"]
    return _lr_at(step, lr=o.lr, total_steps=total, warmup_steps=min(o.warmup_steps, total), min_lr=o.min_lr)


def _fit_to_budget(step: int, step0: int, elapsed: float, budget_s: float, planned: int) -> int:
    """The schedule's length: the steps that fit in the budget at the speed of the steps so far (max `planned`)."""
    per_step = elapsed / max(step - step0, 1)
    total = min(planned, step + int(max(budget_s - elapsed, 0) / per_step))
    log.info("time budget %.1f min: %.2f s per step -> %d steps", budget_s / 60, per_step, total)
    return max(total, step)


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not math.isnan(v) else -math.inf


def _summary(metrics: dict[str, Any], main: str) -> str:
    keys = [main] + [k for k in ("box_AP", "box_AP50", "mask_AP50", "aAcc") if k in metrics and k != main]
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)


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
