"""The engine's epoch loop and schedule helpers on toy models: no data, no run folder."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from convnext.engine.distributed import DistInfo
from convnext.engine.loop import train_one_epoch
from convnext.engine.optim import shrink_schedule


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: int) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def test_shrink_schedule_keeps_warmup_and_step_decay_shares():
    planned = {"total_steps": 1000, "warmup_steps": 100, "step_size": 300, "steps_per_epoch": 10}
    short = shrink_schedule(planned, 250)
    assert short == {"total_steps": 250, "warmup_steps": 25, "step_size": 75, "steps_per_epoch": 10}
    assert shrink_schedule(planned, 2)["step_size"] == 1


def test_off_a_terminal_an_epoch_logs_where_it_is(caplog):
    """No progress bar (a pipe, nohup, SLURM): a log line every log_every_s seconds instead."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,)), 0) for _ in range(3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.INFO, logger="convnext.train"):
        r = train_one_epoch(model, batches, opt, info=DistInfo(), loss_fn=cross_entropy, lr_fn=lambda s: 0.1, step=0,
                            desc="epoch 1/2", total=3, log_every_s=0.0)  # fmt: skip
    lines = [rec.getMessage() for rec in caplog.records if "step" in rec.getMessage()]
    assert r["steps"] == 3 and len(lines) == 3 and lines[-1].startswith("epoch 1/2  step 3/3  loss ")
