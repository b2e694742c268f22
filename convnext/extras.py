"""Optional dependencies (the pip extras): which package each extra brings, and `require`, which stops a command
with one clear line naming the `pip install` to run when a package it needs is missing.

The core install (`pip install convnext`) is what building models, training, evaluation and prediction need;
`[export]` adds ONNX export and its onnxruntime check, `[dense]` COCO detection, `[hub]` the Hugging Face Hub,
`[tensorboard]` TensorBoard logging, `[all]` every one of them.
"""

from __future__ import annotations

import importlib.util

EXTRA_OF = {
    "onnx": "export",
    "onnxscript": "export",
    "onnxruntime": "export",
    "pycocotools": "dense",
    "huggingface_hub": "hub",
    "tensorboard": "tensorboard",
    "yaml": "yaml",
    "mlflow": "track",
    "wandb": "track",
}


class MissingExtraError(RuntimeError):
    """A command needs an optional package that is not installed (the CLI prints it as one line)."""


def require(*modules: str, what: str) -> None:
    """Raise MissingExtraError naming the pip command when any of `modules` is not installed; `what` says which
    feature needs them. Called before a command writes anything."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        extras = sorted({EXTRA_OF.get(m, "all") for m in missing})
        raise MissingExtraError(
            f"{what} needs {', '.join(missing)}, which is not installed: pip install 'convnext[{','.join(extras)}]'"
        )
