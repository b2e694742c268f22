"""Every model by name: a registry that refuses duplicates (the variant table of `model.py`, then the roadmap
steps), `create_model` and `list_models`.

Names follow `arch` or `arch.tag`: `convnext_tiny` is an architecture, `convnext_tiny.fb_in1k` one of its
published weights (`convnext.weights`). `convnext.resolve` turns any other kind of name (a run, a weight file, a
Hub repo) into a model with its preprocessing.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from torch import nn

from convnext.model import VARIANTS, ConvNeXt, ConvNeXtConfig, UnknownOptionError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[..., nn.Module]  # build(**overrides) -> model
    config: object | None = None  # the default typed config, if the builder has one


class Registry:
    """name -> ModelEntry, in registration order. Registering a name twice raises."""

    def __init__(self) -> None:
        self._entries: dict[str, ModelEntry] = {}

    def register(self, name: str, build: Callable[..., nn.Module], config: object | None = None) -> None:
        if name in self._entries:
            raise ValueError(f"model {name!r} is already registered")
        self._entries[name] = ModelEntry(name, build, config)

    def names(self, pattern: str | None = None) -> list[str]:
        return [n for n in self._entries if pattern is None or fnmatch.fnmatchcase(n, pattern)]

    def get(self, name: str) -> ModelEntry:
        if name not in self._entries:
            close = fnmatch.filter(self._entries, f"*{name.split('_')[-1]}*")[:5]
            hint = f" (did you mean one of {close}?)" if close else ""
            raise KeyError(f"unknown model {name!r}{hint}; `convnext list` shows them all")
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries


def build_convnext(cfg: ConvNeXtConfig, **overrides) -> ConvNeXt:
    """A ConvNeXt of `cfg` with the config fields in `overrides` replaced (lists become tuples); an option no field
    takes raises `UnknownOptionError` naming the fields."""
    allowed = {f.name for f in fields(ConvNeXtConfig)}
    unknown = set(overrides) - allowed
    if unknown:
        raise UnknownOptionError(f"unknown option(s) {sorted(unknown)}; ConvNeXtConfig takes {sorted(allowed)}")
    return ConvNeXt(cfg.with_(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}))


def default_registry() -> Registry:
    """The registry of every model this package ships: the variant table, then the roadmap steps."""
    reg = Registry()
    for name, cfg in VARIANTS.items():
        reg.register(name, functools.partial(build_convnext, cfg), cfg)
    from convnext import roadmap  # the roadmap is built from model.py's parts

    for name, build in roadmap.STEPS.items():
        reg.register(name, build)
    return reg


MODELS = default_registry()


def split_name(name: str) -> tuple[str, str | None]:
    """'convnext_tiny.fb_in1k' -> ('convnext_tiny', 'fb_in1k'); 'convnext_tiny' -> ('convnext_tiny', None)."""
    arch, _, tag = name.partition(".")
    return arch, tag or None


def list_models(pattern: str | None = None, pretrained: bool = False) -> list[str]:
    """Registered names matching a shell pattern (`convnext_*`, `roadmap_*`), in registry order.

    With `pretrained=True`, the `arch.tag` names of published weights instead.
    """
    if pretrained:
        from convnext.weights import WEIGHTS

        return [n for n in WEIGHTS if pattern is None or fnmatch.fnmatchcase(n, pattern)]
    return MODELS.names(pattern)


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    *,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    checkpoint_path: str | Path | None = None,
    **overrides,
) -> nn.Module:
    """Build a registered model; `name` may carry a weight tag (`convnext_tiny.fb_in1k`), or be a Hugging Face Hub
    repo `hf-hub:org/name[@revision]` (ours, a transformers or a timm ConvNeXt: the architecture from its config).

    pretrained: download (or take from the cache) the tagged weights, or the architecture's default tag (a Hub
        repo: its weights, through the HF cache; without pretrained only its architecture, as timm does).
    checkpoint: a local weight file in any layout `weights.load_checkpoint` reads (`checkpoint_path`: timm's name).
    features_only: timm's multi-scale backbone: the model returns the list of the `out_indices` stages' maps
        (NCHW, no extra norms) and has timm's `feature_info` (`channels()`, `reduction()`).
    overrides: config fields (`num_classes=10`, `in_chans=1`, `drop_path_rate=0.1`, `patch_size=2`, ...);
        the head and the stem are adapted when they differ from the weights'.
    """
    if checkpoint is not None and checkpoint_path is not None:
        raise ValueError("give checkpoint or checkpoint_path (timm's name for it), not both")
    checkpoint = checkpoint if checkpoint is not None else checkpoint_path
    if name.startswith("hf-hub:"):  # a Hub repo (weights/hf.py): its config gives the architecture
        from convnext.weights import load_checkpoint
        from convnext.weights.hf import resolve_hub

        hub = resolve_hub(name, weights=pretrained)
        model = build_convnext(hub.config, **overrides)
        if pretrained:  # a head for another num_classes, a stem for another in_chans adapt as load_checkpoint does
            load_checkpoint(model, hub.weights)
    else:
        arch, tag = split_name(name)
        entry = MODELS.get(arch)
        spec = None
        if pretrained or tag:
            from convnext.weights import resolve_spec

            spec = resolve_spec(arch, tag)
            overrides.setdefault("num_classes", spec.num_classes)
            for key, value in spec.model_kwargs:  # e.g. layer scale on the trained isotropic L
                overrides.setdefault(key, value)
        model = entry.build(**overrides)
        if pretrained:
            from convnext.weights import load_pretrained

            load_pretrained(model, spec)
    if checkpoint is not None:
        from convnext.weights import load_checkpoint

        load_checkpoint(model, checkpoint)
    if features_only:
        from convnext.model import ConvNeXtFeatures

        if not isinstance(model, ConvNeXt):
            raise ValueError(f"features_only: {name} is not a ConvNeXt")
        return ConvNeXtFeatures(model, out_indices, norms=False, as_list=True)
    return model
