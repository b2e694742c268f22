"""The image-folder scan under hostile layouts (a FIFO named like an image, a symlink loop, a second link), a
one-class training folder refused, unlabelled (flat) folders for pre-training, and the one image finder
(`find_images`) that predict, ERF and the dense datasets list folders with."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convnext.cli import main
from convnext.data.datasets import ImageFiles, ImageFolder, build_dataset
from convnext.data.decode import IMAGE_EXTENSIONS, find_images, is_image_file


def _folder(root: Path, per_class: int = 3, classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / name / f"{i}.png")
    return root


def test_a_fifo_named_like_an_image_is_not_listed(tmp_path):
    root = _folder(tmp_path / "train")
    os.mkfifo(root / "cat" / "pipe.jpg")
    ds = ImageFolder(root)
    assert len(ds) == 6 and not any(p.endswith("pipe.jpg") for p, _ in ds.samples)


def test_a_symlink_loop_and_a_second_link_add_nothing(tmp_path):
    root = _folder(tmp_path / "train")
    os.symlink("..", root / "cat" / "loopdir")  # points back up at train/: every class again, labelled cat
    os.symlink(root / "dog", root / "dog" / "again")
    ds = ImageFolder(root)
    assert len(ds) == 6
    assert sorted(ds.targets) == [0, 0, 0, 1, 1, 1]


def test_a_linked_folder_of_other_images_is_still_read(tmp_path):
    root = _folder(tmp_path / "train")
    extra = tmp_path / "elsewhere"
    extra.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(extra / "x.png")
    os.symlink(extra, root / "cat" / "more")
    assert len(ImageFolder(root)) == 7


def test_gif_images_are_counted_as_predict_counts_them(tmp_path):
    root = _folder(tmp_path / "train")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).convert("P").save(root / "dog" / "anim.gif")
    ds = ImageFolder(root)
    assert len(ds) == 7 and ds[6][0].mode == "RGB"


def test_find_images_takes_files_as_given_and_folders_sorted_recursively_or_not(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.png", "1.JPG", "notes.txt", "b/0.webp", "b/3.gif", ".hidden.png", "b/._0.jpg"):
        (tmp_path / name).write_bytes(b"")
    os.mkfifo(tmp_path / "pipe.jpg")  # would block its reader forever
    (tmp_path / "folder.png").mkdir()
    listed = [tmp_path / "1.JPG", tmp_path / "b/0.webp", tmp_path / "b/2.png", tmp_path / "b/3.gif"]
    assert find_images([tmp_path, tmp_path / "x.bin"]) == [*listed, tmp_path / "x.bin"]  # a file: as given
    assert find_images(tmp_path) == find_images(str(tmp_path)) == listed  # one folder, as a path or a string
    assert find_images(tmp_path, recursive=False) == [tmp_path / "1.JPG"]
    assert find_images([tmp_path / "missing.jpg"]) == [tmp_path / "missing.jpg"]  # its reader names it
    assert not is_image_file(tmp_path / "pipe.jpg") and not is_image_file(tmp_path / "folder.png")
    assert all(is_image_file(p) for p in listed) and ".gif" in IMAGE_EXTENSIONS


def test_find_images_names_a_folder_without_images(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=f"no image files .*\\.webp\\) in {tmp_path}$"):
        find_images(tmp_path, recursive=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"in {tmp_path / 'empty'} or its subfolders"):
        find_images([tmp_path, tmp_path / "empty"])


def _flat(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(root / f"{i}.png")
    return root


def test_a_one_class_training_folder_is_refused(tmp_path):
    flat = _folder(tmp_path / "flat", classes=("cat",))  # flat/cat/*.png
    split = _folder(tmp_path / "split" / "train", classes=("cat",)).parent  # split/{train,val}/cat/*.png
    _folder(split / "val", classes=("cat",))
    for root, named in ((flat, flat), (split, split / "train")):
        with pytest.raises(ValueError, match=f"^{named} holds one class \\(cat\\): classification needs two or more"):
            build_dataset(str(root), "train")
    assert len(build_dataset(str(split), "val")[0]) == 3  # a val folder of one of the classes is scored on it
    assert len(build_dataset(str(flat), "train", labels=False)[0]) == 3 - 1  # pre-training needs no classes


def test_train_refuses_a_one_class_folder_in_one_line_and_writes_nothing(tmp_path, capsys):
    data, out = _folder(tmp_path / "data", per_class=6, classes=("cat",)), tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"convnext train: error: {data} holds one class (cat): classification needs two or more class "
                   f"folders (<folder>/<class>/<image>)"]  # fmt: skip
    assert not out.exists()


def test_an_unlabelled_flat_folder_is_read_whole_with_a_val_share(tmp_path):
    root = _flat(tmp_path / "pics", 9)
    with pytest.raises(ValueError, match="expected .*/<class>/<image>"):
        build_dataset(str(root), "train")  # classification needs class folders
    _flat(root / "more", 1)  # subfolders are read too
    train, classes = build_dataset(str(root), "train", labels=False, val_split=0.2)
    val, _ = build_dataset(str(root), "val", labels=False, val_split=0.2)
    assert classes == [] and (len(train), len(val)) == (8, 2)
    names = {p for p, _ in train.dataset.samples}
    assert len(names) == 10 and str(root / "more" / "0.png") in names
    assert set(train.indices).isdisjoint(val.indices) and set(train.targets) == {0}
    assert train[0][0].mode == "RGB" and train[0][1] == 0


def test_unlabelled_flat_train_and_val_folders_are_read_as_they_are(tmp_path):
    root = tmp_path / "pics"
    _flat(root / "train", 5)
    _flat(root / "val", 2)
    train, _ = build_dataset(str(root), "train", labels=False)
    val, _ = build_dataset(str(root), "val", labels=False)
    assert isinstance(train, ImageFiles) and (len(train), len(val)) == (5, 2)
