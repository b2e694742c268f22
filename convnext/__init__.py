"""convnext: every ConvNeXt (V1, V2, isotropic, the paper's roadmap), weights in every layout, fast on CPU."""

from convnext.fast import optimize
from convnext.model import ConvNeXt, ConvNeXtConfig, ConvNeXtFeatures
from convnext.registry import create_model, list_models

__all__ = ["ConvNeXt", "ConvNeXtConfig", "ConvNeXtFeatures", "create_model", "list_models", "optimize"]
__version__ = "0.1.0"
