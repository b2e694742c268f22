"""The classification model of a run: built from its config for training (`build_model`), and loaded back from a
finished run folder (`load_run`). The folder itself (claim, lock, files) is `convnext.engine.run.RunFolder`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from convnext.config import from_dict
from convnext.engine import checkpoint as ckpt
from convnext.engine.ema import ema_weights
from convnext.registry import create_model
from convnext.train.config import ModelConfig, TrainConfig


def build_model(mcfg: ModelConfig, num_classes: int, init_weights: bool = True) -> nn.Module:
    """The configured model with `num_classes` outputs; with `init_weights`, from its pretrained/checkpoint
    weights (the head adapts to the classes)."""
    kwargs = mcfg.build_kwargs() | {"num_classes": num_classes}
    if not init_weights:
        return create_model(mcfg.name.split(".")[0], **kwargs)
    return create_model(mcfg.name, pretrained=mcfg.pretrained, checkpoint=mcfg.checkpoint, **kwargs)


def load_run(run_dir: str | Path, which: str = "best", ema: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """A trained model from a run folder (in eval mode, on CPU) and its resolved config as a plain dict.

    which: "best" or "last" checkpoint; ema: the EMA weights instead of the model's. Class names are
    `cfg["data"]["classes"]`; eval preprocessing is `cfg["data"]` img_size, crop_pct, mean, std.
    """
    run_dir = Path(run_dir)
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', not {which!r}")
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json)")
    cfg_dict = json.loads(cfg_path.read_text())
    cfg = from_dict(cfg_dict, TrainConfig)
    path = run_dir / f"{which}.pt"
    if which == "best" and not path.exists():
        path = run_dir / "last.pt"
    state = ckpt.load(path)
    weights = state["model"]
    if ema:
        if state.get("ema") is None:
            raise ValueError(f"{path} holds no EMA weights (the run had ema=false)")
        weights = ema_weights(state["ema"])
    model = build_model(cfg.model, len(cfg.data.classes), init_weights=False)
    ckpt.check_compatible(model, weights, f"checkpoint {path}")
    model.load_state_dict(weights)
    return model.eval(), cfg_dict
