"""Plot helpers write real PNGs of a sensible size, and refuse data that does not fit."""

import numpy as np
import pytest
from PIL import Image

from convnext.viz import plot_confusion_matrix, plot_grouped_bars


@pytest.mark.parametrize("n", [3, 60])  # annotated small matrix; large one without tick labels
def test_confusion_matrix_png(tmp_path, n):
    rng = np.random.default_rng(0)
    m = rng.integers(0, 20, (n, n))
    path = plot_confusion_matrix(m, [f"class {i}" for i in range(n)], tmp_path / "cm.png", title="t")
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 300
        assert len(np.unique(np.asarray(im.convert("L")))) > 10  # something was drawn


def test_confusion_matrix_handles_empty_rows(tmp_path):
    m = [[0, 0], [3, 1]]  # a class with no images: no division by zero
    assert plot_confusion_matrix(m, ["a", "b"], tmp_path / "cm.png").is_file()


def test_confusion_matrix_shape_mismatch(tmp_path):
    with pytest.raises(ValueError, match="does not fit"):
        plot_confusion_matrix([[1, 2], [3, 4]], ["a", "b", "c"], tmp_path / "cm.png")


def test_grouped_bars(tmp_path):
    groups = {"tiny infer": {"ours": 1.2, "timm": 1.0}, "atto train": {"ours": 0.9, "timm": 1.0, "tv": 0.5}}
    path = plot_grouped_bars(groups, tmp_path / "bars.png", ylabel="x", highlight="ours")
    with Image.open(path) as im:
        assert im.format == "PNG"
    with pytest.raises(ValueError, match="nothing"):
        plot_grouped_bars({}, tmp_path / "none.png")
