"""Plotting helpers (matplotlib, headless): a confusion matrix and grouped bar charts. Each writes one PNG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed; harmless if already selected
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]] | np.ndarray,
    classes: Sequence[str],
    path: str | Path,
    title: str = "",
    normalize: bool = True,
) -> Path:
    """Rows = true class, columns = predicted. Normalised per row (recall) by default; counts are annotated
    when there are few classes, tick labels are dropped when there are too many to read."""
    plt = _pyplot()
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(classes):
        raise ValueError(f"confusion matrix of shape {m.shape} does not fit {len(classes)} classes")
    shown = m / np.maximum(m.sum(axis=1, keepdims=True), 1) if normalize else m
    n = len(classes)
    size = min(4 + 0.35 * n, 20)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class" if normalize else "images")
    if n <= 40:
        ax.set_xticks(range(n), [str(c) for c in classes], rotation=90, fontsize=8)
        ax.set_yticks(range(n), [str(c) for c in classes], fontsize=8)
    if n <= 15:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    dark = shown[i, j] > 0.5 * (shown.max() or 1)
                    ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=8, color="w" if dark else "k")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_grouped_bars(
    groups: Mapping[str, Mapping[str, float]],
    path: str | Path,
    ylabel: str = "",
    title: str = "",
    highlight: str | None = None,
) -> Path:
    """One cluster of bars per group ({group: {series: value}}); `highlight` draws that series with a hatch."""
    plt = _pyplot()
    names = list(groups)
    series = list(dict.fromkeys(s for g in groups.values() for s in g))
    if not names or not series:
        raise ValueError("nothing to plot")
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names) * max(1, len(series) / 3)), 4.5))
    for k, s in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(names))]
        vals = [groups[g].get(s, np.nan) for g in names]
        ax.bar(xs, vals, width, label=s, hatch="//" if s == highlight else None, edgecolor="k", linewidth=0.4)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
