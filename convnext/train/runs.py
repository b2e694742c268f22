"""The model a classification run trains: built from its config, from random weights or from the weights it starts
from (through `convnext.resolve`, the one place a name or a file becomes a model). A finished run comes back with
`convnext.resolve.resolve(run_dir)`; the folder itself is `convnext.engine.run.RunFolder`."""

from __future__ import annotations

import logging

from torch import nn

from convnext.registry import create_model, split_name
from convnext.resolve import resolve
from convnext.train.config import ModelConfig
from convnext.train.start import arch_for

log = logging.getLogger("convnext.train")


def build_model(mcfg: ModelConfig, num_classes: int, init_weights: bool = True) -> nn.Module:
    """The configured model with `num_classes` outputs, in train mode; with `init_weights`, from the weights it
    starts from (`model.checkpoint` in any layout, or `model.pretrained`'s published weights), the head adapted to
    the classes and one line saying which weights came from where."""
    kwargs = mcfg.build_kwargs()
    if init_weights and mcfg.checkpoint:  # a file goes into the named model; a run, folder or Hub repo names its own
        model = arch_for(mcfg.checkpoint, mcfg.name)
        start = resolve(mcfg.checkpoint, model=model, num_classes=num_classes, **kwargs)
    elif init_weights and (mcfg.pretrained or split_name(mcfg.name)[1] is not None):  # a tag means its weights
        start = resolve(mcfg.name, pretrained=True, num_classes=num_classes, **kwargs)
    else:
        return create_model(mcfg.name.split(".")[0], num_classes=num_classes, **kwargs)
    log.info("weights: %s", start.provenance)
    return start.model.train()
