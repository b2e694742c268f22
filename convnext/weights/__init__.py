"""Weights as data, the download cache, and conversion between the published state-dict layouts.

specs    `WeightSpec`, the `WEIGHTS` table keyed `arch.tag`, `resolve_spec`; `UNSUPPORTED`: timm weights not built here
layouts  `detect_layout`, `to_ours`, `from_ours` (official V1/V2, timm, torchvision, HF transformers, FCMAE);
         `shape_config`: what a state dict's shapes say about its model
io       `read_state_dict`, `load_checkpoint` (safe, validated, head/stem adaptation), `save_weights`
hub      `download`, `fetch`, `load_pretrained` (cache with sha256 check and atomic rename)
hf       `hf-hub:` names, files through the Hugging Face cache, what a Hub repo or a pretrained folder holds
Nothing here imports the registry, data, training, inference or the CLI (`tests/test_layers.py`); `convnext.resolve`
turns any source into a model, `convnext.publish` writes and pushes pretrained folders.
"""

from convnext.weights.hub import default_cache_dir, download, fetch, load_pretrained
from convnext.weights.io import adapt_in_chans, load_checkpoint, read_file, read_state_dict, save_weights, unwrap
from convnext.weights.layouts import LAYOUTS, detect_layout, from_ours, to_ours
from convnext.weights.specs import UNSUPPORTED, WEIGHTS, WeightSpec, resolve_spec, tags

__all__ = [
    "LAYOUTS",
    "UNSUPPORTED",
    "WEIGHTS",
    "WeightSpec",
    "adapt_in_chans",
    "default_cache_dir",
    "detect_layout",
    "download",
    "fetch",
    "from_ours",
    "load_checkpoint",
    "load_pretrained",
    "read_file",
    "read_state_dict",
    "resolve_spec",
    "save_weights",
    "tags",
    "to_ours",
    "unwrap",
]
