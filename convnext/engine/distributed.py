"""torchrun / DistributedDataParallel plumbing: process group (gloo on CPU, nccl on CUDA), samplers, reductions.

Launch with `torchrun --nproc_per_node N -m convnext train ...`; without torchrun's environment everything here
degrades to a single process. Only rank 0 logs and writes files.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

log = logging.getLogger("convnext.train")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """ "auto" -> cuda when available, else cpu; "cuda" -> this process's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but no CUDA GPU is available")
        return torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
    if device != "cpu":
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's process group when WORLD_SIZE > 1 (nccl for CUDA, gloo for CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over processes (a no-op in one process)."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's value on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class ResumableSampler(Sampler[int]):
    """DistributedSampler's shuffled shard for an epoch, starting `skip` samples in (for resuming mid-epoch).

    The order depends on (seed, epoch) only. With one process it is a plain seeded shuffle of the dataset.
    """

    def __init__(self, dataset: Dataset, info: DistInfo, seed: int, shuffle: bool = True, drop_last: bool = True):
        self.inner = DistributedSampler(
            dataset, num_replicas=info.world_size, rank=info.rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return islice(iter(self.inner), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.inner) - self.skip, 0)


class ShardSampler(Sampler[int]):
    """Evaluation shard: rank r takes indices r, r + world, ... with no padding, so every image counts once."""

    def __init__(self, n: int, info: DistInfo):
        self.indices = list(range(info.rank, n, info.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@contextlib.contextmanager
def joined(device: str = "auto") -> Iterator[DistInfo]:
    """This process's place in the run: joins torchrun's process group (when WORLD_SIZE > 1) for as long as the
    block runs, and leaves it after, if it was the one that joined."""
    started = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    try:
        yield info
    finally:
        if started and info.distributed:
            cleanup()


def wrap(model: nn.Module, info: DistInfo, **ddp_kwargs: Any) -> nn.Module:
    """DistributedDataParallel around `model` in a process group, else `model` itself."""
    if not info.distributed:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, **ddp_kwargs)


def per_rank_batch(batch_size: int, accum_steps: int, info: DistInfo, n_train: int) -> int:
    """Each process's micro-batch for `batch_size` images per optimizer step."""
    parts = info.world_size * accum_steps
    if batch_size < 1 or batch_size % parts:
        raise ValueError(f"batch size {batch_size} must be a positive multiple of processes x accum_steps ({parts})")
    if batch_size > n_train:
        raise ValueError(f"batch size {batch_size} is larger than the training set ({n_train} images)")
    return batch_size // parts
