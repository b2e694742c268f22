"""convnext: every ConvNeXt (V1, V2, isotropic, the paper's roadmap), weights in every layout, fast on CPU.

The names below are imported on first use, so `import convnext.cli` (and `convnext --help`) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "optimize": "convnext.fast",
    "ConvNeXt": "convnext.model",
    "ConvNeXtConfig": "convnext.model",
    "ConvNeXtFeatures": "convnext.model",
    "create_model": "convnext.registry",
    "list_models": "convnext.registry",
}
__all__ = ["ConvNeXt", "ConvNeXtConfig", "ConvNeXtFeatures", "create_model", "list_models", "optimize"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'convnext' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
