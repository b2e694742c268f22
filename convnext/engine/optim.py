"""Optimizer parameter groups (weight decay, layer-wise lr decay), the optimizer, and lr schedules as pure
functions of the step.

Layer-wise lr decay gives parameter group g the lr scale `decay ** (num_groups - 1 - g)`: the head trains at the
full lr, the stem at the smallest. The official grouping (ConvNeXt `optim_factory.py`) is written for depths
(3, 3, 27, 3): stem 0, stage 0 -> 1, stage 1 -> 2, stage 2 in groups of 3 blocks (3 .. 11), stage 3 -> 12,
head 13; with depth 9 in stage 2 it leaves groups 6-11 empty and with other stage counts it breaks (FB issue #97).
`layer_ids` numbers the same groups consecutively for any depths, so (3, 3, 27, 3) gets exactly the official
numbers and every other size a gap-free ladder: each stage is one group, except the deepest stage (stage 2 of
the 4-stage models), which is split into groups of 3 blocks; a stage's downsampling layer joins its first group.
The isotropic model gets one group per block (as ViT/BEiT do), and any other model (the roadmap ResNets)
one group per indexed block in parameter order.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from convnext.model import ConvNeXt


def no_weight_decay(name: str, p: torch.Tensor, model: nn.Module | None = None) -> bool:
    """Biases, norms, layer scale, GRN and every other 1-D parameter take no weight decay."""
    skip = getattr(model, "no_weight_decay", None)
    return p.ndim <= 1 or name.endswith(".bias") or (callable(skip) and name in skip())


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Parameter name -> layer-decay group id, and the number of groups (see the module docstring)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(model, ConvNeXt):
        return _convnext_layer_ids(model, names)
    return _generic_layer_ids(names)


def _convnext_layer_ids(model: ConvNeXt, names: list[str]) -> tuple[dict[str, int], int]:
    depths = model.cfg.depths
    if len(depths) == 1:  # isotropic: one group per block
        first = [1] * depths[0]
        starts = [[1 + j for j in range(depths[0])]]
    else:
        deep = len(depths) - 2 if len(depths) >= 3 else -1  # stage 2 of the 4-stage models
        starts, gid = [], 1
        for i, d in enumerate(depths):
            if i == deep:
                starts.append([gid + j // 3 for j in range(d)])
                gid += math.ceil(d / 3)
            else:
                starts.append([gid] * d)
                gid += 1
        first = [s[0] if s else 1 for s in starts]
    head = max(max(s) for s in starts if s) + 1
    ids = {}
    for n in names:
        m = re.match(r"stages\.(\d+)\.(blocks\.(\d+)|downsample)", n)
        if n.startswith("stem."):
            ids[n] = 0
        elif m and m.group(3) is not None:
            ids[n] = starts[int(m.group(1))][int(m.group(3))]
        elif m:
            ids[n] = first[int(m.group(1))]
        else:  # final norm and head
            ids[n] = head
    return ids, head + 1


def _generic_layer_ids(names: list[str]) -> tuple[dict[str, int], int]:
    """One group per indexed module (`layer1.0`, `blocks.3`, ...) in parameter order; a name's key is its path up
    to the last numeric component (or its first component when it has none)."""
    keys: dict[str, int] = {}
    ids = {}
    for n in names:
        parts = n.split(".")
        nums = [i for i, s in enumerate(parts[:-1]) if s.isdigit()]
        key = ".".join(parts[: nums[-1] + 1]) if nums else parts[0]
        ids[n] = keys.setdefault(key, len(keys))
    return ids, max(len(keys), 1)


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict[str, Any]]:
    """Optimizer groups: {"params", "weight_decay", "lr_scale", "name"}.

    No decay on biases, norms, 1-D params and layer scale. With `layer_decay` (e.g. 0.8), each layer-decay group
    gets `lr_scale = layer_decay ** (num_groups - 1 - id)`; the training loop sets lr = lr * lr_scale per group.
    """
    ids, n_groups = layer_ids(model) if layer_decay is not None else ({}, 1)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not no_weight_decay(name, p, model)
        gid = ids.get(name, 0)
        g = groups.get((gid, decay))
        if g is None:
            scale = layer_decay ** (n_groups - 1 - gid) if layer_decay is not None else 1.0
            g = groups[(gid, decay)] = {
                "params": [],
                "param_names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
                "name": f"layer{gid}_{'decay' if decay else 'no_decay'}",
            }
        g["params"].append(p)
        g["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    *,
    layer_decay: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """AdamW, SGD (momentum) or Muon + AdamW (`MuonAdamW`) over `param_groups(model, weight_decay, layer_decay)`."""
    groups = param_groups(model, weight_decay, layer_decay)
    if name == "adamw":
        # torch's fused kernel: ConvNeXt-T's update takes 15 instead of 51 ms on 2 CPU cores (the default is the
        # multi-tensor "foreach" one); same update, floating-point parameters on CPU or CUDA only
        params = [p for g in groups for p in g["params"]]
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "muon":
        return MuonAdamW(model, groups, lr, betas=tuple(betas), eps=eps)
    raise ValueError(f"optim.name must be 'adamw', 'sgd' or 'muon', not {name!r}")


class MuonAdamW:
    """torch.optim.Muon (momentum orthogonalised by Newton-Schulz, Jordan et al. 2024) on the blocks' 2-D weight
    matrices, with Moonshot's "match_rms_adamw" scaling so it takes AdamW's lr and weight decay; fused AdamW on
    everything else (stem, downsampling and depthwise convolutions, norms, biases, the head). One optimizer to the
    loop and the checkpoint: `param_groups` lists both, `state_dict` holds both."""

    def __init__(self, model: nn.Module, groups: list[dict[str, Any]], lr: float, *, betas: tuple, eps: float):
        head = {id(p) for n, p in model.named_parameters() if n.startswith("head.")}
        matrix, rest = [], []
        for g in groups:
            names = g.get("param_names", [None] * len(g["params"]))
            m = [(n, p) for n, p in zip(names, g["params"]) if p.ndim == 2 and id(p) not in head]
            r = [(n, p) for n, p in zip(names, g["params"]) if not (p.ndim == 2 and id(p) not in head)]
            for part, out in ((m, matrix), (r, rest)):
                if part:
                    out.append({**g, "params": [p for _, p in part], "param_names": [n for n, _ in part]})
        self.muon = torch.optim.Muon(matrix, lr=lr, adjust_lr_fn="match_rms_adamw") if matrix else None
        params = [p for g in rest for p in g["params"]]
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None
        self.adamw = torch.optim.AdamW(rest, lr=lr, betas=betas, eps=eps, fused=fused)
        self.optimizers = [o for o in (self.muon, self.adamw) if o is not None]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self, closure: Any = None) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict() if self.muon else None, "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.muon is not None:
            self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def scaled_lr(base_lr: float, batch_size: int, base_batch: int) -> float:
    """The linear scaling rule: lr = base_lr * batch_size / base_batch (4e-3 at 4096 -> 1e-3 at 1024)."""
    return base_lr * batch_size / base_batch


def lr_at(
    step: int,
    *,
    lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    name: str = "cosine",
    min_lr: float = 0.0,
    warmup_lr: float = 0.0,
    step_size: int = 1,
    gamma: float = 0.1,
) -> float:
    """The lr at optimizer step `step` (0-based): linear warmup from `warmup_lr` over `warmup_steps`, then
    cosine (or a straight line) from `lr` to `min_lr` at `total_steps`, or a step decay by `gamma` every
    `step_size` steps."""
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    t = step - warmup_steps
    if name == "cosine":
        span = max(total_steps - warmup_steps, 1)
        progress = min(t / span, 1.0)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    if name == "linear":  # "Budgeted Training" (Li et al. 2020): straight down to min_lr at the budget
        progress = min(t / max(total_steps - warmup_steps, 1), 1.0)
        return lr + (min_lr - lr) * progress
    if name == "step":
        return lr * gamma ** (t // max(step_size, 1))
    raise ValueError(f"sched.name must be 'cosine', 'linear' or 'step', not {name!r}")


def shrink_schedule(planned: dict[str, int], total: int) -> dict[str, int]:
    """The schedule `planned` compressed to `total` steps: warmup and step decay keep their share of the run."""
    ratio = total / planned["total_steps"]
    return {
        **planned,
        "total_steps": total,
        "warmup_steps": round(planned["warmup_steps"] * ratio),
        "step_size": max(round(planned["step_size"] * ratio), 1),
    }


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to `lr * group["lr_scale"]`."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
