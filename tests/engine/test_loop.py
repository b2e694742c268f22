"""The engine's epoch loop and schedule helpers on toy models: no data, no run folder."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convnext.engine.distributed import DistInfo
from convnext.engine.loop import (
    NonFiniteLossError,
    cuda_switches,
    loader_workers,
    rate_text,
    resolve_amp,
    train_one_epoch,
)
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


class NanAfter(nn.Module):
    """A linear model whose output turns NaN from its `bad`-th forward on (0-based)."""

    def __init__(self, bad: int):
        super().__init__()
        self.fc, self.bad, self.calls = nn.Linear(4, 3), bad, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.fc(x)
        return out * float("nan") if self.calls > self.bad else out


def _toy(n: int) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 4, generator=g), torch.randint(0, 3, (2,), generator=g), 0) for _ in range(n)]


def test_a_nan_is_read_at_the_epoch_end_not_every_step():
    """check_every larger than the epoch: no check mid-epoch, the end's reduction finds the NaN of step 2."""
    model = NanAfter(bad=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan or inf at optimizer step 2 \(train\)"):
        train_one_epoch(model, _toy(6), opt, info=DistInfo(), loss_fn=cross_entropy, lr_fn=lambda s: 0.1, step=0,
                        check_every=100)  # fmt: skip
    assert model.calls == 6  # it trained on: the flag stayed on the device


def test_a_save_reads_the_flag_first():
    """A checkpoint save (on_step asking for loss_so_far) stops at the NaN instead of saving its weights."""
    model, saved = NanAfter(bad=1), []

    def on_step(step: int, n: int, loss_so_far) -> None:
        if step % 3 == 0:
            saved.append((step, loss_so_far()))

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError, match="at optimizer step 1"):
        train_one_epoch(model, _toy(6), opt, info=DistInfo(), loss_fn=cross_entropy, lr_fn=lambda s: 0.1, step=0,
                        on_step=on_step, check_every=100)  # fmt: skip
    assert saved == [] and model.calls == 3


def test_check_every_stops_within_n_steps():
    model = NanAfter(bad=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError, match="at optimizer step 0"):
        train_one_epoch(model, _toy(8), opt, info=DistInfo(), loss_fn=cross_entropy, lr_fn=lambda s: 0.1, step=0,
                        check_every=2)  # fmt: skip
    assert model.calls == 2


def test_finite_losses_sum_as_before():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    batches = _toy(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    r = train_one_epoch(model, batches, opt, info=DistInfo(), loss_fn=cross_entropy, lr_fn=lambda s: 0.0, step=0,
                        check_every=3, carry=(1.5, 2))  # fmt: skip
    with torch.no_grad():
        want = sum(float(F.cross_entropy(model(x), y)) * len(y) for x, y, _ in batches)
    assert r["images"] == 8 and r["loss_images"] == 10
    assert abs(r["loss_sum"] - (want + 1.5)) < 1e-9


def test_gpu_defaults_on_the_cpu():
    """amp "auto" is none on the CPU (bf16 / fp16 only on CUDA), CUDA switches do nothing, workers fit the cores."""
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) == "none" and resolve_amp("bf16", cpu) == "bf16"
    assert cuda_switches(cpu) == {}
    assert loader_workers(3) == 3 and 0 <= loader_workers(None) <= 8
    assert loader_workers(None, local_processes=10_000) == 0
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        loader_workers(-1)


def test_progress_lines_show_a_detectors_slow_rate_instead_of_zero():
    assert [rate_text(r) for r in (0.27, 3.456, 9.96, 10.4, 1144.2)] == ["0.27", "3.5", "10", "10", "1144"]
