"""Classification training on the run engine (`convnext.engine`): typed configs and presets, the automatic
recipe, `fit`.

from convnext.train import fit, get_preset, apply_overrides
cfg = apply_overrides(get_preset("demo"), {"epochs": 3, "output": "runs/try"})
metrics = fit(cfg)               # {"top1": ..., "top5": ..., "loss": ..., ...}
trained = resolve("runs/try")   # convnext.resolve: .model, .classes, .preprocess, .run (config.json)
"""

from convnext.config import apply_overrides
from convnext.train.auto import auto_recipe
from convnext.train.config import (
    PRESETS,
    DataConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    get_preset,
)
from convnext.train.fit import fit
from convnext.train.runs import build_model

__all__ = [
    "PRESETS",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "auto_recipe",
    "build_model",
    "fit",
    "get_preset",
]
