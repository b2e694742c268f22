"""FSDP2 (`fully_shard` per block) at 2 gloo processes on CPU: the engine's loop trains a ConvNeXt-atto (sharding
forced on a tiny model) and its EMA (sharded too) to the same bits as DDP at the same global batch (AdamW unfused:
torch's fused kernel rounds an ulp apart on shards, see tests/train/test_train_shard.py); evaluation on the gathered
weights gives DDP's logits while the ranks run different numbers of batches; and a run stopped after a sharded
checkpoint (torch.distributed.checkpoint, EMA inside) and resumed in new processes ends where the uninterrupted one
does.

Run as a script under torchrun, this file is the worker: `test_fsdp.py MODE OUT` with MODE ddp | fsdp | stop |
resume; rank 0 writes the final full weights to OUT/MODE.pt.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from convnext.engine.checkpoint import full_state, load, load_sharded, save_sharded
from convnext.engine.distributed import DistInfo, check_shard, gathered, joined, shard, wrap
from convnext.engine.ema import build_ema
from convnext.engine.loop import train_one_epoch
from convnext.registry import create_model

STEPS, STOP, GLOBAL_BATCH, SIDE = 4, 2, 4, 32


def batches(info: DistInfo, start: int, end: int) -> list:
    """Steps start..end-1: each step's global batch drawn from a generator keyed by the step; rank r its rows r::N."""
    out = []
    for step in range(start, end):
        g = torch.Generator().manual_seed(1000 + step)
        x, y = torch.randn(GLOBAL_BATCH, 3, SIDE, SIDE, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)
        out.append((x[info.rank :: info.world_size], y[info.rank :: info.world_size], 0))
    return out


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, index: int) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def worker(mode: str, out: Path) -> None:
    with joined("cpu") as info:
        torch.manual_seed(0)
        model = create_model("convnext_atto", num_classes=3, drop_path_rate=0.0)
        ema = build_ema(model, 0.9)
        if mode == "ddp":
            forward = wrap(model, info)
        else:
            check_shard("convnext_atto", info, force=True)
            forward = shard(model, info)
            shard(ema.module, info)
        opt = torch.optim.AdamW(forward.parameters(), lr=1e-3, weight_decay=0.05, foreach=False)  # plain: bitwise
        start, end = 0, STEPS
        if mode == "resume":
            start = int(load_sharded(out / "ckpt", forward, opt, ema)["step"])
        if mode == "stop":
            end = STOP
        r = train_one_epoch(forward, batches(info, start, end), opt, info=info, loss_fn=_loss, lr_fn=lambda s: 1e-3,
                            step=start, ema=ema)  # fmt: skip
        if mode == "stop":
            save_sharded(out / "ckpt", forward, opt, {"step": r["step"]}, info, ema=ema)
            return
        x = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(7))
        with torch.no_grad(), gathered(model, ema):  # rank 0 scores 2 batches, rank 1 one: no collective per forward
            logits = [(model.eval()(x), ema.module.eval()(x)) for _ in range(2 - info.rank)][0]
        sharded = mode != "ddp"
        state = {"model": full_state(model) if sharded else model.state_dict(),
                 "ema": full_state(ema) if sharded else ema.state_dict()}  # fmt: skip
        if info.is_main:
            torch.save({**state, "step": r["step"], "loss": r["loss"], "logits": logits}, out / f"{mode}.pt")


def _run(mode: str, out: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, mode,
           str(out)]  # fmt: skip
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, t in a.items():
        assert torch.equal(b[name], t), name


@pytest.mark.slow
def test_fsdp_equals_ddp_and_resumes_from_a_sharded_checkpoint(tmp_path):
    for mode in ("ddp", "fsdp", "stop", "resume"):
        _run(mode, tmp_path)
    ddp, fsdp, resumed = (load(tmp_path / f"{m}.pt") for m in ("ddp", "fsdp", "resume"))
    assert ddp["step"] == fsdp["step"] == resumed["step"] == STEPS
    start = create_model("convnext_atto", num_classes=3, drop_path_rate=0.0).state_dict()
    assert any(not torch.equal(start[k], v) for k, v in ddp["model"].items())  # it trained
    for key in ("model", "ema"):
        _equal(ddp[key], fsdp[key])
        _equal(fsdp[key], resumed[key])
    assert int(fsdp["ema"]["n_averaged"]) == STEPS
    for a, b in zip(ddp["logits"], fsdp["logits"]):  # the model's and the EMA's
        assert torch.equal(a, b)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.endswith(".pt")) == ["meta.pt"]


def test_shard_refused_without_a_group_or_for_a_small_model():
    with pytest.raises(ValueError, match="--shard \\(FSDP\\) needs a process group"):
        check_shard("convnext_xxlarge", DistInfo())
    two = DistInfo(rank=0, world_size=2)
    with pytest.raises(ValueError, match="convnext_tiny fits on each GPU as a DDP replica: drop --shard"):
        check_shard("convnext_tiny.fb_in1k", two)
    check_shard("convnext_xxlarge.fb_in22k", two)
    with pytest.raises(ValueError, match="needs a process group"):
        shard(create_model("convnext_atto"), DistInfo())


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
