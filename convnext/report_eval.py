"""The `convnext eval` report from per-image predictions: the numbers (through `convnext.scores`) and the figures.

`report_numbers` gives per-class precision/recall/F1/support, macro and weighted F1, balanced accuracy, the ECE
with its reliability table and the most confused pairs with a few example images each. `write_report` draws the
confusion matrix (counts and row-normalised), the reliability diagram and a grid of the confused examples, one
PNG each, with matplotlib (Agg).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convnext.scores import calibration, class_report, confusion, most_confused
from convnext.viz import plot_confusion_matrix


def report_numbers(
    targets: np.ndarray,
    preds: np.ndarray,
    confidence: np.ndarray,
    classes: Sequence[str],
    pairs: int = 5,
    examples: int = 4,
) -> dict[str, Any]:
    """{"confusion" (counts, rows = true class), "per_class" ({class: {precision, recall, f1, support}}),
    "accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "ece" (fractions in [0, 1], as scikit-learn
    gives them), "reliability" (the ECE's bins), "most_confused" ([{true, predicted, count, examples: [index of
    the image in the evaluated order, ...]}])}."""
    cm = confusion(targets, preds, len(classes))
    rep = class_report(cm)
    cal = calibration(confidence, np.asarray(targets) == np.asarray(preds))
    index = {c: i for i, c in enumerate(classes)}
    confused = most_confused(cm, list(classes), top=pairs)
    for pair in confused:
        hit = (targets == index[pair["true"]]) & (preds == index[pair["predicted"]])
        pair["examples"] = np.flatnonzero(hit)[:examples].tolist()
    per_class = {c: {k: rep[k][i] for k in ("precision", "recall", "f1", "support")} for i, c in enumerate(classes)}
    headline = {k: rep[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1")}
    return {"confusion": cm.tolist(), "per_class": per_class, **headline, "ece": cal["ece"],
            "reliability": cal["bins"], "most_confused": confused}  # fmt: skip


def write_report(
    out: Path, numbers: dict[str, Any], classes: Sequence[str], image: Callable[[int], np.ndarray], title: str
) -> dict[str, str]:
    """Draw the report's PNGs into `out`: {"confusion_png" (row-normalised), "confusion_counts_png",
    "reliability_png", "confused_png" (only when some pair was confused)}. `image(i)`: the i-th evaluated image
    as uint8 (H, W, 3)."""
    out.mkdir(parents=True, exist_ok=True)
    cm, classes, title = numbers["confusion"], [printable(c) for c in classes], printable(title)
    pngs = {
        "confusion_png": plot_confusion_matrix(cm, classes, out / "confusion.png", title=title),
        "confusion_counts_png": plot_confusion_matrix(
            cm, classes, out / "confusion_counts.png", title=f"{title} (counts)", normalize=False
        ),
        "reliability_png": plot_reliability(numbers["reliability"], numbers["ece"], out / "reliability.png", title),
    }
    if numbers["most_confused"]:
        pngs["confused_png"] = plot_confused(numbers["most_confused"], image, out / "most_confused.png")
    return {k: str(v) for k, v in pngs.items()}


def printable(text: str) -> str:
    """Folder names that are not UTF-8 arrive as surrogate escapes, which a plot's text cannot draw."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_reliability(bins: list[dict[str, Any]], ece: float, path: Path, title: str = "") -> Path:
    """Accuracy against mean confidence per confidence bin (bars; the diagonal is perfect calibration), with the
    share of images in each bin below."""
    plt = _pyplot()
    lo = np.array([b["lo"] for b in bins])
    width = np.array([b["hi"] - b["lo"] for b in bins])
    counts = np.array([b["count"] for b in bins], dtype=np.float64)
    acc = np.array([b["accuracy"] for b in bins])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(lo, np.where(counts > 0, acc, 0), width, align="edge", edgecolor="k", linewidth=0.4, label="accuracy")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(f"{title}\nECE {ece:.4f}", fontsize=10)
    top.legend(fontsize=8, loc="upper left")
    bottom.bar(lo, counts / max(counts.sum(), 1), width, align="edge", edgecolor="k", linewidth=0.4)
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("share of images")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_confused(pairs: list[dict[str, Any]], image: Callable[[int], np.ndarray], path: Path) -> Path:
    """One row per confused pair ("true -> predicted (count)"), its example images across."""
    plt = _pyplot()
    cols = max(len(p["examples"]) for p in pairs)
    fig, axes = plt.subplots(len(pairs), cols, figsize=(1.6 * cols + 1.5, 1.7 * len(pairs)), squeeze=False)
    for row, pair in zip(axes, pairs):
        for k, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.axis("on" if k < len(pair["examples"]) else "off")
            if k < len(pair["examples"]):
                ax.imshow(image(pair["examples"][k]))
        row[0].set_ylabel(
            f"{printable(pair['true'])}\n-> {printable(pair['predicted'])}\n({pair['count']})", fontsize=8
        )
    fig.suptitle("most confused pairs: true -> predicted (count)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
