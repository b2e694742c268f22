"""Pooled features out of `predict --features`: the files (OUT.npy, float32 N x C, and the OUT.csv index), the
check that they can be written before any work, and a linear probe on them (scikit-learn, optional)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def features_files(out: str | Path) -> tuple[Path, Path]:
    """`--features OUT` -> (OUT.npy, OUT.csv); OUT may be given with its .npy suffix."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".npy" else out
    return stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".csv")


def check_writable(files: Sequence[Path], flag: str, force: bool = False) -> None:
    """Raise ValueError naming `flag` unless each file can be written: its folder exists and takes a file, and the
    file does not exist yet (unless `force`). Called before any work, so nothing is lost to a refused run."""
    import tempfile

    for f in files:
        if f.exists() and not force:
            raise ValueError(f"{flag}: {f} exists; pass --force to overwrite it")
        if f.is_dir():
            raise ValueError(f"{flag}: {f} is a folder")
        folder = f.parent
        if not folder.is_dir():
            raise ValueError(f"{flag}: cannot write {f}: {folder} is not a folder")
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise ValueError(f"{flag}: cannot write into {folder} ({e.strerror or e})") from None


def write_features(rows: Sequence[dict], out: str | Path) -> tuple[Path, Path]:
    """Write the "features" of predict's results as OUT.npy (float32, N x C, in the order of `rows`) and the index
    OUT.csv (row, path, label, prob: the top class). Rows without features (unreadable images) are left out."""
    import csv

    rows = [r for r in rows if "features" in r]
    npy, index = features_files(out)
    width = len(rows[0]["features"]) if rows else 0
    matrix = np.stack([r["features"] for r in rows]).astype(np.float32) if rows else np.zeros((0, width), np.float32)
    np.save(npy, matrix)
    with open(index, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "path", "label", "prob"])
        for k, r in enumerate(rows):
            w.writerow([k, r["path"], r["topk"][0]["label"], f"{r['topk'][0]['prob']:.6f}"])
    return npy, index


def linear_probe(
    features: np.ndarray, labels: Sequence, test_fraction: float = 0.25, seed: int = 0, max_iter: int = 2000
) -> dict:
    """A logistic-regression probe on (N, C) features (scikit-learn, standardised features, a stratified seeded
    split): {"train_accuracy", "test_accuracy" (fractions), "n_train", "n_test", "classifier" (the fitted
    pipeline)}. `test_fraction` 0 fits on everything and scores the training set."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise ImportError("linear_probe needs scikit-learn: pip install scikit-learn") from None
    x, y = np.asarray(features, dtype=np.float32), np.asarray(labels)
    if test_fraction > 0:
        x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed,
                                                            stratify=y)  # fmt: skip
    else:
        x_train, x_test, y_train, y_test = x, x, y, y
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter)).fit(x_train, y_train)
    return {"train_accuracy": float(clf.score(x_train, y_train)), "test_accuracy": float(clf.score(x_test, y_test)),
            "n_train": len(y_train), "n_test": len(y_test), "classifier": clf}  # fmt: skip
