"""`convnext eval` matches the data's classes to the model's by name and refuses results that cannot mean what they
say: classes that share no name with the model's are an error unless `--map-classes` asks for the sorted-order
mapping; a subset of the model's classes is scored on those, and classes the model lacks are left out by name."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convnext.cli import main
from convnext.publish import pretrained_files, write_folder
from convnext.registry import create_model
from convnext.resolve import Preprocess, Resolved

CLASSES = ["ant", "bee", "cat"]
PRE = Preprocess(img_size=32, crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A pretrained folder (as `convnext push --save-dir` writes it) of a small 3-class model named `CLASSES`."""
    model = create_model("convnext_atto", num_classes=3, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)).eval()
    folder = tmp_path_factory.mktemp("model") / "small"
    write_folder(folder, *pretrained_files(Resolved(model, PRE, CLASSES, "made here", "convnext_atto")))
    return folder


def write_classes(root: Path, names: list[str]) -> Path:
    """root/<name>/{0,1}.png for each name; the i-th name in sorted order gets the same pictures whatever it is
    called, so folders with other names hold the same images."""
    for i, name in enumerate(sorted(names)):
        rng = np.random.default_rng(i)
        (root / name).mkdir(parents=True)
        for j in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{j}.png")
    return root


def eval_json(capsys, model_dir: Path, data: Path, *flags: str) -> dict:
    capsys.readouterr()
    assert main(["eval", str(model_dir), "--data", str(data), "--device", "cpu", "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_refuses_classes_that_share_no_name_with_the_model(model_dir, tmp_path, capsys):
    data = write_classes(tmp_path / "other", ["x", "y", "z"])
    out = tmp_path / "out"
    rc = main(["eval", str(model_dir), "--data", str(data), "--device", "cpu", "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "share no name" in err[0] and "[x, y, z]" in err[0] and "[ant, bee, cat]" in err[0]
    assert "--map-classes" in err[0]
    assert not out.exists()  # refused before any image was scored


def test_map_classes_scores_them_as_the_model_classes_in_sorted_order(model_dir, tmp_path, capsys, caplog):
    named = eval_json(capsys, model_dir, write_classes(tmp_path / "named", CLASSES))
    with caplog.at_level(logging.WARNING):
        mapped = eval_json(capsys, model_dir, write_classes(tmp_path / "other", ["x", "y", "z"]), "--map-classes")
    assert "sorted order" in caplog.text
    assert mapped["n"] == named["n"] == 6
    for key in ("top1", "top5", "loss", "per_class_accuracy"):
        assert mapped[key] == named[key], key


def test_map_classes_refuses_another_number_of_classes(model_dir, tmp_path, capsys):
    data = write_classes(tmp_path / "other", ["x", "y"])
    assert main(["eval", str(model_dir), "--data", str(data), "--device", "cpu", "--map-classes"]) == 2
    err = capsys.readouterr().err
    assert "the model has 3" in err and "[x, y]" in err


def test_a_subset_of_the_model_classes_still_scores(model_dir, tmp_path, capsys):
    full = eval_json(capsys, model_dir, write_classes(tmp_path / "full", CLASSES))
    part = tmp_path / "part"
    part.mkdir()
    for name in ("bee", "cat"):
        (tmp_path / "full" / name).rename(part / name)  # the same pictures of bee and cat, no ant
    got = eval_json(capsys, model_dir, part)
    assert got["n"] == 4 and got["per_class_accuracy"]["ant"] is None
    for name in ("bee", "cat"):  # each class's accuracy depends on its own images only
        assert got["per_class_accuracy"][name] == full["per_class_accuracy"][name]


def test_classes_the_model_lacks_are_left_out_and_named(model_dir, tmp_path, capsys, caplog):
    full = eval_json(capsys, model_dir, write_classes(tmp_path / "full", CLASSES))
    mixed = write_classes(tmp_path / "mixed", ["gnu"])
    for name in ("bee", "cat"):
        (tmp_path / "full" / name).rename(mixed / name)
    with caplog.at_level(logging.WARNING):
        got = eval_json(capsys, model_dir, mixed)
    left = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(left) == 1 and "[gnu]" in left[0]
    assert got["n"] == 4 and set(got["per_class_accuracy"]) == set(CLASSES)
    for name in ("bee", "cat"):
        assert got["per_class_accuracy"][name] == full["per_class_accuracy"][name]
