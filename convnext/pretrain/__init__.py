"""Self-supervised pre-training: FCMAE, ConvNeXt V2's fully convolutional masked autoencoder.

from convnext.pretrain import fcmae_small, pretrain
cfg = fcmae_small("convnextv2_atto")
cfg.data.name, cfg.output, cfg.budget_min = "path/to/images", "runs/fcmae", 10
result = pretrain(cfg)                    # {"loss": ..., "img_per_s": ..., "grid": [4, 4], ...}
# then: convnext train --data DIR --pretrained-run runs/fcmae  (or --model.checkpoint runs/fcmae/last.pt)
"""

from convnext.pretrain.config import PRESETS, MaskConfig, PretrainConfig, PretrainDataConfig, fcmae_in1k, fcmae_small
from convnext.pretrain.fcmae import FCMAE, FCMAEConfig, masked_features, random_mask
from convnext.pretrain.fit import pretrain
from convnext.pretrain.runs import is_pretrain_run, load_encoder

__all__ = [
    "FCMAE",
    "PRESETS",
    "FCMAEConfig",
    "MaskConfig",
    "PretrainConfig",
    "PretrainDataConfig",
    "fcmae_in1k",
    "fcmae_small",
    "is_pretrain_run",
    "load_encoder",
    "masked_features",
    "pretrain",
    "random_mask",
]
