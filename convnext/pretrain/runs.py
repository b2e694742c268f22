"""A pre-training run folder read back: its config, its weight file, its encoder as a model. Fine-tuning from it is
`convnext train --model RUN` (or `--pretrained-run RUN`, the same): `convnext.train.start` reads it and
`convnext.train.finetune` chooses the settings for an FCMAE encoder.

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
from convnext.pretrain.config import PretrainConfig
from convnext.resolve import is_pretrain_run, resolve


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
