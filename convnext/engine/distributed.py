"""torchrun / SLURM / DistributedDataParallel / FSDP plumbing: process group (gloo on CPU, nccl on CUDA), samplers,
and every collective the jobs run.

Launch with `torchrun --nproc_per_node N -m convnext train ...` (or `srun` under SLURM: its variables are read when
torchrun's are absent); without either environment everything here degrades to a single process. Only rank 0 logs
and writes files.

Collectives go through this module only (tests/engine/test_collectives.py checks it): each moves its tensor to the
device the process group serves (this process's GPU for nccl, the CPU for gloo) and back, so a job can hand in a
CPU tensor under nccl or a CUDA tensor under gloo.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

log = logging.getLogger("convnext.train")

DEFAULT_PORT = 29500  # torchrun's default, used under SLURM when MASTER_PORT is not set


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: bool = False  # in a process group even with one process (CONVNEXT_PROCESS_GROUP=1: the GPU check)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """In a process group: DDP, samplers and collectives take their multi-process paths."""
        return self.world_size > 1 or self.group


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


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[03-05,9],cpu1" -> "gpu03", "a1,b2" -> "a1"."""
    m = re.match(r"([^,\[]*)(?:\[([^\]\-,]+)[^\]]*\]([^,]*))?", nodelist.strip())
    if not m or not m.group(1) and not m.group(2):
        raise ValueError(f"SLURM_NODELIST {nodelist!r} names no host")
    return m.group(1) + (m.group(2) or "") + (m.group(3) or "")


def launch_env(env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, else SLURM's (srun: SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID), else one process. Under SLURM it also sets what `init_process_group` reads: RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR (the first host of SLURM_NODELIST unless set) and MASTER_PORT (29500 unless set)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))
    rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0"))
    if world > 1:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if "MASTER_ADDR" not in env:
            if not nodes:
                raise ValueError("SLURM_NTASKS > 1 but neither MASTER_ADDR nor SLURM_NODELIST is set")
            env["MASTER_ADDR"] = first_host(nodes)
        env.setdefault("MASTER_PORT", str(DEFAULT_PORT))
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    return rank, world, local


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when there is more than one process (nccl for CUDA, gloo for CPU), or with one
    process when CONVNEXT_PROCESS_GROUP=1 (then MASTER_ADDR / MASTER_PORT must be set, as torchrun does): one GPU
    then runs the multi-process paths, which is how benchmarks/gpu_check.py checks them."""
    rank, world, local_rank = launch_env()
    dev = resolve_device(device, local_rank)
    group = world > 1 or os.environ.get("CONVNEXT_PROCESS_GROUP") == "1"
    if group and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, dev, group=group)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- collectives (the only calls in the package)
def served_devices(backend: str) -> set[str]:
    """Device types a backend's collectives take: "nccl" -> {"cuda"}, "gloo" -> {"cpu"}, "cpu:gloo,cuda:nccl" ->
    both. (gloo also takes CUDA tensors, through a host copy of its own; here it gets CPU tensors.)"""
    out = set()
    for part in backend.lower().split(","):
        dev, _, name = part.rpartition(":")
        out.add(dev or ("cuda" if name == "nccl" else "cpu"))
    return out


def group_device(t: torch.Tensor | None = None) -> torch.device:
    """The device a collective on `t` runs on: `t`'s own when the group serves it, else the one it serves (this
    process's current GPU for nccl)."""
    served = served_devices(str(dist.get_backend()))
    if t is not None and t.device.type in served:
        return t.device
    return torch.device("cuda", torch.cuda.current_device()) if "cuda" in served else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `t` over processes, in place, on the device the group serves (`t` stays where it is); a no-op in one
    process. Returns `t`."""
    if info.distributed:
        dev = group_device(t)
        x = t if t.device == dev else t.to(dev)
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        if x is not t:
            t.copy_(x)
    return t


def broadcast_buffers(model: nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) into every rank's `model`, in place: DDP sends them at
    each forward, so after the last training step the other ranks hold their own; evaluation needs rank 0's."""
    if not info.distributed:
        return
    for buf in model.buffers():
        dev = group_device(buf)
        x = buf if buf.device == dev else buf.to(dev)
        dist.broadcast(x, src=0)
        if x is not buf:
            buf.copy_(x)


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's value on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: object, info: DistInfo) -> list:
    """Every rank's `obj`, in rank order, on every rank ([obj] in one process)."""
    if not info.distributed:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: object, info: DistInfo) -> list | None:
    """Every rank's `obj` in rank order on rank 0, None elsewhere ([obj] in one process)."""
    if not info.distributed:
        return [obj]
    out: list | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def check_same_file(path: Path, info: DistInfo, what: str = "run folder") -> bool:
    """Whether every rank sees rank 0's `path` (a file rank 0 has just written) with the same bytes; a rank that
    does not logs one warning line. A resumed multi-process run needs its run folder on a shared filesystem."""
    if not info.distributed:
        return True

    def digest() -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"

    theirs = broadcast_object(digest() if info.is_main else None, info)  # the others read after rank 0 wrote
    mine = theirs if info.is_main else digest()
    if mine == theirs:
        return True
    seen = "does not exist" if mine == "missing" else "differs"
    log.warning("rank %d: %s (the %s) %s here: put the run folder on a filesystem every machine shares, or a "
                "resume will not find it", info.rank, path, what, seen)  # fmt: skip
    return False


def check_same(what: str, value: Callable[[], object], info: DistInfo, hint: str = "") -> None:
    """One line on every rank, before any work, when a rank's `value()` (a digest of what it is about to use) is not
    rank 0's: every rank raises the same error (no rank waits on the others in a collective). `value` is called in
    a process group only (a data digest stats every file: a single process pays nothing)."""
    if not info.distributed:
        return
    values = all_gather_object(value(), info)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        who = f"rank {differ[0]}" if len(differ) == 1 else f"ranks {', '.join(map(str, differ))}"
        raise ValueError(f"{who} of {info.world_size} see{'s' if len(differ) == 1 else ''} another {what} than rank 0"
                         + (f": {hint}" if hint else ""))  # fmt: skip


def data_digest(dataset: Any) -> str:
    """A digest of what a dataset holds, to compare between ranks: the images' file names (class folder / name),
    sizes in bytes and labels for datasets of files (one stat per file), else its length and labels (CIFAR, digits).
    Paths are taken below the class folder, so the same data mounted at another path on another machine matches."""
    indices = None
    while hasattr(dataset, "indices") and hasattr(dataset, "dataset"):  # a Subset (val_split), maybe nested
        base = [indices[i] for i in dataset.indices] if indices is not None else list(dataset.indices)
        dataset, indices = dataset.dataset, base
    samples = getattr(dataset, "samples", None)
    h = hashlib.sha256()
    if samples is not None:
        for i in indices if indices is not None else range(len(samples)):
            path, target = Path(samples[i][0]), samples[i][1]
            h.update(f"{path.parent.name}/{path.name}\t{path.stat().st_size}\t{target}\n".encode())
    else:
        targets = list(getattr(dataset, "targets", []))
        picked = [targets[i] for i in indices] if indices is not None and targets else targets
        h.update(f"{len(indices) if indices is not None else len(dataset)}\t{picked}".encode())
    return h.hexdigest()


# ---------------------------------------------------------------- samplers
class ResumableSampler(Sampler[int]):
    """DistributedSampler's shuffled shard for an epoch, starting `skip` samples in (for resuming mid-epoch).

    The order depends on (seed, epoch) only. With one process it is a plain seeded shuffle of the dataset.
    `block` > 0 deals the shuffled order out in blocks of `block` images instead of one by one: global micro-batch
    k (k = micro-batch index x processes + rank) holds positions [k * block, (k + 1) * block), so N processes with
    micro-batches of `block` see the same batches as one process accumulating N of them (BatchNorm's statistics
    included). It drops the last incomplete round of blocks.
    """

    def __init__(
        self, dataset: Dataset, info: DistInfo, seed: int, shuffle: bool = True, drop_last: bool = True, block: int = 0
    ):
        self.inner = DistributedSampler(
            dataset, num_replicas=info.world_size, rank=info.rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.info, self.block, self.n, self.skip = info, block, len(dataset), 0  # type: ignore[arg-type]

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip = skip

    def _blocks(self) -> list[int]:
        inner, world, b = self.inner, self.info.world_size, self.block
        order = list(range(self.n))
        if inner.shuffle:  # DistributedSampler's permutation of the epoch
            g = torch.Generator().manual_seed(inner.seed + inner.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        starts = [(k * world + self.info.rank) * b for k in range(self.n // (world * b))]  # this rank's blocks
        return [i for s in starts for i in order[s : s + b]]

    def __iter__(self) -> Iterator[int]:
        return islice(iter(self._blocks() if self.block else self.inner), self.skip, None)

    def __len__(self) -> int:
        mine = (self.n // (self.info.world_size * self.block)) * self.block if self.block else len(self.inner)
        return max(mine - self.skip, 0)


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
    """This process's place in the run: joins the process group (when there is more than one process) for as long
    as the block runs, and leaves it after, if it was the one that joined."""
    started = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    try:
        yield info
    finally:
        if started and info.distributed:
            cleanup()


# ---------------------------------------------------------------- model wrappers
def wrap(model: nn.Module, info: DistInfo, **ddp_kwargs: Any) -> nn.Module:
    """DistributedDataParallel around `model` in a process group, else `model` itself."""
    if not info.distributed:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, **ddp_kwargs)


def sync_batchnorm(model: nn.Module, info: DistInfo) -> nn.Module:
    """BatchNorm layers as SyncBatchNorm in a CUDA process group (statistics over the global batch). PyTorch's
    SyncBatchNorm has no CPU kernel: a CPU group keeps per-process statistics, and says so once."""
    if not info.distributed or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if info.device.type != "cuda":
        if info.is_main:
            log.warning("BatchNorm statistics are per process: SyncBatchNorm needs CUDA")
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


SHARDED_MODELS = ("convnext_xlarge", "convnext_xxlarge", "convnextv2_huge")  # too large for a replica per GPU


def check_shard(model_name: str, info: DistInfo, force: bool = False) -> None:
    """One line, before any work, when --shard cannot or need not run: no process group, or a model that fits
    as a DDP replica. Decided by the architecture's name, so `model.kwargs` may reshape an XL/XXL/V2-huge (the CLI
    tests shard an XXL shrunk to a tiny width); `force` lets a function-level test shard any model."""
    if not info.distributed:
        raise ValueError("--shard (FSDP) needs a process group of 2 or more processes: start with torchrun or srun")
    arch = model_name.split(".")[0]
    if arch not in SHARDED_MODELS and not force:
        raise ValueError(f"--shard is for {', '.join(SHARDED_MODELS)}; {arch} fits on each GPU as a DDP replica: "
                         "drop --shard")  # fmt: skip


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: a ConvNeXt's blocks (stem, downsamples and head go with the root)."""
    units = [b for s in getattr(model, "stages", []) for b in getattr(s, "blocks", [])]
    if not units:
        raise ValueError(f"{type(model).__name__} has no stages of blocks to shard")
    return units


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` was sharded by `shard` (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(*models: nn.Module | None) -> Iterator[None]:
    """The sharded `models`' full weights on every rank for the block (evaluation): gathered once on entry and kept,
    so each forward runs without collectives and ranks may run different numbers of batches (each scores its own
    shard of the val set); sharded again on exit. Models that are not sharded pass through. Enter on every rank."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for model in models if model is not None for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def shard(model: nn.Module, info: DistInfo) -> nn.Module:
    """FSDP2 (`fully_shard`) on each block, then the root: parameters, gradients and optimizer state are split over
    the ranks; each block's full weights exist only during its forward and backward. Returns `model` (in place)."""
    if not info.distributed:
        raise ValueError("--shard needs a process group of 2 or more processes: start with torchrun or srun")
    from torch.distributed.fsdp import fully_shard

    for unit in shard_units(model):
        fully_shard(unit)
    fully_shard(model, reshard_after_forward=True)  # as the blocks (the root's default differs): `gathered` restores it
    return model


def per_rank_batch(batch_size: int, accum_steps: int, info: DistInfo, n_train: int) -> int:
    """Each process's micro-batch for `batch_size` images per optimizer step."""
    parts = info.world_size * accum_steps
    if batch_size < 1 or batch_size % parts:
        raise ValueError(f"batch size {batch_size} must be a positive multiple of processes x accum_steps ({parts})")
    if batch_size > n_train:
        raise ValueError(f"batch size {batch_size} is larger than the training set ({n_train} images)")
    return batch_size // parts
