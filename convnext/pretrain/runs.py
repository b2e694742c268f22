"""A pre-training run folder read back: its encoder as a model, and the overrides that fine-tune from it.

The folder holds config.json (with an `fcmae` section), metrics.csv/.jsonl, reconstructions/epoch_NNN.png, last.pt
(model = the FCMAE state dict: `encoder.*`, `proj.*`, `mask_token`, `decoder.*`, `pred.*`) and results.json.
Any weight loader reads last.pt: `convnext.weights` recognises the FCMAE layout, keeps the encoder and drops the rest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from convnext.config import from_dict
from convnext.pretrain.config import PretrainConfig, encoder_config
from convnext.resolve import is_pretrain_run, resolve

# fine-tuning a pre-trained encoder: each layer's lr 0.7x the next one's (the head at the full lr); on CIFAR-10 with
# 5,000 labels, 8 epochs from a 1.4-epoch FCMAE run: 54.27 / 54.91% (seeds 0 / 1) against 53.19 without
FINETUNE_LAYER_DECAY = 0.7


def read_run(run_dir: str | Path) -> tuple[PretrainConfig, Path]:
    """The run's config and its weight file (last.pt); a clear error for anything else."""
    run_dir = Path(run_dir)
    if not is_pretrain_run(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a `convnext pretrain` run folder (no config.json with fcmae)")
    weights = run_dir / "last.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{run_dir} holds no weights yet ({weights.name} is missing)")
    return from_dict(json.loads((run_dir / "config.json").read_text()), PretrainConfig), weights


def load_encoder(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The run's encoder as a ConvNeXt without a head (eval mode, CPU), and the run's config.json as a plain dict
    (`convnext.resolve` reads it)."""
    read_run(run_dir)  # one clear error for anything but a pre-training run with weights
    r = resolve(run_dir)
    return r.model, r.run


def finetune_overrides(run_dir: str | Path) -> dict[str, Any]:
    """Dotted `convnext train` overrides that start from the run's encoder: the same architecture (name, stem,
    layer scale, any builder options), its weights, the normalisation it was pre-trained with, and layer-wise lr
    decay (`FINETUNE_LAYER_DECAY`) so the early layers keep more of what they learnt."""
    cfg, weights = read_run(run_dir)
    enc = encoder_config(cfg.model)
    return {
        "model.name": cfg.model.name.split(".")[0],
        "model.pretrained": False,
        "model.checkpoint": str(weights),
        "model.patch_size": enc.patch_size,
        "model.layer_scale_init": enc.layer_scale_init,
        "model.kwargs": dict(cfg.model.kwargs),
        "data.mean": tuple(cfg.data.mean),
        "data.std": tuple(cfg.data.std),
        "optim.layer_decay": FINETUNE_LAYER_DECAY,
    }
