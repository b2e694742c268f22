"""Weights as data, safe loading (wrappers, EMA, prefixes, head/stem adaptation, bad files), safetensors,
the download cache against a real local HTTP server, and `convnext convert` / `convnext download`."""

import hashlib
import logging
import os
import re
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from convnext.cli import main
from convnext.registry import MODELS, create_model
from convnext.weights import (
    UNSUPPORTED,
    WEIGHTS,
    WeightSpec,
    adapt_in_chans,
    detect_layout,
    from_ours,
    load_checkpoint,
    load_pretrained,
    read_state_dict,
    resolve_spec,
    save_weights,
    to_ours,
)
from convnext.weights.hf import RETRIES

SMALL = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}  # a 4-stage ConvNeXt small enough for every test


def small(num_classes: int = 10, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("convnext_atto", num_classes=num_classes, **{**SMALL, **kw}).eval()
    with torch.no_grad():  # non-trivial layer scale, so a wrong mapping shows in the outputs
        for block in (b for s in model.stages for b in s.blocks):
            block.gamma.uniform_(0.5, 1.5)
    return model


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- specs as data


def test_every_spec_is_well_formed():
    assert len(WEIGHTS) > 50
    files = set()
    for name, spec in WEIGHTS.items():
        assert name == spec.name and spec.arch in MODELS, name
        assert spec.url.startswith("https://"), name
        assert spec.layout in ("official", "timm", "torchvision", "hf"), name
        assert 0 < spec.crop_pct <= 1 and spec.input_size in (224, 256, 320, 384, 512), name
        assert spec.num_classes in (0, 640, 768, 1000, 1024, 11821, 21841), name  # 640 / 768 / 1024: CLIP projections
        assert spec.top1 is None or 70 < spec.top1 < 90, name
        assert spec.interpolation in ("bicubic", "bilinear"), name
        assert spec.crop_mode == "center" or spec.input_size >= 384, name  # only the large-size evals warp
        assert spec.filename not in files, f"{name}: cache file name clash"
        files.add(spec.filename)
        # torch.hub convention: "name-<sha256 prefix>.ext"; where the url carries one, the spec pins it.
        m = re.search(r"-([0-9a-f]{8,})\.\w+$", spec.url)
        assert (m.group(1) if m else None) == spec.sha256, name
        # V2: CC-BY-NC 4.0; EUPE: FAIR non-commercial research licence
        assert spec.non_commercial == (spec.arch.startswith("convnextv2_") or spec.tag.startswith("eupe_")), name


def test_published_facts():
    tv = WEIGHTS["convnext_tiny.tv_in1k"]
    assert tv.url == "https://download.pytorch.org/models/convnext_tiny-983f1562.pth" and tv.top1 == 82.52
    assert tv.crop_pct == pytest.approx(224 / 236, abs=1e-4) and tv.interpolation == "bilinear"
    fb = WEIGHTS["convnext_tiny.fb_in1k"]
    assert fb.url == "https://dl.fbaipublicfiles.com/convnext/convnext_tiny_1k_224_ema.pth" and fb.top1 == 82.1
    assert WEIGHTS["convnextv2_atto.fcmae_ft_in1k"].top1 == 76.7
    assert WEIGHTS["convnext_xlarge.fb_in22k_ft_in1k_384"].input_size == 384
    assert WEIGHTS["convnext_base.fb_in22k"].num_classes == 21841


def test_resolve_spec_default_and_errors():
    assert resolve_spec("convnext_tiny", None).tag == "fb_in1k"
    assert resolve_spec("convnextv2_atto", None).tag == "fcmae_ft_in1k"
    assert resolve_spec("convnext_atto", "d2_in1k").sha256 == "01bb0f51"
    with pytest.raises(KeyError, match="fb_in1k.*tv_in1k|tv_in1k.*fb_in1k"):
        resolve_spec("convnext_tiny", "nope")
    with pytest.raises(KeyError, match="no published weights"):
        resolve_spec("roadmap_00_resnet50", None)


def test_spec_rejects_a_malformed_hash():
    with pytest.raises(ValueError, match="sha256"):
        WeightSpec("convnext_atto", "x", "https://example.org/w.pth", "xyz", "ours")
    with pytest.raises(ValueError, match="interpolation"):
        WeightSpec("convnext_atto", "x", "https://example.org/w.pth", None, "ours", interpolation="lanczos")


# -------------------------------------------------------------------- timm's list, timm's and torchvision's facts


def _timm_preprocessing(cfg: dict) -> dict:
    """A timm pretrained_cfg in WeightSpec's terms."""
    test = cfg.get("test_input_size")
    return {
        "num_classes": cfg["num_classes"],
        "input_size": cfg["input_size"][-1],
        "crop_pct": cfg["crop_pct"],
        "test_input_size": test[-1] if test else None,
        "test_crop_pct": cfg.get("test_crop_pct"),
        "mean": tuple(cfg["mean"]),
        "std": tuple(cfg["std"]),
        "interpolation": cfg["interpolation"],
        "crop_mode": cfg.get("crop_mode", "center"),
    }


def test_every_convnext_weight_timm_lists_is_a_spec_or_unsupported():
    timm = pytest.importorskip("timm")
    listed = set(timm.list_pretrained("convnext*"))
    missing = sorted(listed - set(WEIGHTS) - set(UNSUPPORTED))
    assert not missing, f"timm {timm.__version__} lists weights with no spec and no UNSUPPORTED reason: {missing}"
    assert not set(UNSUPPORTED) & set(WEIGHTS)
    assert set(UNSUPPORTED) <= listed, "UNSUPPORTED names a weight timm does not list"
    assert all(name.split(".")[0] not in MODELS for name in UNSUPPORTED)  # an arch we build gets a spec instead


@pytest.mark.slow
def test_every_timm_weight_builds_timms_architecture():
    """Each of timm's ConvNeXt weights names a registered arch and a spec whose model is timm's, on the meta device
    (nothing downloaded, no memory): timm's state dict in our layout has our keys and shapes, ours in timm's layout
    has timm's (the 1x1-conv MLP where timm has one), and the norms' eps are timm's. One model per arch and spec
    options; the classes per weight are checked against timm's configs below."""
    timm = pytest.importorskip("timm")
    listed = timm.list_pretrained("convnext*")
    assert len(listed) >= 98 and all(name in WEIGHTS and name.split(".")[0] in MODELS for name in listed)

    def shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in sd.items()}

    def eps(model: torch.nn.Module) -> set[float]:  # every norm's, GRN's aside (timm's GRN keeps its own 1e-6)
        return {m.eps for m in model.modules() if hasattr(m, "eps") and "GRN" not in type(m).__name__.upper()}

    seen, wrong = set(), []
    for name in listed:
        spec = WEIGHTS[name]
        if (spec.arch, spec.model_kwargs) in seen:
            continue
        seen.add((spec.arch, spec.model_kwargs))
        peer = timm.create_model(name, pretrained=False, device="meta")
        with torch.device("meta"):
            ours = create_model(name)  # the spec's classes and model options
        theirs, mine = peer.state_dict(), ours.state_dict()
        if shapes(to_ours(theirs, "timm")) != shapes(mine):
            wrong.append(f"{name}: timm's state dict in our layout differs from our model's")
        if shapes(from_ours(mine, "timm")) != shapes(theirs):
            wrong.append(f"{name}: our state dict in timm's layout differs from timm's model")
        if eps(peer) != eps(ours):
            wrong.append(f"{name}: norm eps {sorted(eps(ours))}, timm {sorted(eps(peer))}")
    assert len(seen) >= 26 and not wrong, "\n".join(wrong)


def test_specs_match_timms_pretrained_configs():
    """Preprocessing, classes, file (timm's url or its hub file) and, for timm's own files, the licence."""
    timm = pytest.importorskip("timm")
    wrong = []
    for name in sorted(set(timm.list_pretrained("convnext*")) & set(WEIGHTS)):
        spec, cfg = WEIGHTS[name], timm.models.get_pretrained_cfg(name).to_dict()
        want = _timm_preprocessing(cfg)
        wrong += [
            f"{name} {k}: ours {getattr(spec, k)!r}, timm {v!r}" for k, v in want.items() if getattr(spec, k) != v
        ]
        hub_file = f"https://huggingface.co/{cfg['hf_hub_id']}/resolve/main/model.safetensors"
        if spec.url not in (cfg["url"], hub_file):
            wrong.append(f"{name} url: {spec.url} is neither timm's {cfg['url']!r} nor {hub_file}")
        if spec.layout == "timm" and spec.license != cfg["license"]:
            wrong.append(f"{name} license: ours {spec.license}, timm {cfg['license']}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large"])
def test_torchvision_specs_preprocess_as_torchvision_does(size):
    """timm has no tv_in1k tags: the spec's eval pipeline gives what `weights.transforms()` gives (bilinear,
    resize 230-236, crop 224), and its url, classes and top-1 are torchvision's."""
    from torchvision.models import get_weight

    from convnext.resolve import Preprocess

    weights = get_weight(f"ConvNeXt_{size.title()}_Weights.IMAGENET1K_V1")
    spec = WEIGHTS[f"convnext_{size}.tv_in1k"]
    assert spec.url == weights.url and spec.num_classes == len(weights.meta["categories"])
    assert spec.top1 == weights.meta["_metrics"]["ImageNet-1K"]["acc@1"]
    img = torch.randint(0, 256, (3, 300, 411), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours, theirs = Preprocess.from_spec(spec).transform()(img), weights.transforms()(img)
    grey_levels = (ours - theirs).abs() * torch.tensor(spec.std)[:, None, None] * 255
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert grey_levels.max() <= 1 + 1e-3  # uint8 rounding inside the resize; bicubic would be ~36 levels off


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # layer scale and norms far from their identity-like init, so a wrong mapping shows
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.squeeze().ndim > 1 else 0.5))
    return model.eval()


# The heads timm's hub specs add on small archs (test_convert checks 1000-class timm models): ImageNet-12k's 11821
# classes on nano's 1x1-conv MLP, and a backbone without a head (DINOv3; EUPE's are the same shape). The larger
# archs (small, base CLIP with its 640-wide projection, large, xxlarge) load through the same rules but build slowly.
TIMM_HUB_CASES = ["convnext_nano.in12k", "convnext_tiny.dinov3_lvd1689m"]


@pytest.mark.parametrize("name", TIMM_HUB_CASES)
def test_timm_hub_weights_load_into_the_specs_model(name):
    """A random state dict of timm's model for `name` loads into ours, built from the spec, with the same outputs."""
    timm = pytest.importorskip("timm")
    peer = _randomized(timm.create_model(name, pretrained=False))
    ours = create_model(name).eval()  # a tagged name: the spec's classes, random weights
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no head dropped, no stem adapted
        load_checkpoint(ours, peer.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = peer(x), ours(x)
    assert got.shape == (2, WEIGHTS[name].num_classes or ours.num_features) and want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------- loading, adapting


def test_wrappers_prefixes_and_ema(tmp_path):
    main_w, ema_w = small(seed=1), small(seed=2)
    main_sd, ema_sd = main_w.state_dict(), ema_w.state_dict()
    ddp = {f"module.{k}": v for k, v in main_sd.items()}
    cases = [
        ({"model": main_sd, "model_ema": ema_sd, "epoch": 3}, False, main_sd),  # official training checkpoint
        ({"model": main_sd, "model_ema": ema_sd}, True, ema_sd),
        ({"state_dict": ddp, "state_dict_ema": ema_sd, "arch": "x"}, False, main_sd),  # timm train checkpoint
        ({"state_dict": ddp, "state_dict_ema": ema_sd}, True, ema_sd),
        ({"model_ema": ema_sd}, False, ema_sd),  # only EMA: taken either way
        ({f"_orig_mod.{k}": v for k, v in main_sd.items()}, False, main_sd),  # torch.compile prefix
    ]
    for i, (ckpt, ema, want) in enumerate(cases):
        path = tmp_path / f"c{i}.pth"
        torch.save(ckpt, path)
        model = small(seed=9)
        load_checkpoint(model, path, ema=ema)
        assert same(model.state_dict(), want), i
    with pytest.warns(UserWarning, match="no EMA"):
        load_checkpoint(small(), {"model": main_sd}, ema=True)


def test_official_checkpoint_with_training_args_loads(tmp_path):
    import argparse

    sd = from_ours(small(seed=3).state_dict(), "official")
    torch.save({"model": sd, "args": argparse.Namespace(lr=4e-3, model="convnext_tiny")}, tmp_path / "o.pth")
    model = small()
    load_checkpoint(model, tmp_path / "o.pth")
    assert same(model.state_dict(), small(seed=3).state_dict())


def test_head_is_dropped_when_classes_differ():
    src = small(num_classes=10, seed=1)
    model = small(num_classes=5, seed=2)
    head_before = model.head.weight.clone()
    with pytest.warns(UserWarning, match="10 classes.*5"):
        load_checkpoint(model, src.state_dict())
    assert torch.equal(model.head.weight, head_before)  # the fresh head stays
    assert torch.equal(model.stem[0].weight, src.stem[0].weight)
    features = small(num_classes=0)
    with pytest.warns(UserWarning, match="10 classes.*0"):
        load_checkpoint(features, src.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(features(x), src.forward_head(src.forward_features(x), pre_logits=True), atol=1e-6)


def test_stem_adapts_to_one_and_four_channels():
    src = small(seed=1)
    grey = small(seed=2, in_chans=1)
    with pytest.warns(UserWarning, match="3 to 1 input channels"):
        load_checkpoint(grey, src.state_dict())
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():  # a grey image through the summed stem == the RGB model on that grey image
        assert torch.allclose(grey(x), src(x.expand(-1, 3, -1, -1)), atol=1e-5)
    w = src.stem[0].weight
    four = adapt_in_chans(w, 4)
    assert four.shape == (8, 4, 4, 4)
    assert torch.allclose(four[:, :3], w * 0.75) and torch.allclose(four[:, 3], w[:, 0] * 0.75)
    assert torch.allclose(adapt_in_chans(w, 6).sum(1), w.sum(1), atol=1e-6)  # same response to a constant input


def test_mismatched_shapes_raise_one_error_and_leave_the_model_untouched(tmp_path):
    wide = create_model("convnext_atto", num_classes=10, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))
    path = tmp_path / "wide.pth"
    torch.save({"model": from_ours(wide.state_dict(), "official")}, path)
    model = small()
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a head of other width is a mismatch, not a head to drop with a warning
        with pytest.raises(ValueError) as err:
            load_checkpoint(model, path)
    msg = str(err.value)
    assert str(path) in msg and "official" in msg
    assert "stages.0.blocks.0.dwconv.weight checkpoint (16, 1, 7, 7) vs model (8, 1, 7, 7)" in msg
    assert "more)" in msg  # long lists are cut short
    assert same(model.state_dict(), before)


def test_missing_and_unexpected_keys(tmp_path):
    sd = dict(small(seed=1).state_dict())
    del sd["stages.2.blocks.0.pwconv1.weight"]
    sd["stages.2.blocks.0.extra"] = torch.zeros(3)
    model = small(seed=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"missing keys: stages\.2\.blocks\.0\.pwconv1\.weight.*unexpected keys"):
        load_checkpoint(model, sd)
    assert same(model.state_dict(), before)
    with pytest.warns(UserWarning, match="ignored 1 missing and 1 unexpected"):
        load_checkpoint(model, sd, strict=False)
    assert torch.equal(model.stem[0].weight, sd["stem.0.weight"])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_and_corrupt_files(tmp_path, suffix):
    good = tmp_path / f"good{suffix}"
    save_weights(small(seed=1).state_dict(), good)
    data = good.read_bytes()
    bad = {
        "truncated": data[: len(data) // 2],
        "corrupt": bytes(b ^ 0x5A for b in data[:4096]) + data[4096:],
        "empty": b"",
    }
    model = small(seed=2)
    before = snapshot(model)
    for kind, blob in bad.items():
        path = tmp_path / f"{kind}{suffix}"
        path.write_bytes(blob)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            load_checkpoint(model, path)
        assert same(model.state_dict(), before), kind
    with pytest.raises(FileNotFoundError, match="nope"):
        load_checkpoint(model, tmp_path / f"nope{suffix}")


class Payload:  # a pickled object: loading it would run code, so it must be refused
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"model": small().state_dict(), "x": Payload()}, path)
    with pytest.raises(ValueError, match="refusing to unpickle code"):
        read_state_dict(path)
    assert "must never run" not in capsys.readouterr().out


def test_unknown_layout_is_named(tmp_path):
    with pytest.raises(ValueError, match="unrecognised.*foo.weight"):
        load_checkpoint(small(), {"foo.weight": torch.zeros(2), "bar.bias": torch.zeros(2)})
    with pytest.raises(ValueError, match="unrecognised"):
        detect_layout({"encoder.mask_token": torch.zeros(1)})


def test_safetensors_write_read_and_overwrite(tmp_path):
    sd = small(seed=1).state_dict()
    path = tmp_path / "w.safetensors"
    save_weights(sd, path, metadata={"layout": "ours"})
    assert same(read_state_dict(path), sd)
    with pytest.raises(FileExistsError):
        save_weights(sd, path)
    save_weights(small(seed=2).state_dict(), path, force=True)
    assert same(read_state_dict(path), small(seed=2).state_dict())
    save_weights(sd, tmp_path / "w.pth", wrap_key="model")
    assert set(torch.load(tmp_path / "w.pth", weights_only=True)) == {"model"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth", "w.safetensors"]  # no temp files left


def test_create_model_with_a_local_checkpoint_in_another_layout(tmp_path):
    src = small(seed=4)
    path = tmp_path / "timm.safetensors"
    save_weights(from_ours(src.state_dict(), "timm"), path)
    model = create_model("convnext_atto", num_classes=10, checkpoint=path, **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), src(x))


# --------------------------------------------------------------------------------- download cache over HTTP


class Handler(BaseHTTPRequestHandler):
    """Serves `server.files`; paths under /cut/ send the full Content-Length but only half the body."""

    def do_GET(self):
        self.server.hits.append(self.path)
        body = self.server.files.get(self.path.removeprefix("/cut"))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if self.path.startswith("/cut/") else body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.hits = {}, []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def serve(server, path: str, model: torch.nn.Module, tmp_path: Path, layout: str = "official") -> tuple[str, str]:
    """Put `model`'s weights (in `layout`, wrapped as the official files are) on the server; (url, sha256)."""
    f = tmp_path / "served.pth"
    torch.save({"model": from_ours(model.state_dict(), layout)}, f)
    server.files[path] = f.read_bytes()
    return server.url + path, hashlib.sha256(server.files[path]).hexdigest()


def spec_for(url: str, sha256: str | None, **kw) -> WeightSpec:
    return WeightSpec("convnext_atto", "local_test", url, sha256, "official", num_classes=10, **kw)


def test_download_then_cache_hit(server, tmp_path):
    src = small(seed=5)
    url, digest = serve(server, "/w.pth", src, tmp_path)
    cache = tmp_path / "cache"
    for _ in range(2):
        model = small(seed=6)
        load_pretrained(model, spec_for(url, digest[:8]), cache_dir=cache)
        assert same(model.state_dict(), src.state_dict())
    assert server.hits == ["/w.pth"]  # the second load came from the cache
    assert [p.name for p in cache.iterdir()] == ["convnext_atto.local_test.pth"]


def test_wrong_hash_discards_the_download(server, tmp_path):
    url, digest = serve(server, "/w.pth", small(), tmp_path)
    cache = tmp_path / "cache"
    model = small(seed=6)
    before = snapshot(model)
    with pytest.raises(RuntimeError) as err:
        load_pretrained(model, spec_for(url, "0" * 64), cache_dir=cache)
    assert url in str(err.value) and "0" * 64 in str(err.value) and digest in str(err.value)
    assert list(cache.iterdir()) == []  # no temp file, nothing cached
    assert same(model.state_dict(), before)


def test_interrupted_download_does_not_poison_the_cache(server, tmp_path):
    src = small(seed=5)
    url, digest = serve(server, "/w.pth", src, tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "convnext_atto.local_test.pth.1234.partial").write_bytes(b"left over by a killed process")
    for sha in (digest, None):  # caught by the length check even where no hash is published
        server.hits.clear()
        with pytest.raises(ConnectionError, match="interrupted"):
            load_pretrained(small(), spec_for(server.url + "/cut/w.pth", sha), cache_dir=cache)
        assert len(server.hits) == 1 + RETRIES  # a short body is tried again
        assert not (cache / "convnext_atto.local_test.pth").exists()
    model = small(seed=6)
    load_pretrained(model, spec_for(url, digest), cache_dir=cache)  # a later good download goes through
    assert same(model.state_dict(), src.state_dict())


def test_missing_hash_reports_the_downloaded_one(server, tmp_path, caplog):
    url, digest = serve(server, "/w.pth", small(), tmp_path)
    with caplog.at_level(logging.WARNING):
        load_pretrained(small(), spec_for(url, None), cache_dir=tmp_path / "cache")
    assert digest in caplog.text


def test_non_commercial_weights_warn(server, tmp_path):
    url, digest = serve(server, "/w.pth", small(), tmp_path)
    with pytest.warns(UserWarning, match="non-commercial"):
        load_pretrained(small(), spec_for(url, digest, license="cc-by-nc-4.0"), cache_dir=tmp_path / "c")


def test_create_model_pretrained_end_to_end(server, tmp_path, monkeypatch):
    torch.manual_seed(7)
    src = create_model("convnext_atto", num_classes=10).eval()  # the registered arch, as the spec names it
    url, digest = serve(server, "/atto.pth", src, tmp_path, layout="timm")
    monkeypatch.setitem(WEIGHTS, "convnext_atto.local_test", spec_for(url, digest))
    monkeypatch.setenv("CONVNEXT_HOME", str(tmp_path / "home"))
    model = create_model("convnext_atto.local_test", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
    assert (tmp_path / "home" / "weights" / "convnext_atto.local_test.pth").is_file()


# --------------------------------------------------------------------------------------------------- the CLI


def test_cli_convert_and_refuse_overwrite(tmp_path):
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.convnext_tiny(weights=None).eval()
    src, dst = tmp_path / "tv.pth", tmp_path / "ours.safetensors"
    torch.save(tv.state_dict(), src)
    assert main(["convert", str(src), str(dst), "--model", "convnext_tiny"]) == 0
    written = dst.read_bytes()
    assert main(["convert", str(src), str(dst)]) == 2  # refuses to overwrite
    assert dst.read_bytes() == written
    timm_file = tmp_path / "timm.safetensors"
    assert main(["convert", str(dst), str(timm_file), "--to", "timm"]) == 0
    assert detect_layout(read_state_dict(timm_file)) == "timm"
    assert main(["convert", str(timm_file), str(dst), "--to", "hf", "--force"]) == 0
    assert detect_layout(read_state_dict(dst)) == "hf"
    model = create_model("convnext_tiny", checkpoint=dst).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - tv(x)).abs().max() <= 1e-5
    assert main(["convert", str(src), str(tmp_path / "x.safetensors"), "--model", "convnext_atto"]) == 2  # no fit
    assert not (tmp_path / "x.safetensors").exists()
    folder = tmp_path / "a_folder.safetensors"
    (folder / "kept").mkdir(parents=True)
    assert main(["convert", str(dst), str(folder), "--force"]) == 2  # --force never replaces a folder
    assert (folder / "kept").is_dir()


def test_convert_writes_files_with_the_mode_of_the_umask(tmp_path):
    """convert (safetensors, torch.save, a transformers folder) and a training checkpoint give their files what
    `open` gives a new file, 0666 less the umask, not the 0600 of the temporary file they are written through."""
    from convnext.engine.checkpoint import save_atomic

    src = tmp_path / "src.pth"
    torch.save(small().state_dict(), src)
    old = os.umask(0o027)
    try:
        assert main(["convert", str(src), str(tmp_path / "a.safetensors")]) == 0
        assert main(["convert", str(src), str(tmp_path / "a.pth")]) == 0
        assert main(["convert", str(src), str(tmp_path / "hf_folder"), "--to", "hf"]) == 0
        save_atomic({"step": 1}, tmp_path / "run" / "last.pt")
    finally:
        os.umask(old)
    files = [tmp_path / "a.safetensors", tmp_path / "a.pth", tmp_path / "run" / "last.pt",
             *(tmp_path / "hf_folder").iterdir()]  # fmt: skip
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
    assert len(files) == 6 and set(modes.values()) == {"0o640"}, modes


def test_cli_download(server, tmp_path, monkeypatch, capsys):
    url, digest = serve(server, "/w.pth", small(), tmp_path)
    monkeypatch.setitem(WEIGHTS, "convnext_atto.local_test", spec_for(url, digest))
    assert main(["download", "convnext_atto.local_test", "--cache-dir", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "c" / "convnext_atto.local_test.pth")
    assert main(["download", "convnext_atto.nope"]) == 2
