"""Download published weights into a local cache, checking their sha256, and load them.

The cache is `$CONVNEXT_HOME/weights` (default `~/.cache/convnext/weights`). A download goes to a unique
`.partial` file beside its destination and is renamed into place only when complete and verified, so an
interrupted or corrupt download never leaves a file that looks cached.
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

from convnext.weights.io import load_checkpoint
from convnext.weights.specs import WeightSpec

log = logging.getLogger(__name__)
CHUNK = 1 << 20


def default_cache_dir() -> Path:
    return Path(os.environ.get("CONVNEXT_HOME") or "~/.cache/convnext").expanduser() / "weights"


def download(url: str, dst: str | Path, sha256: str | None = None, progress: bool | None = None) -> str:
    """Fetch `url` into `dst` atomically; returns the file's sha256.

    sha256: the expected digest or a prefix of it; a mismatch discards the download and raises RuntimeError.
    progress: show a progress bar (None: only on a terminal).
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f"{dst.name}.", suffix=".partial")
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as resp:
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
            raise RuntimeError(f"{url}: download interrupted after {size} of {total} bytes; nothing was cached")
        got = digest.hexdigest()
        if sha256 is not None and not got.startswith(sha256.lower()):
            raise RuntimeError(f"{url}: sha256 mismatch, expected {sha256}, got {got}; the download was discarded")
        os.replace(tmp, dst)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise RuntimeError(f"{url}: download failed ({type(e).__name__}: {e}); nothing was cached") from e
    finally:
        Path(tmp).unlink(missing_ok=True)
    if sha256 is None:
        log.warning("%s: no published sha256; the downloaded file's sha256 is %s", url, got)
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
