"""Class imbalance: the class counts of a training set, loss weights per class (inverse frequency), and a
class-balanced sampler that resumes mid-epoch and shards over processes like `distributed.ResumableSampler`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice
from typing import Any

import torch
from torch.utils.data import Sampler

from convnext.engine.distributed import DistInfo

MODES = ("none", "sampler", "weights", "auto")


def class_counts(targets: Sequence[int] | torch.Tensor, num_classes: int) -> list[int]:
    """Images per class (a class with none counts 0)."""
    t = torch.as_tensor(list(targets) if not isinstance(targets, torch.Tensor) else targets, dtype=torch.int64)
    return torch.bincount(t, minlength=num_classes)[:num_classes].tolist()


def imbalance_ratio(counts: Sequence[int]) -> float:
    """The largest class's count over the smallest non-empty one's (1.0 for a balanced set)."""
    present = [c for c in counts if c > 0]
    return max(present) / min(present) if present else 1.0


def class_weights(counts: Sequence[int]) -> torch.Tensor:
    """Cross-entropy weights by inverse frequency, scaled so that the average image weighs 1 (the loss keeps its
    size, and the lr its meaning): w_c = N / (C * n_c). A class with no image gets 0."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    present = n > 0
    w = torch.zeros_like(n)
    w[present] = n.sum() / (present.sum() * n[present])
    return w.float()


def targets_of(dataset: Any) -> list[int]:
    """The labels of a dataset that lists them (`targets`: image folders, CIFAR, digits, the decoded cache)."""
    t = getattr(dataset, "targets", None)
    if t is None and hasattr(dataset, "dataset"):  # SeededDataset and other wrappers
        return targets_of(dataset.dataset)
    if t is None:
        raise ValueError(f"{type(dataset).__name__} does not list its labels: class balance needs them")
    return t.tolist() if isinstance(t, torch.Tensor) else list(t)


class BalancedSampler(Sampler[int]):
    """Each epoch draws as many indices as the dataset has images (as DistributedSampler with drop_last keeps),
    with replacement, every class equally likely; process r takes draws r, r + world, ... and `set_epoch(e, skip)`
    starts `skip` draws in. The order depends on (seed, epoch) only, so a resumed run draws the same images."""

    def __init__(self, targets: Sequence[int], num_classes: int, info: DistInfo, seed: int):
        counts = class_counts(targets, num_classes)
        per_class = torch.tensor([1.0 / counts[t] for t in targets], dtype=torch.float64)
        self.weights, self.seed = per_class / per_class.sum(), seed
        self.rank, self.world = info.rank, info.world_size
        self.num_samples = len(targets) // self.world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)  # DistributedSampler's seed + epoch
        draws = torch.multinomial(self.weights, self.num_samples * self.world, replacement=True, generator=g)
        return islice(iter(draws[self.rank :: self.world].tolist()), self.skip, None)

    def __len__(self) -> int:
        return max(self.num_samples - self.skip, 0)
