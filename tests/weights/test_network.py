"""Every network call ends: weight downloads (`download`), Hub reads (`hf-hub:` names) and `convnext push`, against
servers on 127.0.0.1 that accept and never answer ("silent"), reset the connection mid-body ("drop"), answer HTTP 500,
or send less than their Content-Length and close ("short"). With $CONVNEXT_TIMEOUT at 1 s each gives up within a few
seconds with one line naming the endpoint, leaves no partial file, and keeps a file cached before. A download is
tried again (safe: only a whole, verified file is kept), a push is not."""

import hashlib
import logging
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from convnext.cli import main
from convnext.registry import create_model
from convnext.weights import download, save_weights
from convnext.weights.hf import RETRIES, TIMEOUT_ENV, hub_file

constants = pytest.importorskip("huggingface_hub.constants")

ROOT = Path(__file__).resolve().parents[2]
MODES = ("silent", "drop", "500", "short")
BOUND = 20.0  # seconds: a test fails (instead of hanging) when a call has not ended by then; each takes a few
TOKEN = "hf_fake_write_token"
REPO, COMMIT = "me/x", "a" * 40
CONFIG_PATH = f"/{REPO}/resolve/main/config.json"
CONFIG = b'{"architecture": "convnext_atto", "num_classes": 3}' + b" " * 4096  # long enough to be cut mid-body


# ----------------------------------------------------------------------------------------------- servers


class Silent:
    """Accepts connections and never answers (whatever it would serve, `files`)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self.files: dict[str, bytes] = {}
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:  # closed
                return

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() above
        self.sock.close()
        for conn in self.conns:
            conn.close()


class Flaky(ThreadingHTTPServer):
    """Serves `files` {path: bytes} with the headers the Hub sends (HEAD and GET), as `mode` says: "ok"; "500" for
    every request; "drop" / "short": a GET or POST answer sends half of its body and resets the connection / closes
    it (its Content-Length says the whole), a HEAD is answered in full; "silent commit": the repo is created, any
    other POST (the commit) never answered. `fail_first` requests are answered 500 whatever the mode. POST
    /api/repos/create answers as the Hub does; `requests` lists "METHOD path"."""

    daemon_threads = True

    def __init__(self, mode: str) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.mode, self.fail_first = mode, 0
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.closing = threading.Event()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.closing.set()
        self.shutdown()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    server: Flaky

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        body = self.server.files.get(self.path)
        if body is None:
            return self.answer(404, b"not found")
        headers = {"ETag": f'"{hashlib.sha256(body).hexdigest()}"', "X-Repo-Commit": COMMIT}
        self.answer(200, body, headers)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/api/repos/create":
            if self.server.mode == "silent commit":
                self.server.requests.append(f"{self.command} {self.path}")
                return self.server.closing.wait()
            return self.answer(404, b"not found")
        self.answer(200, f'{{"url": "{self.server.url}/{REPO}"}}'.encode(), {"Content-Type": "application/json"})

    def answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.server.requests.append(f"{self.command} {self.path}")
        mode = "500" if len(self.server.requests) <= self.server.fail_first else self.server.mode
        if mode == "500":
            status, body, headers = 500, b"Internal Server Error", {}
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if mode not in ("drop", "short"):
            return self.wfile.write(body)
        self.wfile.write(body[: len(body) // 2])
        if mode == "drop":  # a reset, not an orderly close
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()


@pytest.fixture
def serve():
    """serve(mode) -> a Silent or Flaky server, closed after the test."""
    servers: list[Silent | Flaky] = []

    def start(mode: str) -> Silent | Flaky:
        servers.append(Silent() if mode == "silent" else Flaky(mode))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "1")


def ends(call: Callable[[], object]) -> tuple[object, float]:
    """(what `call()` returned or raised, the seconds it took), run in a thread; fails the test when the call has
    not ended within BOUND seconds (it hangs) instead of hanging the test."""
    out: dict[str, object] = {}

    def run() -> None:
        start = time.monotonic()
        try:
            out["result"] = call()
        except Exception as e:
            out["result"] = e
        out["took"] = time.monotonic() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(BOUND)
    assert not thread.is_alive(), f"still waiting after {BOUND} s"
    return out["result"], out["took"]


def one_line(capsys, command: str) -> str:
    """The error line `convnext COMMAND` ended with (warnings of the tries before it may come first), no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith(f"convnext {command}: error: "), err
    return last


# ----------------------------------------------------------------------------------------------- weight downloads


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_download_ends_tried_again_keeping_the_cached_file(serve, tmp_path, mode):
    server = serve(mode)
    body = os.urandom(4096)
    server.files["/w.pth"] = body
    url, dst = server.url + "/w.pth", tmp_path / "cache" / "w.pth"
    dst.parent.mkdir()
    dst.write_bytes(b"a good file cached before")
    err, took = ends(lambda: download(url, dst, hashlib.sha256(body).hexdigest()))
    assert isinstance(err, ConnectionError), err
    msg = str(err)
    assert msg.startswith(f"{url}: download failed after {1 + RETRIES} tries (") and "nothing was cached" in msg, msg
    assert "\n" not in msg and ("no answer within 1 s" in msg) == (mode == "silent"), msg
    assert len(server.conns if isinstance(server, Silent) else server.requests) == 1 + RETRIES
    assert took < (1 + RETRIES) + (2**RETRIES - 1) + 3  # tries of at most 1 s, the waits between them, slack
    assert dst.read_bytes() == b"a good file cached before" and os.listdir(dst.parent) == ["w.pth"]  # no .partial


def test_a_download_goes_through_after_a_500_and_a_404_is_not_tried_again(serve, tmp_path):
    server = serve("ok")
    body = os.urandom(4096)
    server.files["/w.pth"] = body
    server.fail_first = 1
    dst = tmp_path / "w.pth"
    assert download(server.url + "/w.pth", dst, hashlib.sha256(body).hexdigest()) == hashlib.sha256(body).hexdigest()
    assert dst.read_bytes() == body and server.requests == ["GET /w.pth"] * 2
    server.requests.clear()
    server.fail_first = 0
    with pytest.raises(ConnectionError, match=r"/nope: download failed \(HTTP 404 Not Found\)"):
        download(server.url + "/nope", tmp_path / "nope.pth")
    assert server.requests == ["GET /nope"] and sorted(os.listdir(tmp_path)) == ["w.pth"]


def test_a_downloaded_file_gets_the_mode_of_the_umask(serve, tmp_path):
    server = serve("ok")
    server.files["/w.pth"] = b"weights"
    old = os.umask(0o027)
    try:
        download(server.url + "/w.pth", tmp_path / "w.pth")
    finally:
        os.umask(old)
    assert (tmp_path / "w.pth").stat().st_mode & 0o777 == 0o640  # not mkstemp's 0600


def test_a_bad_timeout_setting_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=f"{TIMEOUT_ENV}='soon': give the seconds a network call may wait"):
        download("http://127.0.0.1:9/w.pth", tmp_path / "w.pth")
    assert os.listdir(tmp_path) == []
    assert main(["predict", "hf-hub:me/x", str(tmp_path / "a.png")]) == 2
    assert TIMEOUT_ENV in one_line(capsys, "predict")


# ----------------------------------------------------------------------------------------------- Hub reads


@pytest.fixture
def hub_at(tmp_path, monkeypatch):
    """hub_at(server): huggingface_hub's endpoint set to the server (what HF_ENDPOINT sets at import), a fresh HF
    cache, offline mode off, no token; huggingface_hub's log handler writes to this test's stderr (not to the closed
    one of the test that first made it)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)

    def point(server: Silent | Flaky) -> None:
        for handler in logging.getLogger("huggingface_hub").handlers:
            if isinstance(handler, logging.StreamHandler):
                monkeypatch.setattr(handler, "stream", sys.stderr)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)

    return point


def cached_files(tmp_path: Path) -> list[str]:
    """The HF cache's files, blobs and temporary ones (.incomplete) included."""
    root = tmp_path / "hf-cache"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_hub_read_ends_in_one_line_and_a_cached_file_is_kept(serve, hub_at, tmp_path, capsys, mode):
    server = serve(mode)
    server.files[CONFIG_PATH] = CONFIG
    hub_at(server)
    image = tmp_path / "a.png"
    code, took = ends(lambda: main(["predict", f"hf-hub:{REPO}", str(image)]))
    assert code == 2 and took < BOUND
    err = one_line(capsys, "predict")
    assert f"hf-hub:{REPO}: " in err and server.url in err and "config.json" in err, err
    if mode == "silent":
        assert "no answer within 1 s; CONVNEXT_TIMEOUT sets how long to wait" in err
    if mode == "500":  # "is there such a file" (a HEAD) is asked 1 + RETRIES times
        assert [r for r in server.requests if r.startswith("HEAD")] == [f"HEAD {CONFIG_PATH}"] * (1 + RETRIES)
        assert "answered HTTP 500" in err
    assert not [f for f in cached_files(tmp_path) if "/blobs/" in f or f.endswith(".incomplete")]

    if mode in ("drop", "short"):  # the HEAD answered, the body cut: huggingface_hub resumed it, then gave up
        assert f"GET {CONFIG_PATH}" in server.requests and "downloading config.json" in err, err

    good = serve("ok")  # the file cached once from a working Hub ...
    good.files[CONFIG_PATH] = CONFIG
    hub_at(good)
    cached = hub_file(f"hf-hub:{REPO}", "config.json")
    hub_at(server)  # ... is what the failing one gives, whole
    again, _ = ends(lambda: hub_file(f"hf-hub:{REPO}", "config.json"))
    assert again == cached and cached.read_bytes() == CONFIG


# ----------------------------------------------------------------------------------------------- push


@pytest.fixture
def weights(tmp_path) -> Path:
    model = create_model("convnext_atto", num_classes=3, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
    save_weights(model.state_dict(), tmp_path / "w.safetensors")
    return tmp_path / "w.safetensors"


@pytest.mark.parametrize("mode", [*MODES, "silent commit"])
def test_a_failing_push_ends_in_one_line_and_leaves_no_folder(serve, hub_at, weights, tmp_path, monkeypatch, capsys,
                                                              mode):  # fmt: skip
    server = serve(mode)
    hub_at(server)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # where the folder to push is written
    code, took = ends(lambda: main(["push", str(weights), "--repo", REPO, "--token", TOKEN]))
    assert code == 2 and took < BOUND
    err = one_line(capsys, "push")
    assert err.startswith(f"convnext push: error: push to {REPO}: {server.url} "), err
    if mode == "silent commit":
        assert "while committing (no answer within 1 s" in err and "may or may not have landed" in err, err
    else:
        assert "while creating the repo" in err and "nothing was committed" in err, err
        assert mode == "silent" or server.requests == ["POST /api/repos/create"]  # a push is not repeated
    assert not list(tmp.glob("convnext-push-*"))  # the folder written for the push is gone


@pytest.mark.slow  # a fresh process imports torch
def test_push_to_a_silent_hub_named_by_hf_endpoint_ends(serve, weights, tmp_path):
    """The probe as a user meets it: HF_ENDPOINT read by a fresh process, a Hub that accepts and never answers."""
    server = serve("silent")
    env = {**os.environ, "HF_ENDPOINT": server.url, TIMEOUT_ENV: "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    cmd = [sys.executable, "-m", "convnext", "push", str(weights), "--repo", REPO, "--token", TOKEN]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr
    assert err[0].startswith(f"convnext push: error: push to {REPO}: {server.url} failed while creating the repo "
                             "(no answer within 1 s; CONVNEXT_TIMEOUT sets how long to wait)"), err  # fmt: skip
