"""Download published weights into a local cache, checking their sha256, and load them.

The cache is `$CONVNEXT_HOME/weights` (default `~/.cache/convnext/weights`). A download goes to a unique
`.partial` file beside its destination and is renamed into place only when complete and verified, so an
interrupted or corrupt download never leaves a file that looks cached. Each try waits at most `network_timeout()` s
($CONVNEXT_TIMEOUT) to connect and between two reads; a dropped or silent connection, a short body or an HTTP 5xx
is tried again (a download is safe to repeat: only a whole, verified file is kept).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from torch import nn
from tqdm import tqdm

from convnext.weights.hf import RETRIES, RETRY_STATUS, failure, network_timeout, retry
from convnext.weights.io import apply_umask, load_checkpoint
from convnext.weights.specs import WeightSpec

log = logging.getLogger(__name__)
CHUNK = 1 << 20
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError)


def default_cache_dir() -> Path:
    return Path(os.environ.get("CONVNEXT_HOME") or "~/.cache/convnext").expanduser() / "weights"


def download(url: str, dst: str | Path, sha256: str | None = None, progress: bool | None = None) -> str:
    """Fetch `url` into `dst` atomically; returns the file's sha256.

    sha256: the expected digest or a prefix of it; a mismatch discards the download and raises RuntimeError.
    progress: show a progress bar (None: only on a terminal).
    Giving up (after 1 + RETRIES tries for what may pass: no answer, a dropped connection, a short body, HTTP 408,
    429, 5xx) raises ConnectionError naming `url`; `dst` keeps what it held.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        got = retry(lambda: _download_once(url, dst, sha256, progress), transient, url)
    except NETWORK_ERRORS as e:
        tries = f" after {1 + RETRIES} tries" if transient(e) else ""
        raise ConnectionError(f"{url}: download failed{tries} ({failure(e)}); nothing was cached") from e
    except OSError as e:  # a full disk, no permission
        raise OSError(e.errno, f"{url} -> {dst}: {e.strerror or e}; nothing was cached") from e
    if sha256 is None:
        log.warning("%s: no published sha256; the downloaded file's sha256 is %s", url, got)
    return got


def transient(e: Exception) -> bool:
    """A download error that may pass: no answer, a dropped connection, a short body, HTTP 408, 429 or 5xx."""
    if isinstance(e, urllib.error.HTTPError):
        return e.code in RETRY_STATUS
    return isinstance(e, NETWORK_ERRORS)


def _download_once(url: str, dst: Path, sha256: str | None, progress: bool | None) -> str:
    """One try of `download`: into a `.partial` file beside `dst`, renamed to `dst` when whole and verified."""
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f"{dst.name}.", suffix=".partial")
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=network_timeout()) as resp:
            total = int(resp.headers["Content-Length"]) if resp.headers.get("Content-Length") else None
            bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=dst.name,
                disable=None if progress is None else not progress,
            )
            with bar:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
        # http.client returns short reads without complaint when the server hangs up early: check the length.
        if total is not None and size != total:
            raise ConnectionError(f"interrupted after {size} of {total} bytes")
        got = digest.hexdigest()
        if sha256 is not None and not got.startswith(sha256.lower()):
            raise RuntimeError(f"{url}: sha256 mismatch, expected {sha256}, got {got}; the download was discarded")
        apply_umask(tmp)  # mkstemp made it 0600
        os.replace(tmp, dst)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return got


def fetch(spec: WeightSpec, cache_dir: str | Path | None = None, progress: bool | None = None) -> Path:
    """The cached file of `spec`, downloading it first if it is not in the cache."""
    path = Path(cache_dir or default_cache_dir()) / spec.filename
    if path.is_file():
        return path
    log.info("downloading %s from %s", spec.name, spec.url)
    download(spec.url, path, spec.sha256, progress)
    return path


def load_pretrained(
    model: nn.Module, spec: WeightSpec, cache_dir: str | Path | None = None, progress: bool | None = None
) -> None:
    """Download (or take from the cache) the weights of `spec` and load them into `model`."""
    if spec.non_commercial:
        warnings.warn(f"{spec.name}: the weights are licensed {spec.license}: non-commercial use only", stacklevel=2)
    load_checkpoint(model, fetch(spec, cache_dir, progress))
