"""Exponential moving average of the weights (the paper evaluates it alongside the model), built on
torch.optim.swa_utils.AveragedModel."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def build_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA copy of `model` (its first `update_parameters` copies the weights; then ema = d * ema + (1-d) * w).

    Its `.module` is an ordinary model to evaluate; its state_dict is `module.<name>` keys plus `n_averaged`.
    """
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.requires_grad_(False)
    return ema


def ema_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An EMA state_dict -> a plain model state_dict (drops the `module.` prefix and `n_averaged`)."""
    return {k.removeprefix("module."): v for k, v in state.items() if k != "n_averaged"}
