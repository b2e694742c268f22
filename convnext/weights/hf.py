"""The Hugging Face Hub, read side: `hf-hub:org/name[@revision]` names, files through the HF cache, and what a Hub
repo (or a local folder of the same files) holds. Writing such a folder and pushing it is `convnext.publish`.

A repo is read in one of three forms, told apart by its config.json:
  ours          a `"convnext"` entry {arch, config, preprocess, classes}: what `convnext push` writes (when
                transformers has the architecture the same folder is also a transformers one)
  transformers  `"model_type": "convnext" | "convnextv2"` (ConvNextForImageClassification / ConvNextV2...)
  timm          `"architecture": "convnext_..."` with its `pretrained_cfg`
The weights are `WEIGHT_FILES`: model.safetensors, else pytorch_model.bin (refused when it holds pickled code), in
any layout `convnext.weights` reads. Everything goes through huggingface_hub, so its cache (HF_HOME, HF_HUB_CACHE),
token (HF_TOKEN, `hf auth login`), endpoint (HF_ENDPOINT) and HF_HUB_OFFLINE apply, and its downloads are atomic (a
temporary file renamed into the cache when complete). huggingface_hub is imported only when a Hub name is used.

The network settings of the whole package live here too: every call (weight downloads, Hub reads, `convnext push`)
waits at most `network_timeout()` s ($CONVNEXT_TIMEOUT, default 30) to connect and between two reads, calls that are
safe to repeat (downloads, Hub reads) are tried 1 + RETRIES times, and giving up is one line naming the endpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import urllib.error
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from convnext.constants import IMAGENET_MEAN, IMAGENET_STD
from convnext.model import VARIANTS, ConvNeXtConfig

log = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # tried in this order
OURS_KEY = "convnext"  # our entry in config.json
DEFAULT_PREPROCESS = MappingProxyType({"img_size": 224, "crop_pct": 0.875, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                                       "interpolation": "bicubic", "crop_mode": "center"})  # fmt: skip
RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL's codes, as ConvNextImageProcessor stores them

TIMEOUT_ENV = "CONVNEXT_TIMEOUT"
DEFAULT_TIMEOUT = 30.0  # seconds a network call waits to connect, and between two reads of the answer
RETRIES = 2  # a call that is safe to repeat (a download, a Hub read) is tried 1 + RETRIES times
RETRY_WAIT = 1.0  # seconds before the first repeat, doubled before each next one
RETRY_STATUS = (408, 429, 500, 502, 503, 504)  # answers worth asking again
T = TypeVar("T")


def huggingface_hub() -> Any:
    """The huggingface_hub module, its HTTP client bounded by `network_timeout()` (see `bounded_client`); or one
    line naming the extra that installs it."""
    from convnext.extras import MissingExtraError, require

    what = "hf-hub: names and `convnext push`"
    require("huggingface_hub", what=what)
    import huggingface_hub

    if not hasattr(huggingface_hub, "set_client_factory"):  # before 1.0 (requests): no way to bound every call
        raise MissingExtraError(f"{what} need huggingface_hub 1.0 or newer, not {huggingface_hub.__version__}: "
                                "pip install -U 'convnext[hub]'")  # fmt: skip
    network_timeout()  # a bad $CONVNEXT_TIMEOUT is refused here, not inside a request
    if bound_timeout not in huggingface_hub.get_session().event_hooks["request"]:
        huggingface_hub.set_client_factory(bounded_client)
    return huggingface_hub


# ----------------------------------------------------------------------------------------------- the network


def network_timeout() -> float:
    """$CONVNEXT_TIMEOUT, else DEFAULT_TIMEOUT: the seconds every network call of this package waits to connect and
    between two reads. ValueError (one line) for anything but a number > 0."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: give the seconds a network call may wait, a number > 0")
    return seconds


def bound_timeout(request: Any) -> None:
    """A request hook of huggingface_hub's client: whatever timeout the library gave the request (none for some
    calls, a minute for its own retries), it waits at most `network_timeout()` s to connect, send and read."""
    request.extensions["timeout"] = dict.fromkeys(("connect", "read", "write", "pool"), network_timeout())


def bounded_client() -> Any:
    """huggingface_hub's own HTTP client with `bound_timeout` among its request hooks: the client factory
    `huggingface_hub()` installs (it replaces one set before with `huggingface_hub.set_client_factory`)."""
    from huggingface_hub.utils._http import default_client_factory

    client = default_client_factory()
    client.event_hooks["request"].append(bound_timeout)
    return client


def retry(call: Callable[[], T], transient: Callable[[Exception], bool], what: str) -> T:
    """`call()`, repeated RETRY_WAIT, 2 RETRY_WAIT, ... s later while it raises a `transient` error, 1 + RETRIES
    tries in all; then its last error. Only for calls that are safe to repeat."""
    attempt = 0
    while True:
        try:
            return call()
        except Exception as e:
            if attempt == RETRIES or not transient(e):
                raise
            wait = RETRY_WAIT * 2**attempt
            log.warning("%s: %s; trying again in %g s", what, failure(e), wait)
            time.sleep(wait)
            attempt += 1


def failure(e: BaseException) -> str:
    """A network error in a few words; a timeout says how long was waited and which setting changes it."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException):
        e = e.reason
    if isinstance(e, TimeoutError) or "Timeout" in type(e).__name__:
        return f"no answer within {network_timeout():g} s; {TIMEOUT_ENV} sets how long to wait"
    return f"{type(e).__name__}: {first_line(e)}"


def http_status(e: Exception) -> int | None:
    """The HTTP status of a huggingface_hub error that carries an answer; None for any other error."""
    response = getattr(e, "response", None) if type(e).__module__.startswith("huggingface_hub") else None
    return getattr(response, "status_code", None)


def transient_hub_error(e: Exception) -> bool:
    """Worth asking the Hub again: no answer, a dropped connection, a short body, or HTTP 408, 429, 5xx (not
    huggingface_hub's own verdicts, an offline cache miss among them)."""
    status = http_status(e)
    if status is not None:
        return status in RETRY_STATUS
    return is_transport_error(e) and not type(e).__module__.startswith("huggingface_hub")


# ----------------------------------------------------------------------------------------------- names


def is_hub_name(name: object) -> bool:
    return isinstance(name, str) and name.startswith(HUB_PREFIX)


def parse_hub_name(name: str) -> tuple[str, str | None]:
    """'hf-hub:org/name@rev' -> ('org/name', 'rev'); without '@rev' the revision is None (the main branch)."""
    repo, _, revision = name.removeprefix(HUB_PREFIX).partition("@")
    if not is_hub_name(name) or not re.fullmatch(r"([\w.-]+/)?[\w.-]+", repo) or "@" in revision:
        raise ValueError(f"{name!r}: a Hub name reads hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    return repo, revision or None


# ----------------------------------------------------------------------------------------------- downloads


class MissingFileError(FileNotFoundError):
    """The repo has no such file (`remote`), or, offline, the cache has none."""

    def __init__(self, message: str, remote: bool):
        super().__init__(message)
        self.remote = remote


def hub_file(name: str, filename: str) -> Path:
    """`filename` of the repo `name` names, from the HF cache or downloaded into it. Raises one-line errors:
    FileNotFoundError (no such repo, revision or file; offline cache miss), PermissionError (gated, refused token),
    ConnectionError (Hub unreachable and nothing cached)."""
    hf = huggingface_hub()
    repo, revision = parse_hub_name(name)
    try:
        cached = None if hf.constants.HF_HUB_OFFLINE else _ask(hf, name, repo, filename, revision)
        return cached or Path(hf.hf_hub_download(repo, filename, revision=revision, etag_timeout=network_timeout()))
    except Exception as e:
        explained = _explain(e, name, filename)
        if explained is None:
            raise
        raise explained from e


def _ask(hf: Any, name: str, repo: str, filename: str, revision: str | None) -> Path | None:
    """Ask the Hub about `filename` (a HEAD) with this package's timeout and retries before hf_hub_download, whose
    own retries of that question wait a minute each: None once the Hub answers anything (hf_hub_download then
    fetches the file, resuming a dropped body itself, or raises what the answer means); while it does not, the HF
    cache's copy if there is one (as hf_hub_download would take); else the last error, after 1 + RETRIES tries."""
    url = hf.hf_hub_url(repo, filename, revision=revision)

    def head() -> Path | None:
        try:
            hf.get_hf_file_metadata(url, timeout=network_timeout())
        except Exception as e:
            if not transient_hub_error(e):
                return None
            cached = hf.try_to_load_from_cache(repo, filename, revision=revision)
            if not isinstance(cached, str):
                raise
            log.warning("%s: %s (%s); using the cached %s", name, hf.constants.ENDPOINT, failure(e), filename)
            return Path(cached)
        return None

    return retry(head, transient_hub_error, f"{name}: {filename} from {hf.constants.ENDPOINT}")


def hub_weights(name: str) -> Path:
    """The repo's weight file in the HF cache: model.safetensors, else pytorch_model.bin (what `--checkpoint
    hf-hub:...` reads, through `io.read_file`)."""
    misses = []
    for filename in WEIGHT_FILES:
        try:
            return hub_file(name, filename)
        except MissingFileError as e:
            misses.append(e)
    if all(m.remote for m in misses):
        raise FileNotFoundError(f"{name}: the repository holds no weights ({' or '.join(WEIGHT_FILES)})")
    raise next(m for m in misses if not m.remote)


def _explain(e: Exception, name: str, filename: str) -> Exception | None:
    """One line for what huggingface_hub raised (None: not a Hub error, re-raise it as it is)."""
    hf = huggingface_hub()
    errors, constants = hf.utils, hf.constants
    repo, revision = parse_hub_name(name)
    endpoint = constants.ENDPOINT
    if isinstance(e, errors.GatedRepoError):
        return PermissionError(f"{name}: {repo} is gated: accept its conditions at {endpoint}/{repo}, then set "
                               "HF_TOKEN (or run `hf auth login`)")  # fmt: skip
    if isinstance(e, errors.RepositoryNotFoundError):  # the Hub answers so for private repos too, without a token
        if hf.get_token() is None:
            return FileNotFoundError(f"{name}: no repository {repo} on {endpoint}, or it is private and no token "
                                     "was given (set HF_TOKEN or run `hf auth login`)")  # fmt: skip
        return FileNotFoundError(f"{name}: no repository {repo} on {endpoint}, or the token cannot read it")
    if isinstance(e, errors.RevisionNotFoundError):
        return FileNotFoundError(f"{name}: {repo} has no revision {revision!r}")
    if isinstance(e, errors.LocalEntryNotFoundError):  # before EntryNotFoundError: it is one
        if constants.HF_HUB_OFFLINE:
            return MissingFileError(f"{name}: {filename} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                                    "and HF_HUB_OFFLINE is set: fetch it once online, or unset HF_HUB_OFFLINE",
                                    remote=False)  # fmt: skip
        return ConnectionError(f"{name}: cannot reach {endpoint} and {filename} is not in the Hugging Face cache "
                               f"({constants.HF_HUB_CACHE}); check the connection (and HF_ENDPOINT)")  # fmt: skip
    if isinstance(e, errors.EntryNotFoundError):
        return MissingFileError(f"{name}: {repo} has no file {filename}", remote=True)
    if isinstance(e, errors.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", "?")
        if status in (401, 403):
            return PermissionError(f"{name}: {endpoint} refused access to {repo} (HTTP {status}); check the token")
        return ConnectionError(f"{name}: {endpoint} answered HTTP {status} for {filename}; nothing was cached")
    if isinstance(e, errors.HFValidationError):
        return ValueError(f"{name}: not a valid Hub repository name ({first_line(e)})")
    if is_transport_error(e):  # no answer, a dropped connection, a short or corrupt body: nothing of it is kept
        return ConnectionError(f"{name}: downloading {filename} from {endpoint} failed ({failure(e)}); nothing was "
                               "cached")  # fmt: skip
    return None


def is_transport_error(e: Exception) -> bool:
    """An OSError or an error of the HTTP client huggingface_hub uses (httpx; httpx2 from huggingface_hub 2)."""
    return isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2")


def first_line(e: Exception) -> str:
    """The first line of an exception's message, its spaces collapsed."""
    return " ".join((str(e).strip().splitlines() or [""])[0].split())


# ----------------------------------------------------------------------------------------------- reading a repo


@dataclass(frozen=True)
class HubModel:
    """What a Hub repo holds, its files resolved into the HF cache."""

    name: str  # hf-hub:org/name[@revision]
    form: str  # "convnext" (ours), "transformers" or "timm"
    config: ConvNeXtConfig
    weights: Path | None  # the weight file (None when not asked for)
    preprocess: dict[str, Any]  # img_size, crop_pct, mean, std, interpolation, crop_mode (as resolve.Preprocess)
    classes: list[str] | None  # label of each output; None = unknown
    arch: str | None = None  # the registered architecture, when the repo names one


def resolve_hub(name: str, weights: bool = True) -> HubModel:
    """Read the repo `name` names: its config.json (which form, which architecture, preprocessing, class names)
    and, with `weights`, its weight file."""
    raw = _read_json(hub_file(name, "config.json"), name)
    processor = {}
    if raw.get("model_type") in ("convnext", "convnextv2") and not isinstance(raw.get(OURS_KEY), Mapping):
        try:
            processor = _read_json(hub_file(name, "preprocessor_config.json"), name)
        except MissingFileError:
            pass  # transformers' defaults
    form, config, preprocess, classes, arch = describe(raw, processor, name)
    return HubModel(name, form, config, hub_weights(name) if weights else None, preprocess, classes, arch)


def read_folder(folder: str | Path) -> HubModel:
    """`resolve_hub` for a local folder: what `convnext convert --to hf` writes, a `save_pretrained` folder, a
    downloaded timm or Hub repo."""
    folder = Path(folder)
    raw = _read_json(folder / "config.json", str(folder))
    pp = folder / "preprocessor_config.json"
    processor = _read_json(pp, str(folder)) if pp.is_file() else {}
    weights = folder_weights(folder)
    form, config, preprocess, classes, arch = describe(raw, processor, str(folder))
    return HubModel(str(folder), form, config, weights, preprocess, classes, arch)


def folder_weights(folder: str | Path) -> Path:
    """The weight file of a `save_pretrained`-style folder: the first of `WEIGHT_FILES` it holds."""
    folder = Path(folder)
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder}: a folder without any of {WEIGHT_FILES}")
    return weights


def describe(raw: Mapping[str, Any], processor: Mapping[str, Any], name: str):
    """(form, ConvNeXtConfig, preprocess, classes, arch) of a repo's config.json (and preprocessor_config.json)."""
    if isinstance(raw.get(OURS_KEY), Mapping):
        return "convnext", *_from_ours(raw[OURS_KEY], name)
    if raw.get("model_type") in ("convnext", "convnextv2"):
        return "transformers", *_from_transformers(raw, processor, name)
    if isinstance(raw.get("architecture"), str):
        return "timm", *_from_timm(raw, name)
    raise ValueError(f"{name}: config.json describes no ConvNeXt this package reads (no '{OURS_KEY}' entry, no "
                     "model_type convnext/convnextv2, no timm 'architecture')")  # fmt: skip


def _read_json(path: Path, name: str) -> dict[str, Any]:
    try:
        out = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{name}: cannot read {Path(path).name} ({type(e).__name__}: {e})") from e
    if not isinstance(out, dict):
        raise ValueError(f"{name}: {Path(path).name} holds no JSON object")
    return out


def _preprocess(**given: Any) -> dict[str, Any]:
    out = {**DEFAULT_PREPROCESS, **{k: v for k, v in given.items() if v is not None}}
    return {**out, "mean": tuple(out["mean"]), "std": tuple(out["std"])}


def _from_ours(entry: Mapping[str, Any], name: str) -> tuple:
    given = dict(entry.get("config") or {})
    allowed = {f.name for f in fields(ConvNeXtConfig)}
    if not given or set(given) - allowed:
        raise ValueError(f"{name}: config.json's '{OURS_KEY}' entry has no model config, or unknown fields "
                         f"{sorted(set(given) - allowed)}")  # fmt: skip
    config = ConvNeXtConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    return config, _preprocess(**(entry.get("preprocess") or {})), entry.get("classes") or None, entry.get("arch")


def _from_transformers(raw: Mapping[str, Any], processor: Mapping[str, Any], name: str) -> tuple:
    v2 = raw["model_type"] == "convnextv2"
    if raw.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{name}: hidden_act {raw['hidden_act']!r}; this package's ConvNeXt uses gelu")
    patch = raw.get("patch_size", 4)
    labels = raw.get("id2label") or {}
    num_classes = len(labels) if labels else int(raw.get("num_labels", 2))  # transformers' default is 2
    config = ConvNeXtConfig(
        depths=tuple(raw.get("depths", (3, 3, 9, 3))),
        dims=tuple(raw.get("hidden_sizes", (96, 192, 384, 768))),
        grn=v2,
        layer_scale_init=0.0 if v2 else float(raw.get("layer_scale_init_value", 1e-6)),
        patch_size=int(patch[0] if isinstance(patch, list) else patch),
        in_chans=int(raw.get("num_channels", 3)),
        num_classes=num_classes,
        drop_path_rate=float(raw.get("drop_path_rate", 0.0)),
    )
    classes = [str(labels[k]) for k in sorted(labels, key=int)] if labels else None
    if classes and all(c == f"LABEL_{i}" for i, c in enumerate(classes)):
        classes = None  # transformers' placeholders
    size = processor.get("size") or {}
    img_size = size.get("shortest_edge") or size.get("height") or raw.get("image_size")
    warp = img_size is not None and img_size >= 384  # ConvNextImageProcessor resizes to a square there, no crop
    interpolation = {v: k for k, v in RESAMPLE.items()}.get(processor.get("resample"))
    preprocess = _preprocess(img_size=img_size, crop_pct=1.0 if warp else processor.get("crop_pct"),
                             mean=processor.get("image_mean"), std=processor.get("image_std"),
                             interpolation=interpolation, crop_mode="squash" if warp else None)  # fmt: skip
    return config, preprocess, classes, None


def _from_timm(raw: Mapping[str, Any], name: str) -> tuple:
    arch = raw["architecture"]
    if arch not in VARIANTS:
        raise ValueError(f"{name}: timm architecture {arch!r} is not one of this package's ConvNeXt variants "
                         "(`convnext list` shows them)")  # fmt: skip
    pcfg = raw.get("pretrained_cfg") or {}
    num_classes = raw.get("num_classes", pcfg.get("num_classes", 1000))
    config = VARIANTS[arch].with_(num_classes=int(num_classes), in_chans=int(raw.get("in_chans", 3)))
    size = pcfg.get("input_size")
    preprocess = _preprocess(img_size=size[-1] if size else None, crop_pct=pcfg.get("crop_pct"),
                             mean=pcfg.get("mean"), std=pcfg.get("std"), interpolation=pcfg.get("interpolation"),
                             crop_mode="squash" if pcfg.get("crop_mode") == "squash" else None)  # fmt: skip
    return config, preprocess, raw.get("label_names") or None, arch


def arch_of(cfg: ConvNeXtConfig) -> str | None:
    """The registered variant with `cfg`'s depths, widths, version, stem, norm and head, if any."""

    def key(c: ConvNeXtConfig) -> tuple:
        return c.depths, c.dims, c.grn, c.stem_type, c.norm_layer, c.head_norm_first, c.head_hidden_size

    return next((n for n, v in VARIANTS.items() if key(v) == key(cfg)), None)
