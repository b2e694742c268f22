"""Classification scores from predictions: the confusion matrix, per-class precision/recall/F1, macro and
weighted F1, balanced accuracy and the expected calibration error.

Every function takes plain arrays (numpy or torch) and returns plain numbers, so training (per epoch) and `eval`
(the full report) compute them the same way. Definitions follow scikit-learn's: a class with no prediction has
precision 0, a class with no image has recall 0 and is left out of the balanced accuracy (its support is 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion(targets: Any, preds: Any, num_classes: int) -> np.ndarray:
    """Counts [true class, predicted class] as int64; targets outside [0, num_classes) are not counted."""
    t, p = np.asarray(targets, dtype=np.int64).ravel(), np.asarray(preds, dtype=np.int64).ravel()
    keep = (t >= 0) & (t < num_classes) & (p >= 0) & (p < num_classes)
    flat = np.bincount(t[keep] * num_classes + p[keep], minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def class_report(cm: np.ndarray) -> dict[str, Any]:
    """From a confusion matrix (rows = true class): {"precision", "recall", "f1", "support"} (lists, one value per
    class, in [0, 1]) and "accuracy", "balanced_accuracy", "macro_f1", "weighted_f1" (numbers in [0, 1])."""
    cm = np.asarray(cm, dtype=np.float64)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    total, present = support.sum(), support > 0
    return {
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": support.astype(np.int64).tolist(),
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present | (predicted > 0)].mean()) if (present | (predicted > 0)).any() else 0.0,
        "weighted_f1": float((f1 * support).sum() / total) if total else 0.0,
    }


def calibration(confidence: Any, correct: Any, bins: int = 15) -> dict[str, Any]:
    """The expected calibration error of top-1 confidences (equal-width bins over (0, 1], weighted by count) and the
    reliability table behind it: {"ece", "bins": [{"lo", "hi", "count", "confidence", "accuracy"}, ...]}."""
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    ok = np.asarray(correct, dtype=np.float64).ravel()
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        c = float(conf[mask].mean()) if n else 0.0
        a = float(ok[mask].mean()) if n else 0.0
        ece += n / max(len(conf), 1) * abs(a - c)
        table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n, "confidence": c, "accuracy": a})
    return {"ece": float(ece), "bins": table}


def most_confused(cm: np.ndarray, classes: list[str], top: int = 5) -> list[dict[str, Any]]:
    """The `top` largest off-diagonal counts: [{"true", "predicted", "count"}, ...], largest first."""
    cm = np.asarray(cm)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:top]
    out = []
    for flat in order:
        i, j = divmod(int(flat), cm.shape[1])
        if off[i, j] > 0:
            out.append({"true": classes[i], "predicted": classes[j], "count": int(off[i, j])})
    return out
