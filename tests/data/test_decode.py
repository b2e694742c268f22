"""One decoder: odd images (EXIF-rotated, transparent, 16-bit, palette, CMYK, grayscale, 1-bit) give the same pixels
through training's ImageFolder, eval's dataset, predict's loader, ERF and the dense datasets; a bad file is named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnext.data import build_dataset, build_eval_dataset, collate_skip, load_image
from convnext.data.decode import BadImageError
from convnext.dense.data import image_size, read_rgb
from convnext.erf import load_images
from convnext.infer import Preprocess, _ImageFiles
from convnext.infer import load_image as predict_load_image

ODD = ("exif", "rgba", "gray16", "palette", "cmyk", "gray", "bits", "la")


def _write_odd(d: Path) -> dict[str, Path]:
    """One file per odd kind in folder d, 24x16 (w x h) or, for the EXIF one, 16x24 stored and turned on read."""
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    rgb = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    files = {k: d / f"{k}.{'jpg' if k in ('exif', 'cmyk') else 'png'}" for k in ODD}
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; rotate 270 degrees to view
    Image.fromarray(rgb.transpose(1, 0, 2).copy()).save(files["exif"], exif=exif, quality=95)
    alpha = np.where(np.arange(24) < 12, 0, 128).astype(np.uint8)[None, :].repeat(16, 0)  # left half transparent
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(files["rgba"])
    Image.fromarray((np.arange(16 * 24).reshape(16, 24) * 170).astype(np.uint16)).save(files["gray16"])
    pal = Image.fromarray((np.arange(16 * 24).reshape(16, 24) % 4).astype(np.uint8), "P")
    pal.putpalette([200, 0, 0, 0, 200, 0, 0, 0, 200, 9, 9, 9])
    pal.save(files["palette"], transparency=0)  # index 0 is transparent
    Image.new("CMYK", (24, 16), (10, 200, 30, 40)).save(files["cmyk"])
    Image.fromarray(rgb[..., 0]).save(files["gray"])
    Image.fromarray(rgb[..., 0] > 127).save(files["bits"])
    Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA").save(files["la"])
    return files


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """root/{train,val}/odd/<kind>.*: the same odd files in both splits."""
    root = tmp_path_factory.mktemp("odd")
    files = _write_odd(root / "train" / "odd")
    _write_odd(root / "val" / "odd")
    return root, files


def test_odd_images_decode_as_predict_does(odd):
    _, files = odd
    got = {k: np.asarray(load_image(p)) for k, p in files.items()}
    for k, p in files.items():
        assert got[k].dtype == np.uint8 and got[k].shape == (16, 24, 3), k
        np.testing.assert_array_equal(got[k], np.asarray(predict_load_image(p)), err_msg=k)
    with Image.open(files["exif"]) as im:  # as stored: 16 wide, 24 high
        stored = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(got["exif"], np.rot90(stored, -1))  # orientation 6: turn 90 degrees clockwise to view
    assert (got["rgba"][:, :12] == 255).all() and (got["la"][:, :12] == 255).all()  # transparent: white, not black
    with Image.open(files["gray16"]) as im:
        g16 = np.asarray(im).astype(np.float64)
    np.testing.assert_allclose(got["gray16"][..., 0], np.round(g16 / 65535 * 255), atol=1)  # scaled, not clipped
    assert got["gray16"].max() > 200
    assert (got["palette"][0, 0::4] == 255).all() and (got["palette"][0, 1] == (0, 200, 0)).all()
    assert (got["gray"][..., 0] == got["gray"][..., 2]).all() and set(np.unique(got["bits"])) == {0, 255}


def test_train_eval_predict_erf_and_dense_see_the_same_pixels(odd):
    root, files = odd
    train, _ = build_dataset(str(root), "train", labels=False)  # no transform: the decoded PIL images
    by_name = {Path(p).stem: i for i, (p, _) in enumerate(train.samples)}
    for k, p in files.items():
        expected = np.asarray(predict_load_image(p))
        np.testing.assert_array_equal(np.asarray(train[by_name[k]][0]), expected, err_msg=k)
        np.testing.assert_array_equal(read_rgb(p).permute(1, 2, 0).numpy(), expected, err_msg=k)  # dense
        assert image_size(p) == (24, 16), k  # the size the dense datasets check masks against, EXIF turned too

    pre = Preprocess(img_size=16, crop_pct=1.0)
    val, _ = build_eval_dataset(str(root), "val", pre.img_size, pre.crop_pct)
    paths = [Path(p) for p, _ in val.samples]
    predicted = _ImageFiles(paths, pre.transform())
    for i in range(len(val)):
        _, x, err = predicted[i]
        assert err is None and torch.equal(val[i][0], x), paths[i]
    erf = load_images(root / "val", 16, limit=len(ODD), mean=pre.mean, std=pre.std)  # crop_pct 1 as well
    assert torch.equal(erf, torch.stack([val[i][0] for i in range(len(val))]))


def test_a_bad_file_is_named_on_every_path(tmp_path):
    good = _write_odd(tmp_path / "train" / "odd")["gray"]
    full = good.with_name("full.jpg")
    Image.open(good).convert("RGB").save(full, quality=95)
    bad = good.with_name("truncated.jpg")
    bad.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full.unlink()

    for read in (load_image, predict_load_image, read_rgb):
        with pytest.raises(BadImageError, match=f"cannot read image {bad}: unreadable or truncated"):
            read(bad)
    train, _ = build_dataset(str(tmp_path), "train", val_split=0.5, labels=False)
    base = train.dataset
    with pytest.raises(ValueError, match=f"cannot read image {bad}"):  # what --skip-bad-images catches
        base[next(i for i, (p, _) in enumerate(base.samples) if p == str(bad))]
    skipping, _ = build_dataset(
        str(tmp_path), "train", Preprocess(16, 1.0).transform(), skip_bad_images=True, labels=False
    )
    _, _, skipped = collate_skip([skipping.dataset[i] for i in range(len(skipping.dataset))])
    assert skipped == 1
    _, x, err = _ImageFiles([bad], Preprocess(16, 1.0).transform())[0]
    assert x is None and str(bad) in err


def test_a_strip_image_is_refused_by_name_before_it_is_decoded(tmp_path):
    strip = tmp_path / "strip.png"
    Image.new("RGB", (1, 100_000)).save(strip)  # a few hundred bytes; at 224 px on its short side, 15 GB
    for read in (load_image, predict_load_image, read_rgb):
        with pytest.raises(BadImageError, match=f"cannot read image {strip}: 1x100000 px, an aspect ratio beyond"):
            read(strip)
    wide = tmp_path / "panorama.png"
    Image.new("RGB", (1200, 100)).save(wide)  # 12:1 is a picture
    assert load_image(wide).size == (1200, 100)


def _write_photo(path: Path, size: tuple[int, int] = (1536, 1152), turned: bool = False) -> None:
    """A camera-sized JPEG with smooth shading and hard edges; `turned` stores it on its side with EXIF 6."""
    rng = np.random.default_rng(1)
    w, h = size
    shade = Image.fromarray(rng.integers(0, 256, (h // 32, w // 32, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    a = np.asarray(shade).copy()
    for _ in range(40):  # edges: rectangles of flat colour
        x, y = rng.integers(0, w - 64), rng.integers(0, h - 64)
        a[y : y + rng.integers(8, 64), x : x + rng.integers(8, 64)] = rng.integers(0, 256, 3)
    im = Image.fromarray(a)
    if turned:
        exif = Image.Exif()
        exif[0x0112] = 6
        im.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=92)
    else:
        im.save(path, quality=92)


def test_a_large_jpeg_decodes_at_reduced_scale_with_the_pixels_kept(tmp_path):
    from convnext.data.cache import decode_transform
    from convnext.data.decode import DRAFT_MARGIN
    from convnext.data.transforms import first_resize_side

    root = tmp_path / "photos"
    for split in ("train", "val"):
        (root / split / "big").mkdir(parents=True)
        _write_photo(root / split / "big" / "a.jpg", turned=True)
        _write_photo(root / split / "big" / "b.jpg")
    a = root / "val" / "big" / "a.jpg"
    png = tmp_path / "a.png"
    load_image(a).save(png)

    assert load_image(a).size == (1536, 1152)  # full size, turned upright
    assert load_image(a, 32).size == (192, 144)  # 1/8 scale: the short side 144 >= 4 x 32, upright too
    assert load_image(a, 96).size == (768, 576)  # 1/2: 1/4 would leave 288 < 4 x 96
    assert load_image(a, 200).size == (1536, 1152)  # 1/2 would leave 576 < 4 x 200
    assert load_image(png, 32).size == (1536, 1152)  # only JPEG has reduced-scale decoding
    assert DRAFT_MARGIN == 4

    for size in (32, 96):
        tf = decode_transform(size, 0.875)
        assert first_resize_side(tf) == round(size / 0.875)
        full, fast = tf(load_image(a)).int(), tf(load_image(a, first_resize_side(tf))).int()
        diff = (full - fast).abs().float()
        assert diff.mean() < 0.3 and diff.max() <= 6, (size, diff.mean(), diff.max())

    # every path decodes it the same way: training's cache transform, eval's dataset, predict and the ERF images
    pre = Preprocess(img_size=32, crop_pct=1.0)
    val, _ = build_eval_dataset(str(root), "val", pre.img_size, pre.crop_pct)
    paths = [Path(p) for p, _ in val.samples]
    predicted = _ImageFiles(paths, pre.transform())
    expected = torch.stack([pre.transform()(load_image(p, 32)) for p in paths])
    assert torch.equal(torch.stack([val[i][0] for i in range(len(val))]), expected)
    assert torch.equal(torch.stack([predicted[i][1] for i in range(len(val))]), expected)
    assert torch.equal(load_images(root / "val", 32, limit=2, mean=pre.mean, std=pre.std), expected)
    train, _ = build_dataset(str(root), "train", decode_transform(32), labels=False)
    assert torch.equal(train[0][0], decode_transform(32)(load_image(root / "train" / "big" / "a.jpg", 32)))
