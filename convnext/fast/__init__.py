"""`optimize()`: the fastest path this machine offers for a ConvNeXt, called like the original model.

Four modules, arrows one way (`compiler -> plan -> ops -> kernels`, `compiler -> ops`, `plan -> kernels`):
- `kernels`: the small C kernels (`convnext/csrc/`: depthwise weight gradient, GELU with its derivative, the tiled MLP,
  LayerNorm), built on first use, each with aten's op as its fallback (`kernels.status()` says which runs).
- `ops`: the custom ops and their backwards (1x1 convolutions on oneDNN, depthwise, GELU, the fused MLP, LayerNorm, GRN)
  and `FastConvNeXt`, which runs a ConvNeXt's own parameters through them on channels-last NCHW.
- `plan`: times each 1x1 product of a training step both ways on this machine and keeps the faster (a `Plan`), once
  per machine and shape (`cached_plan`, in `plan_cache_path()`).
- `compiler`: `optimize()` folds, freezes and compiles (torch.compile, AOTInductor), keeps whichever path times
  faster, and turns the fast path off on an untested torch (`usable`).
Why each piece is there, with the numbers, is in `benchmarks/NOTES.md`. The tuning constants (`TESTED_TORCH`,
`TILED_MIN_BYTES`, `LAYER_NORM_MAX_C`, `RECOMPILE_LIMIT`) are not re-exported: they are read where they are
defined, so set or patch them there (`convnext.fast.plan.TILED_MIN_BYTES`).
"""

from convnext.fast.compiler import Optimized, fold_layer_scale, keep_freed_memory, optimize, usable
from convnext.fast.ops import (
    ChannelsLayerNorm,
    DepthwiseConv,
    FastConvNeXt,
    InvertedMlp,
    LowPrecisionGelu,
    Plan,
    PointwiseConv,
    ResponseNorm,
    Ways,
    block_forward,
    depthwise_conv,
    onednn_conv1x1,
    runs_fast,
)
from convnext.fast.plan import cached_plan, plan_cache_path, plan_from_rows, plan_pointwise, plan_to_rows

__all__ = [
    "ChannelsLayerNorm",
    "DepthwiseConv",
    "FastConvNeXt",
    "InvertedMlp",
    "LowPrecisionGelu",
    "Optimized",
    "Plan",
    "PointwiseConv",
    "ResponseNorm",
    "Ways",
    "block_forward",
    "cached_plan",
    "depthwise_conv",
    "fold_layer_scale",
    "keep_freed_memory",
    "onednn_conv1x1",
    "optimize",
    "plan_cache_path",
    "plan_from_rows",
    "plan_pointwise",
    "plan_to_rows",
    "runs_fast",
    "usable",
]
