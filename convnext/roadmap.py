"""The paper's modernization roadmap, ResNet-50 -> ConvNeXt-T, one registered model per step (issue #6)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

STEPS: dict[str, Callable[..., nn.Module]] = {}  # name -> builder, in roadmap order (filled in by issue #6)
