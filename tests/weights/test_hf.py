"""The Hugging Face Hub, never the network: `convert --to hf` folders that transformers loads with our logits, and
`hf-hub:` names, `--checkpoint hf-hub:...` and `convnext push` against a fake Hub served on 127.0.0.1 (just the
endpoints huggingface_hub calls: resolve, repo creation, preupload, commit, branch), the HF cache and offline mode
(also from the environment of a fresh process).
Bad input (no such repo, revision or file, a private repo without a token, an offline cache miss, a pickle) gives
one line and leaves nothing half-written in the cache."""

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from PIL import Image

from convnext.cli import main
from convnext.registry import VARIANTS, create_model
from convnext.weights import from_ours, save_weights

hf = pytest.importorskip("huggingface_hub")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_fake_write_token"
SMALL = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}


def randomized(name: str, seed: int = 0, **kw) -> torch.nn.Module:
    """A model with weights far from their init (layer scale, GRN and norms included), in eval mode."""
    torch.manual_seed(seed)
    model = create_model(name, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.ndim > 1 else 0.5))
    return model.eval()


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixel_values=x) if isinstance(model, transformers.PreTrainedModel) else model(x)
    return getattr(out, "logits", out)


def fails(capsys, *argv: str) -> str:
    """The one line `convnext ARGV` prints as it exits with 2."""
    capsys.readouterr()  # drop what came before (transformers' progress bars)
    assert main(list(argv)) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"convnext {argv[0]}: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------------------------- a fake Hub


class FakeHub(ThreadingHTTPServer):
    """repos: {repo_id: {"private": bool, "branches": {name: {"commit": sha, "files": {path: bytes}}}}}."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[str, dict] = {}
        self.truncate: set[str] = set()  # files whose GET sends half of what HEAD announced
        self.requests: list[str] = []  # "METHOD path" of every request
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def add(self, repo_id: str, files: dict[str, bytes], private: bool = False, branch: str = "main") -> None:
        repo = self.repos.setdefault(repo_id, {"private": private, "branches": {}})
        repo["branches"][branch] = {"commit": _sha(repo_id + branch + str(sorted(files))), "files": dict(files)}

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id]["branches"][branch]["files"]


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:  # quiet
        pass

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.requests.append(f"{self.command} {self.path}")
        return ok

    def _reply(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: object, status: int = 200) -> None:
        self._reply(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _authorized(self) -> bool:
        return self.headers.get("authorization") == f"Bearer {TOKEN}"

    def _repo(self, repo_id: str) -> dict | None:
        """The repo if this request may see it; else replies as the Hub does (401 without a token) and None."""
        repo = self.server.repos.get(repo_id)
        if repo is None or (repo["private"] and not self._authorized()):
            status = 404 if self._authorized() else 401
            self._reply(status, b"Repository not found", {"X-Error-Code": "RepoNotFound"})
            return None
        return repo

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", urlsplit(self.path).path)
        if m is None:
            return self._reply(404)
        repo = self._repo(unquote(m[1]))
        if repo is None:
            return
        rev, filename = unquote(m[2]), unquote(m[3])
        branch = repo["branches"].get(rev) or next((b for b in repo["branches"].values() if b["commit"] == rev), None)
        if branch is None:
            return self._reply(404, b"Revision not found", {"X-Error-Code": "RevisionNotFound"})
        commit = {"X-Repo-Commit": branch["commit"]}
        if filename not in branch["files"]:
            return self._reply(404, b"Entry not found", {"X-Error-Code": "EntryNotFound", **commit})
        body = branch["files"][filename]
        headers = {**commit, "ETag": f'"{hashlib.sha256(body).hexdigest()}"'}
        if self.command == "GET" and filename in self.server.truncate:  # shorter than announced: a corrupt copy
            return self._reply(200, body[: len(body) // 2], headers)
        self._reply(200, body, headers)

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self._authorized():
            why = {"X-Error-Message": "Invalid credentials in Authorization header"}
            return self._reply(401, b"Invalid credentials", why)
        if path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}"
            if repo_id in self.server.repos:
                return self._json({"error": "You already created this model repo"}, 409)
            private = bool(req.get("private")) or req.get("visibility") == "private"
            self.server.add(repo_id, {}, private=private)
            return self._json({"url": f"{self.server.url}/{repo_id}"})
        if path == "/api/validate-yaml":
            return self._json({"errors": [], "warnings": []})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
        if m is None or self._repo(m[1]) is None:
            return self._reply(404) if m is None else None
        repo, action, rev = self.server.repos[m[1]], m[2], unquote(m[3])
        if action == "branch":
            if rev in repo["branches"]:
                return self._json({"error": "exists"}, 409)
            repo["branches"][rev] = {**repo["branches"]["main"], "files": dict(repo["branches"]["main"]["files"])}
            return self._json({})
        if rev not in repo["branches"]:
            return self._reply(404, b"Revision not found", {"X-Error-Code": "RevisionNotFound"})
        if action == "preupload":  # every file inline in the commit ("regular"), so no LFS or Xet endpoint is needed
            files = json.loads(body)["files"]
            return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in files]})  # fmt: skip
        branch = repo["branches"][rev]
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                branch["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        branch["commit"] = _sha(branch["commit"] + line)
        return self._json({"commitUrl": f"{self.server.url}/{m[1]}/commit/{branch['commit']}",
                           "commitOid": branch["commit"], "pullRequestUrl": None})  # fmt: skip


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The fake Hub as huggingface_hub's endpoint, a fresh HF cache, offline mode off, and no token at all."""
    server = FakeHub()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    constants = hf.constants
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    yield server
    server.shutdown()
    server.server_close()


def cache_snapshots(tmp_path: Path) -> dict[str, list[str]]:
    """{repo folder: its snapshots' files} of the HF cache, checking that it is whole: no temporary file, and every
    blob complete (its name is its sha256, as the fake Hub's ETags are) and a file of a snapshot."""
    root, out = tmp_path / "hf-cache", {}
    assert not [p for p in root.rglob("*.incomplete")]
    for repo in sorted(root.glob("models--*")):
        blobs = {p.name for p in (repo / "blobs").glob("*")}
        assert all(hashlib.sha256((repo / "blobs" / b).read_bytes()).hexdigest() == b for b in blobs)
        files = [p for p in (repo / "snapshots").rglob("*") if p.is_file()]
        assert blobs == {Path(os.path.realpath(p)).name for p in files}
        out[repo.name] = sorted(p.name for p in files)
    return out


def cache_files(tmp_path: Path) -> list[str]:
    """Every file in the HF cache but its locks, relative to it."""
    root = tmp_path / "hf-cache"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts)


def safetensors_bytes(sd: dict[str, torch.Tensor], tmp_path: Path) -> bytes:
    path = tmp_path / "tmp-weights.safetensors"
    save_weights(sd, path, metadata={"format": "pt"}, force=True)
    return path.read_bytes()


def write_run(root: Path, classes=("circle", "square", "stripe")) -> tuple[Path, torch.nn.Module]:
    """A finished run folder as `convnext train` leaves it (config.json, best.pt, results.json), without training."""
    from convnext.train import get_preset
    from convnext.train.runs import build_model

    cfg = get_preset("demo")
    cfg.model.name, cfg.model.kwargs = "convnext_atto", {k: list(v) for k, v in SMALL.items()}
    model = build_model(cfg.model, len(classes), init_weights=False)  # what the run trains (patch size 2 here)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.ndim > 1 else 0.5))
    model.eval()
    cfg.data.name, cfg.data.img_size, cfg.data.crop_pct, cfg.data.classes = "/data/shapes", 32, 1.0, list(classes)
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(cfg.to_dict()))
    torch.save({"model": model.state_dict(), "ema": None}, root / "best.pt")
    (root / "results.json").write_text(json.dumps({"top1": 91.25, "top5": 100.0, "loss": 0.31, "epochs": 2}))
    return root, model


def image(path: Path) -> Path:
    Image.new("RGB", (40, 30), (200, 30, 90)).save(path)
    return path


# ----------------------------------------------------------------------------------------------- names


def test_hub_names():
    from convnext.weights.hf import is_hub_name, parse_hub_name

    assert parse_hub_name("hf-hub:org/name") == ("org/name", None)
    assert parse_hub_name("hf-hub:timm/convnext_atto.d2_in1k@v1.0") == ("timm/convnext_atto.d2_in1k", "v1.0")
    assert is_hub_name("hf-hub:a/b") and not is_hub_name("convnext_tiny") and not is_hub_name(Path("hf-hub:a"))
    for bad in ("hf-hub:", "hf-hub:a/b/c", "hf-hub:a b/c", "hf-hub:a/b@x@y"):
        with pytest.raises(ValueError, match="hf-hub:ORG/NAME"):
            parse_hub_name(bad)


def test_each_form_of_config_gives_the_architecture_and_preprocessing():
    from convnext.weights.hf import describe

    hf_v1 = {"model_type": "convnext", "depths": [3, 3, 9, 3], "hidden_sizes": [96, 192, 384, 768], "num_labels": 4,
             "id2label": {str(i): f"LABEL_{i}" for i in range(4)}, "layer_scale_init_value": 1e-6}  # fmt: skip
    form, cfg, pp, classes, _ = describe(hf_v1, {"size": {"shortest_edge": 384}, "crop_pct": 0.875}, "x")
    assert form == "transformers" and cfg == VARIANTS["convnext_tiny"].with_(num_classes=4) and classes is None
    assert (pp["img_size"], pp["crop_pct"], pp["crop_mode"]) == (384, 1.0, "squash")  # transformers warps at 384
    timm_cfg = {"architecture": "convnextv2_atto", "num_classes": 0, "pretrained_cfg": {"crop_mode": "squash"}}
    form, cfg, pp, _, arch = describe(timm_cfg, {}, "x")
    assert (form, arch, cfg.grn, cfg.num_classes, pp["crop_mode"], pp["img_size"]) == (
        "timm", "convnextv2_atto", True, 0, "squash", 224)  # fmt: skip
    with pytest.raises(ValueError, match="not one of this package's ConvNeXt variants"):
        describe({"architecture": "convnext_atto_rms"}, {}, "x")
    with pytest.raises(ValueError, match="describes no ConvNeXt"):
        describe({"model_type": "vit"}, {}, "x")


def test_without_huggingface_hub_one_line_names_the_extra(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "huggingface_hub" else real(n, *a))
    err = fails(capsys, "predict", "hf-hub:org/name", str(image(tmp_path / "a.png")))
    assert "pip install 'convnext[hub]'" in err


# ----------------------------------------------------------------------------------------------- convert --to hf


@pytest.mark.parametrize(
    ("name", "cls"),
    [("convnext_atto", "ConvNextForImageClassification"), ("convnextv2_atto", "ConvNextV2ForImageClassification")],
)
def test_convert_to_hf_folder_loads_in_transformers_with_equal_logits(tmp_path, capsys, name, cls):
    model = randomized(name, num_classes=10)
    src, dst = tmp_path / "ours.safetensors", tmp_path / "hf_folder"
    save_weights(model.state_dict(), src)
    assert main(["convert", str(src), str(dst), "--to", "hf"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    config = json.loads((dst / "config.json").read_text())
    assert config["architectures"] == [cls] and config["convnext"]["arch"] == name
    peer = getattr(transformers, cls).from_pretrained(dst).eval()
    assert peer.config.layer_norm_eps == 1e-6 and peer.config.num_labels == 10
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ref = logits(model, x)
    assert ref.abs().max() > 0.1
    assert torch.allclose(logits(peer, x), ref, atol=1e-5)
    processor = transformers.AutoImageProcessor.from_pretrained(dst)
    assert processor.size["shortest_edge"] == 224 and processor.crop_pct == 0.875
    # and back: the folder is a --checkpoint, and a pretrained folder `convert` reads again
    back = create_model(name, num_classes=10, checkpoint=dst).eval()
    assert torch.equal(logits(back, x), ref)
    assert "--force" in fails(capsys, "convert", str(src), str(dst), "--to", "hf")  # refuses to replace
    assert main(["convert", str(dst), str(dst), "--to", "hf", "--force"]) == 0


def test_convert_to_hf_keeps_class_names_and_preprocessing_of_a_run(tmp_path):
    run, model = write_run(tmp_path / "run")
    assert main(["convert", str(run), str(tmp_path / "out"), "--to", "hf"]) == 0
    peer = transformers.ConvNextForImageClassification.from_pretrained(tmp_path / "out").eval()
    assert peer.config.id2label == {0: "circle", 1: "square", 2: "stripe"}
    processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 32} and processor["crop_pct"] == 1.0
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(logits(peer, x), logits(model, x), atol=1e-5)


@pytest.mark.parametrize(
    ("name", "kw", "why"),
    [
        ("convnext_isotropic_small", {"depths": (1,), "dims": (32,)}, "no isotropic ConvNeXt"),
        ("convnext_atto", {**SMALL, "kernel_size": 5}, "kernel 5"),
    ],
)
def test_convert_to_hf_refuses_what_transformers_cannot_hold(tmp_path, capsys, name, kw, why):
    src, dst = tmp_path / "w.safetensors", tmp_path / "hf_folder"
    save_weights(create_model(name, num_classes=3, **kw).state_dict(), src)
    assert why in fails(capsys, "convert", str(src), str(dst), "--to", "hf")
    assert not dst.exists() and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary folder left


# ----------------------------------------------------------------------------------------------- push, and back


def test_push_a_run_then_use_it_from_the_hub(hub, tmp_path, capsys):
    run, model = write_run(tmp_path / "run")
    assert main(["push", str(run), "--repo", "me/shapes", "--token", TOKEN]) == 0
    assert "pushed" in capsys.readouterr().out
    files = hub.files("me/shapes")
    assert sorted(files) == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    card = files["README.md"].decode()
    assert "91.25" in card and "| top5 | 100 |" in card and "center-crop 32 px" in card and "circle" in card
    assert "/data" not in card  # the data set by its name, not the trainer's local path
    config = json.loads(files["config.json"])
    assert config["model_type"] == "convnext" and config["convnext"]["classes"] == ["circle", "square", "stripe"]

    x = torch.randn(2, 3, 32, 32)
    ref = logits(model, x)
    got = create_model("hf-hub:me/shapes", pretrained=True).eval()
    assert torch.equal(logits(got, x), ref)
    fresh = create_model("hf-hub:me/shapes", num_classes=5)  # without pretrained: the architecture only
    assert fresh.num_classes == 5 and fresh.cfg.dims == SMALL["dims"]
    snapshot = next((tmp_path / "hf-cache").glob("models--me--shapes/snapshots/*"))
    peer = transformers.ConvNextForImageClassification.from_pretrained(snapshot).eval()
    assert torch.allclose(logits(peer, x), ref, atol=1e-5)

    from convnext.resolve import resolve

    loaded = resolve("hf-hub:me/shapes")  # what predict/eval/export take: weights, preprocessing, classes
    assert loaded.classes == ["circle", "square", "stripe"] and loaded.preprocess.img_size == 32
    assert loaded.preprocess.crop_pct == 1.0 and torch.equal(logits(loaded.model, x), ref)
    # --checkpoint hf-hub:... wherever a checkpoint is read (create_model, train's model.checkpoint, eval, predict)
    as_checkpoint = create_model("convnext_atto", num_classes=3, patch_size=2, checkpoint="hf-hub:me/shapes", **SMALL)
    assert torch.equal(logits(as_checkpoint.eval(), x), ref)
    img = str(image(tmp_path / "a.png"))
    err = fails(capsys, "predict", "convnext_atto", img, "--checkpoint", "hf-hub:me/shapes")
    assert "does not fit" in err  # the default atto is not this small one
    assert main(["predict", "hf-hub:me/shapes", img, "--json", "--topk", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["topk"][0]["label"] in ("circle", "square", "stripe")


def test_push_a_weight_file_to_a_private_branch(hub, tmp_path, capsys, monkeypatch):
    model = randomized("convnextv2_atto", num_classes=4, **SMALL)
    src = tmp_path / "v2.pth"
    torch.save({"model": from_ours(model.state_dict(), "official")}, src)  # the official layout, wrapped
    err = fails(capsys, "push", str(src), "--repo", "me/v2")  # no token anywhere: refused before any work
    assert "token" in err and "me/v2" not in hub.repos
    args = ["push", str(src), "--repo", "me/v2", "--private", "--revision", "dev", "--token", TOKEN]
    assert main([*args, "--save-dir", str(tmp_path / "kept")]) == 0
    assert (tmp_path / "kept" / "README.md").is_file() and hub.repos["me/v2"]["private"]
    assert "model.safetensors" in hub.files("me/v2", "dev") and "model.safetensors" not in hub.files("me/v2")

    err = fails(capsys, "predict", "hf-hub:me/v2@dev", str(image(tmp_path / "a.png")))  # private, no token
    assert "no repository me/v2" in err and "private" in err and "HF_TOKEN" in err
    assert cache_files(tmp_path) == []  # nothing written for a refused download
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    got = create_model("hf-hub:me/v2@dev", pretrained=True).eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(logits(got, x), logits(model, x), atol=1e-6)
    assert "refused the token" in fails(capsys, "push", str(src), "--repo", "me/v2", "--token", "hf_wrong")


def test_push_save_dir_of_a_model_transformers_cannot_hold_keeps_our_layout(tmp_path):
    model = randomized("convnext_atto", num_classes=3, kernel_size=5, **SMALL)
    src, out = tmp_path / "k5.safetensors", tmp_path / "k5"
    save_weights(model.state_dict(), src)
    assert main(["push", str(src), "--save-dir", str(out)]) == 0  # no --repo: only the folder
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert "model_type" not in config and config["convnext"]["config"]["kernel_size"] == 5
    assert "transformers cannot load this model: transformers' ConvNext has kernel 7" in (out / "README.md").read_text()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(logits(create_model("convnext_atto", num_classes=3, kernel_size=5, checkpoint=out, **SMALL)
                              .eval(), x), logits(model, x))  # fmt: skip


# ----------------------------------------------------------------------------------------------- other repos


def test_reads_transformers_and_timm_repos(hub, tmp_path):
    labels = {0: "cat", 1: "dog", 2: "emu"}
    cfg = transformers.ConvNextV2Config(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], id2label=labels,
                                        label2id={v: k for k, v in labels.items()})  # fmt: skip
    torch.manual_seed(0)
    peer = transformers.ConvNextV2ForImageClassification(cfg).eval()
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    peer.save_pretrained(tmp_path / "peer")
    processor = {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 288}, "crop_pct": 0.95,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3}  # fmt: skip
    files = {p.name: p.read_bytes() for p in (tmp_path / "peer").iterdir()}
    hub.add("facebook/v2", {**files, "preprocessor_config.json": json.dumps(processor).encode()})
    x = torch.randn(2, 3, 64, 64)

    from convnext.resolve import resolve

    loaded = resolve("hf-hub:facebook/v2")
    assert loaded.classes == ["cat", "dog", "emu"] and (loaded.preprocess.img_size, loaded.preprocess.crop_pct) == (
        288, 0.95)  # fmt: skip
    diff = (logits(loaded.model, x) - logits(peer, x)).abs().max()
    assert diff < 1e-4  # transformers' head norm has eps 1e-12 here, ours 1e-6

    timm_model = randomized("convnext_atto", num_classes=7)
    pretrained_cfg = {"input_size": [3, 256, 256], "crop_pct": 0.95, "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6],
                      "interpolation": "bicubic"}  # fmt: skip
    timm_cfg = {"architecture": "convnext_atto", "num_classes": 7, "pretrained_cfg": pretrained_cfg}
    sd = from_ours(timm_model.state_dict(), "timm")  # atto: the MLP as 1x1 convolutions, as timm stores it
    assert sd["stages.0.blocks.0.mlp.fc1.weight"].ndim == 4
    hub.add("timm/convnext_atto.test", {"config.json": json.dumps(timm_cfg).encode(),
                                        "model.safetensors": safetensors_bytes(sd, tmp_path)})  # fmt: skip
    loaded = resolve("hf-hub:timm/convnext_atto.test")
    assert loaded.preprocess.img_size == 256 and loaded.preprocess.mean == (0.1, 0.2, 0.3)
    assert torch.equal(logits(loaded.model, x), logits(timm_model, x))


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_names_are_one_line_and_leave_no_partial_files(hub, tmp_path, capsys):
    img = str(image(tmp_path / "a.png"))
    model = randomized("convnext_atto", num_classes=2, **SMALL)
    ours_cfg = {"convnext": {"arch": "convnext_atto", "config": {k: list(v) for k, v in SMALL.items()} | {
        "num_classes": 2}}}  # fmt: skip
    hub.add("me/no-weights", {"config.json": json.dumps(ours_cfg).encode()})
    hub.add("me/pickle", {"config.json": json.dumps(ours_cfg).encode(), "pytorch_model.bin": _pickle_bytes(tmp_path)})
    hub.add("me/cut", {"config.json": json.dumps(ours_cfg).encode(),
                       "model.safetensors": safetensors_bytes(model.state_dict(), tmp_path)})  # fmt: skip
    hub.truncate.add("model.safetensors")

    cases = [
        ("hf-hub:nobody/nothing", "no repository nobody/nothing"),
        ("hf-hub:me/no-weights@v9", "has no revision 'v9'"),
        ("hf-hub:me/no-weights", "holds no weights (model.safetensors or pytorch_model.bin)"),
        ("hf-hub:me/pickle", "refusing to unpickle code"),
        ("hf-hub:me/cut", "downloading model.safetensors from"),  # a short download: nothing cached
        ("hf-hub:bad name", "hf-hub:ORG/NAME"),
    ]
    for name, expected in cases:
        assert expected in fails(capsys, "predict", name, img), name
    assert cache_snapshots(tmp_path) == {"models--me--cut": ["config.json"], "models--me--no-weights": ["config.json"],
                                         "models--me--pickle": ["config.json", "pytorch_model.bin"]}  # fmt: skip


def _pickle_bytes(tmp_path: Path) -> bytes:
    """A pytorch_model.bin that holds a pickled Python object besides tensors: refused, never unpickled."""
    path = tmp_path / "evil.bin"
    torch.save({"weight": torch.zeros(1), "obj": _Evil()}, path)
    return path.read_bytes()


class _Evil:
    pass


def test_offline_uses_the_cache_and_a_miss_is_one_line(hub, tmp_path, capsys, monkeypatch):
    """HF_HUB_CACHE and HF_HUB_OFFLINE=1 from the environment of a fresh process, as users run it: the cached repo
    loads, an uncached one is one line, and the Hub (up, and holding both) is never asked; then the same in-process
    with the Hub gone."""
    model = randomized("convnext_atto", num_classes=2, **SMALL)
    texts = {"config.json": json.dumps({"convnext": {"arch": "convnext_atto", "config": {
        **{k: list(v) for k, v in SMALL.items()}, "num_classes": 2}}}).encode()}  # fmt: skip
    hub.add("me/cached", {**texts, "model.safetensors": safetensors_bytes(model.state_dict(), tmp_path)})
    hub.add("me/never-fetched", dict(hub.files("me/cached")))
    create_model("hf-hub:me/cached", pretrained=True)  # now in the cache
    before = cache_files(tmp_path)
    hub.requests.clear()

    img = str(image(tmp_path / "a.png"))
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-home")}  # fmt: skip
    env.pop("HF_TOKEN", None)
    script = ("import sys; from convnext.cli import main; "
              f"sys.exit(10 * main(['predict', 'hf-hub:me/cached', {img!r}, '--json']) + "
              f"main(['predict', 'hf-hub:me/never-fetched', {img!r}]))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr  # the first 0, the second 2
    assert json.loads(done.stdout)["path"] == img
    err = done.stderr.strip().splitlines()[-1]  # after the first one's progress bar
    assert err.startswith("convnext predict: error: hf-hub:me/never-fetched: "), done.stderr
    assert "not in the Hugging Face cache" in err and "HF_HUB_OFFLINE" in err
    assert hub.requests == [] and cache_files(tmp_path) == before

    hub.shutdown()  # no Hub any more, offline mode on in this process too
    monkeypatch.setattr(hf.constants, "HF_HUB_OFFLINE", True)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(logits(create_model("hf-hub:me/cached", pretrained=True).eval(), x), logits(model, x))
    err = fails(capsys, "predict", "hf-hub:me/never-fetched", img)
    assert "not in the Hugging Face cache" in err and "HF_HUB_OFFLINE" in err
    assert cache_files(tmp_path) == before
