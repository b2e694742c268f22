"""Evaluation against a hand computation, model resolution (names, checkpoints, run folders), robust image
loading on real generated files of every bad kind, and `convnext eval` / `convnext predict`."""

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from convnext.cli import main
from convnext.constants import imagenet_classes
from convnext.data.decode import find_images
from convnext.infer import BadImageError, center_crop_aspect, load_image, predict, run_eval
from convnext.registry import create_model
from convnext.resolve import Preprocess, Resolved, resolve
from convnext.weights import WEIGHTS, WeightSpec

SMALL = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}
CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox"]
PRE = Preprocess(img_size=32, crop_pct=0.875, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def small(num_classes: int = len(CLASSES), seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("convnext_atto", num_classes=num_classes, **SMALL).eval()
    with torch.no_grad():  # layer scale far from 1e-6, so the blocks matter
        for block in (b for s in model.stages for b in s.blocks):
            block.gamma.uniform_(0.5, 1.5)
    return model


def _rand_rgb(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """root/val/<class>/*.png: 6 classes x 3 images of assorted sizes."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / "val" / c).mkdir(parents=True)
        for i in range(3):
            _rand_rgb(rng, 20 + 7 * i, 31 - 4 * i).save(root / "val" / c / f"{i}.png")
    return root


def _hand_metrics(model, root: Path, classes: list[str], pre: Preprocess) -> dict:
    """top-1/top-5/loss computed one image at a time, ranks counted by hand in numpy."""
    tf = pre.transform()
    top1 = top5 = 0
    losses = []
    for c in sorted(p.name for p in (root / "val").iterdir()):
        target = classes.index(c)
        for f in sorted((root / "val" / c).iterdir()):
            with torch.no_grad():
                logits = model(tf(Image.open(f).convert("RGB"))[None])[0].double().numpy()
            rank = int((logits > logits[target]).sum())  # how many classes beat the true one
            top1 += rank == 0
            top5 += rank < 5
            losses.append(-(logits[target] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()))
    n = len(losses)
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "loss": float(np.mean(losses)), "n": n}


def test_eval_matches_hand_computation(folder, tmp_path):
    model = small()
    loaded = Resolved(model, PRE, list(CLASSES), "made here", "small")
    got = run_eval(loaded, folder, batch_size=4, output_dir=tmp_path / "out")
    want = _hand_metrics(model, folder, CLASSES, PRE)
    assert got["n"] == want["n"] == 18
    assert got["top1"] == pytest.approx(want["top1"], abs=1e-9)
    assert got["top5"] == pytest.approx(want["top5"], abs=1e-9)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert 0 < got["top5"] < 100 or want["top5"] in (0, 100)  # with 6 classes top-5 is a real test
    assert set(got["per_class_accuracy"]) == set(CLASSES)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    confusion = np.array(metrics["confusion"])
    assert confusion.sum() == 18 and (confusion.sum(axis=1) == 3).all()
    assert np.trace(confusion) / 18 * 100 == pytest.approx(got["top1"])
    assert Image.open(got["confusion_png"]).format == "PNG"


def test_eval_matches_classes_by_name(folder):
    """A model whose class order differs from the folder's sorted order is scored against its own order."""
    model = small(seed=1)
    order = list(reversed(CLASSES))
    got = run_eval(Resolved(model, PRE, order, "made here", "small"), folder, batch_size=5)
    want = _hand_metrics(model, folder, order, PRE)
    assert got["top1"] == pytest.approx(want["top1"]) and got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_eval_rejects_classes_that_share_no_name(folder):
    loaded = Resolved(small(num_classes=4), PRE, ["w", "x", "y", "z"], "made here", "small")
    with pytest.raises(ValueError, match=r"share no name .* \[w, x, y, z\]"):
        run_eval(loaded, folder)
    with pytest.raises(ValueError, match="the model has 4"):  # sorted order needs as many classes
        run_eval(loaded, folder, map_classes=True)


# ----------------------------------------------------------------------------------------------- models


def test_load_named_checkpoint_keeps_its_head(tmp_path):
    """A 5-class checkpoint for a registered name gets a 5-class model, not a fresh 1000-class head."""
    torch.manual_seed(0)
    ref = create_model("convnext_atto", num_classes=5).eval()
    torch.save({"model": ref.state_dict()}, tmp_path / "w.pt")
    loaded = resolve(tmp_path / "w.pt", model="convnext_atto", img_size=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), ref(x))
    assert loaded.classes is None and loaded.preprocess.img_size == 32


def test_load_pretrained_name_gives_imagenet_labels():
    loaded = resolve("convnext_atto")
    assert loaded.classes == imagenet_classes() and len(loaded.classes) == 1000
    assert loaded.random and "random weights" in loaded.provenance


def _published(monkeypatch, tmp_path: Path, **kw) -> WeightSpec:
    """Published weights of the small model that are already in the download cache (CONVNEXT_HOME): no network."""
    spec = WeightSpec("convnext_atto", "local_test", "https://example.invalid/w.pth", None, "ours",
                      num_classes=len(CLASSES), model_kwargs=tuple(SMALL.items()), **kw)  # fmt: skip
    monkeypatch.setitem(WEIGHTS, spec.name, spec)
    monkeypatch.setenv("CONVNEXT_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "weights").mkdir(parents=True)
    torch.save(small().state_dict(), tmp_path / "home" / "weights" / spec.filename)
    return spec


def test_eval_transform_resizes_with_the_filter_and_crop_mode_given():
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    from convnext.data import eval_transform

    resize = next(t for t in eval_transform(224, interpolation="bilinear").transforms if isinstance(t, v2.Resize))
    assert resize.interpolation == v2.InterpolationMode.BILINEAR and resize.size == [256]
    img = torch.randint(0, 256, (3, 20, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    squashed = eval_transform(32, 1.0, (0.0,) * 3, (1.0,) * 3, "nearest", crop_mode="squash")(img)  # whole image
    torch.testing.assert_close(squashed, TF.resize(img, [32, 32], v2.InterpolationMode.NEAREST).float() / 255)
    with pytest.raises(ValueError, match="interpolation"):
        eval_transform(224, interpolation="lanczos")
    with pytest.raises(ValueError, match="crop_mode"):
        eval_transform(224, crop_mode="letterbox")


def test_published_weights_evaluate_at_their_test_size_with_their_resize(monkeypatch, tmp_path, folder, capsys):
    """As timm's validate.py does: the spec's test size and test crop, unless --img-size says otherwise; its filter."""
    kw = {"input_size": 32, "crop_pct": 0.875, "test_input_size": 48, "test_crop_pct": 1.0, "mean": (0.5,) * 3}
    _published(monkeypatch, tmp_path, **kw, interpolation="bilinear")
    loaded = resolve("convnext_atto.local_test")
    assert loaded.preprocess == Preprocess(48, 1.0, (0.5,) * 3, (0.229, 0.224, 0.225), interpolation="bilinear")
    assert not loaded.random
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(torch.ones(1, 3, 32, 32)), small()(torch.ones(1, 3, 32, 32)))
    at_train_size = resolve("convnext_atto.local_test", img_size=32).preprocess
    assert (at_train_size.img_size, at_train_size.crop_pct, at_train_size.interpolation) == (32, 0.875, "bilinear")
    assert resolve("convnext_atto.local_test", img_size=48).preprocess.crop_pct == 1.0
    assert main(["eval", "convnext_atto.local_test", "--data", str(folder), "--json"]) == 0
    used = json.loads(capsys.readouterr().out)["preprocess"]  # the eval records how it preprocessed
    assert (used["img_size"], used["crop_pct"], used["interpolation"], used["crop_mode"]) == (
        48,
        1.0,
        "bilinear",
        "center",
    )


def test_resolve_errors_say_what_it_takes(tmp_path, capsys):
    """An empty folder names the kinds of folder `resolve` reads; a file that holds no weights says so; the CLI
    without a model asks for one. (A weight file alone is a model now: its architecture is read off its shapes.)"""
    with pytest.raises(FileNotFoundError, match="not a run folder .* a pretrained folder"):
        resolve(tmp_path)
    (tmp_path / "w.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        resolve(tmp_path / "w.pt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve(tmp_path / "missing.pt")
    assert main(["eval", "--data", str(tmp_path)]) == 2
    assert "name a model" in capsys.readouterr().err


def test_weights_with_nan_are_refused_naming_the_file(tmp_path, capsys):
    """A weight file full of NaN would predict "nan" for every image: resolve refuses it, naming file and tensor."""
    sd = create_model("convnext_atto", num_classes=3).state_dict()
    sd["stages.1.blocks.0.dwconv.weight"][0, 0, 0, 0] = float("nan")
    torch.save({"model": sd}, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"nan\.pt: weight stages\.1\.blocks\.0\.dwconv\.weight holds NaN"):
        resolve(tmp_path / "nan.pt", model="convnext_atto")
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    rc = main(["predict", "convnext_atto", str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "nan.pt")])
    assert rc == 2 and "holds NaN" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real (tiny) training run on the embedded digits, with EMA."""
    import dataclasses

    from convnext.train import fit, get_preset

    cfg = get_preset("demo")
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = dataclasses.replace(
        cfg,
        epochs=1,
        output=str(out),
        ema=True,
        ema_decay=0.9,
        model=dataclasses.replace(cfg.model, kwargs=dict(SMALL)),
        data=dataclasses.replace(cfg.data, img_size=16),
    )
    fit(cfg)
    return out


def test_eval_run_folder_cli(run_dir, capsys):
    assert main(["eval", "--checkpoint", str(run_dir), "--data", "digits", "--json", "--batch-size", "128"]) == 0
    out = json.loads(capsys.readouterr().out)
    trained = json.loads((run_dir / "results.json").read_text())  # the trainer's own final evaluation
    assert out["n"] == 360 and set(out) >= {"top1", "top5", "loss", "n", "per_class_accuracy", "ema"}
    assert set(out["per_class_accuracy"]) == {str(d) for d in range(10)}
    assert Path(out["confusion_png"]).is_file()
    assert out["top1"] == pytest.approx(trained["top1"]) and out["loss"] == pytest.approx(trained["loss"], rel=1e-5)
    assert out["ema"]["top1"] == pytest.approx(trained["ema_top1"])
    # the run folder as the positional model gives the same numbers
    assert main(["eval", str(run_dir), "--data", "digits", "--json", "--no-ema"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["top1"] == out["top1"] and "ema" not in again


def test_predict_run_checkpoint_uses_run_classes(run_dir, tmp_path, capsys):
    img = tmp_path / "digit.png"
    _rand_rgb(np.random.default_rng(1), 8, 8).save(img)
    assert main(["predict", str(run_dir / "last.pt"), str(img), "--topk", "3", "--json"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    r = json.loads(line)
    assert r["path"] == str(img) and len(r["topk"]) == 3
    assert {t["label"] for t in r["topk"]} <= {str(d) for d in range(10)}


# ----------------------------------------------------------------------------------------------- images


def _png(path: Path, width: int, height: int, bit_depth: int, color_type: int, rows: bytes | None = None) -> None:
    """A valid PNG written by hand (for modes Pillow cannot save, and for a real decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if rows is None:  # all-zero rows, streamed through zlib: a 400-megapixel image in a few kB
        row = b"\x00" * (1 + (width * bit_depth + 7) // 8)
        z = zlib.compressobj(9)
        data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    else:
        data = zlib.compress(rows)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    files = {}

    def keep(name: str) -> Path:
        files[name.split(".")[0]] = d / name
        return d / name

    _rand_rgb(rng, 40, 50).save(keep("good.jpg"))
    keep("unreadable.jpg").write_bytes(b"this is not an image at all")
    buf = d / "full.jpg"
    _rand_rgb(rng, 64, 64).save(buf, quality=95)
    keep("truncated.jpg").write_bytes(buf.read_bytes()[: buf.stat().st_size // 2])
    buf.unlink()
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8), "L").save(keep("gray.png"))
    rgba = np.concatenate([rng.integers(0, 256, (30, 30, 3)), np.full((30, 30, 1), 0)], axis=2).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(keep("rgba.png"))
    Image.new("CMYK", (30, 30), (10, 200, 30, 40)).save(keep("cmyk.jpg"))
    g16 = (np.arange(30 * 30).reshape(30, 30) * 70).astype(np.uint16)
    Image.fromarray(g16).save(keep("gray16.png"))
    rgb16 = (rng.integers(0, 65536, (30, 30, 3))).astype(">u2")
    _png(keep("rgb16.png"), 30, 30, 16, 2, b"".join(b"\x00" + r.tobytes() for r in rgb16))
    _rand_rgb(rng, 3, 5).save(keep("tiny.png"))  # far smaller than the crop
    _rand_rgb(rng, 2, 3000).save(keep("needle.png"))  # extreme aspect ratio
    _png(keep("bomb.png"), 20000, 20000, 1, 0)  # 400 Mpx > 2 x Pillow's limit: DecompressionBombError
    _png(keep("bomb_warn.png"), 10000, 10000, 1, 0)  # 100 Mpx: between the limits, Pillow only warns
    files["missing"] = d / "missing.jpg"
    return files


@pytest.mark.parametrize("kind", ["unreadable", "truncated", "bomb", "bomb_warn", "missing"])
def test_load_image_bad_files_raise_naming_the_file(bad_images, kind):
    with pytest.raises(BadImageError) as e:
        load_image(bad_images[kind])
    assert str(bad_images[kind]) in str(e.value)


def test_load_image_converts_every_mode(bad_images):
    for kind in ("good", "gray", "rgba", "cmyk", "gray16", "rgb16", "tiny", "needle"):
        im = load_image(bad_images[kind])
        assert im.mode == "RGB", kind
    # 16-bit values are scaled to 8 bits, not clipped at 255 as Pillow's convert() does
    g16 = np.asarray(Image.open(bad_images["gray16"]))
    got = np.asarray(load_image(bad_images["gray16"]))[..., 0]
    np.testing.assert_allclose(got, np.round(g16 / 65535 * 255), atol=1)
    assert got.max() > 200 and len(np.unique(got)) > 100
    # fully transparent pixels come out white, not whatever colour they stored
    assert (np.asarray(load_image(bad_images["rgba"])) == 255).all()


def test_center_crop_aspect_only_trims_extremes():
    assert center_crop_aspect(Image.new("RGB", (40, 30))).size == (40, 30)
    assert center_crop_aspect(Image.new("RGB", (3000, 2))).size == (8, 2)


def test_predict_never_crashes_on_bad_images(bad_images):
    model = small()
    loaded = Resolved(model, PRE, list(CLASSES), "made here", "small")
    paths = list(bad_images.values())
    results = list(predict(loaded, paths, topk=3, batch_size=3))
    assert [r["path"] for r in results] == [str(p) for p in paths]  # input order, every file
    by_kind = dict(zip(bad_images, results))
    for kind in ("unreadable", "truncated", "bomb", "bomb_warn", "missing"):
        assert set(by_kind[kind]) == {"path", "error"} and by_kind[kind]["path"] in by_kind[kind]["error"], kind
    assert "decompression-bomb" in by_kind["bomb"]["error"]
    tf = PRE.transform()
    for kind in ("good", "gray", "rgba", "cmyk", "gray16", "rgb16", "tiny", "needle"):
        r = by_kind[kind]
        assert set(r) == {"path", "topk"}, kind
        probs = [t["prob"] for t in r["topk"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(t["label"] in CLASSES for t in r["topk"])
    # the batch result for a good image equals running it alone
    with torch.no_grad():
        p = model(tf(load_image(bad_images["good"]))[None]).softmax(1)[0]
    top = p.topk(3)
    assert [t["label"] for t in by_kind["good"]["topk"]] == [CLASSES[i] for i in top.indices]
    np.testing.assert_allclose([t["prob"] for t in by_kind["good"]["topk"]], top.values.numpy(), rtol=1e-5)


def test_predict_cli_folder_json_lines(bad_images, capsys):
    folder = bad_images["good"].parent
    code = main(["predict", "convnext_atto", str(folder), "--img-size", "32", "--topk", "2", "--json"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["path"] for r in lines] == [str(p) for p in find_images([folder])]
    assert len(lines) == 12  # every image file in the folder (the missing one is not there)
    for r in lines:
        assert ("topk" in r) != ("error" in r)
        if "topk" in r:
            assert len(r["topk"]) == 2 and all(t["label"] in imagenet_classes() for t in r["topk"])


def test_find_images_recurses_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.png", "1.JPG", "notes.txt", "b/0.webp"):
        (tmp_path / name).write_bytes(b"")
    assert find_images([tmp_path, tmp_path / "x.bin"]) == [
        tmp_path / "1.JPG",
        tmp_path / "b/0.webp",
        tmp_path / "b/2.png",
        tmp_path / "x.bin",
    ]


def test_eval_loss_is_mean_cross_entropy():
    """evaluate() on in-memory batches: loss equals F.cross_entropy over everything at once."""
    from convnext.infer import evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 7))
    xs, ys = torch.randn(10, 3, 2, 2), torch.randint(0, 7, (10,))
    r = evaluate(model, [(xs[:4], ys[:4]), (xs[4:], ys[4:])], num_classes=7)
    with torch.no_grad():
        logits = model(xs)
    assert r["loss"] == pytest.approx(F.cross_entropy(logits, ys).item(), rel=1e-6)
    assert r["top1"] == pytest.approx(100 * (logits.argmax(1) == ys).float().mean().item())
    top5 = (logits.topk(5).indices == ys[:, None]).any(1).float().mean().item()
    assert r["top5"] == pytest.approx(100 * top5) and r["n"] == 10


def test_eval_with_a_class_folder_name_that_is_not_utf8(tmp_path):
    root = tmp_path / "imgs"
    names = [os.fsdecode(b"caf\xe9"), "dog"]  # Latin-1 bytes: a surrogate escape in Python
    rng = np.random.default_rng(0)
    for c in names:
        (root / "val" / c).mkdir(parents=True)
        for i in range(2):
            _rand_rgb(rng, 24, 24).save(root / "val" / c / f"{i}.png")
    loaded = Resolved(small(2), PRE, sorted(names), "made here", "small")
    got = run_eval(loaded, root, batch_size=4, output_dir=tmp_path / "out")
    assert got["n"] == 4 and Image.open(got["confusion_png"]).format == "PNG"
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["n"] == 4
