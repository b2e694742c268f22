"""How each 1x1 product of a training step runs on this machine, measured: `plan_pointwise` makes a `Plan`.

oneDNN's convolution or a matmul, the grad-weight either way round, pwconv2's fused add / multiply, and in float32
the whole MLP tiled in a C kernel: which wins depends on the CPU and the shape (benchmarks/NOTES.md), so each is
timed at the run's batch and input size. `convnext.fast.ops` reads the plan; `plan_to_rows` / `plan_from_rows`
keep it as plain data in a checkpoint, so a resumed run takes the paths it was saved with (a product run the other
way round differs in the last bits). `cached_plan` times a plan once per machine and shape and keeps it in
`$CONVNEXT_CACHE/plans.json` (default `~/.cache/convnext`): near-ties flip from one timing to the next, and every
later run of the same command then makes the same products, so the same seed gives the same bits.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from convnext.fast import kernels
from convnext.fast.ops import Plan, conv1x1, mlp_backward, mlp_forward, plan_ways, weight_and_bias_grad
from convnext.model import ConvNeXt

log = logging.getLogger(__name__)
TILED_MIN_BYTES = 8 * 2**20  # the tiled MLP is timed where the 4C-wide hidden tensor is larger than this (cache)
PLANS_FILE = "plans.json"


def plan_to_rows(plan: Plan) -> list[list]:
    """The plan as plain data (for a checkpoint): [product, rows, K, N, dtype name, choice] per entry."""
    return [[*key[:4], str(key[4]).removeprefix("torch."), choice] for key, choice in plan.items()]


def plan_from_rows(rows: list[list]) -> Plan:
    """`plan_to_rows` undone."""
    return {(product, r, k, n, getattr(torch, dtype)): bool(choice) for product, r, k, n, dtype, choice in rows}


def plan_cache_path() -> Path:
    """Where timed plans are kept: plans.json beside the C kernels' folder ($CONVNEXT_CACHE or ~/.cache/convnext)."""
    return kernels.cache_dir().parent / PLANS_FILE


def plan_key(model: ConvNeXt, shape: tuple[int, ...], dtype: torch.dtype) -> str:
    """What a timed plan depends on, as a string: the CPU, torch, the thread count, the stages' widths and strides,
    the input shape and dtype, and which products are timed at all (the tiled MLP's kernel and its bound)."""
    key = {
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": {"depths": list(model.cfg.depths), "dims": list(model.cfg.dims), "patch_size": model.cfg.patch_size},
        "input": list(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "tiled_mlp": [kernels.tiled_mlp_available(), TILED_MIN_BYTES],
    }
    return json.dumps(key, sort_keys=True)


def cached_plan(model: ConvNeXt, example_input: torch.Tensor, dtype: torch.dtype) -> tuple[Plan, str]:
    """(`plan_pointwise`'s plan, where it came from): the one kept for this machine and shape in `plan_cache_path()`,
    or timed now and kept there for every later run. Where two processes time the same key at once, the first one
    written wins and both run it. A file that cannot be read as plans is set aside with one warning and rewritten."""
    path, key = plan_cache_path(), plan_key(model, tuple(example_input.shape), dtype)
    rows = _read_plans(path).get(key)
    if rows is not None:
        return plan_from_rows(rows), f"kept in {path}"
    plan = plan_pointwise(model, example_input, dtype)
    try:
        with _locked(path):
            plans = _read_plans(path, warn=False)  # as it is now: another process may have written the key meanwhile
            if key in plans:
                return plan_from_rows(plans[key]), f"kept in {path}"
            plans[key] = plan_to_rows(plan)
            _write_atomic(path, json.dumps({"plans": plans}, indent=1) + "\n")
    except OSError as e:  # a read-only home: the run goes on with the plan it timed, as before the cache
        log.warning("could not keep the timed 1x1 plan in %s (%s): the next run times its own", path, e)
        return plan, "timed now (not kept)"
    return plan, f"timed now, kept in {path}"


def _read_plans(path: Path, warn: bool = True) -> dict[str, list]:
    """{key: rows} from the cache file; {} where it is missing, and where it is not such a file (with a warning)."""
    try:
        plans = json.loads(path.read_text())["plans"]
        if not isinstance(plans, dict) or not all(isinstance(rows, list) for rows in plans.values()):
            raise ValueError("plans is not a {key: rows} object")
        for rows in plans.values():
            plan_from_rows(rows)  # every row must read back as a plan
        return plans
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        if warn:
            log.warning("ignoring the plan cache %s, which cannot be read (%s: %s); it will be rewritten",
                        path, type(e).__name__, e)  # fmt: skip
        return {}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`.lock for the block (processes that share the cache write one at a time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _write_atomic(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file in the same folder and a rename: readers see old or new, whole."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, or what `platform` knows where there is none."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def plan_pointwise(model: ConvNeXt, example_input: torch.Tensor, dtype: torch.dtype, runs: int = 3) -> Plan:
    """Time oneDNN's convolution against a matmul for every 1x1 product a training step of `model` makes at this
    input's batch and size, in `dtype` (with pwconv2's fused add / multiply, and the grad-weight both ways round),
    and note the faster of each (the `Ways` of each conv). Which wins depends on the CPU and the shape
    (oneDNN by up to 2x on an AMD core where MKL's fp32 path is narrow; the matmul by up to 1.6x on the late
    stages of an Intel core: benchmarks/NOTES.md), so it is measured, not assumed."""
    plan: Plan = {}
    b, _, height, width = example_input.shape
    gen = torch.Generator().manual_seed(0)  # the caller's RNG stream is left alone
    for i, c in enumerate(model.cfg.dims):
        stride = model.cfg.patch_size * 2 ** (i if len(model.cfg.dims) > 1 else 0)
        h, w = height // stride, width // stride
        if h * w == 0:
            continue
        for k, n in ((c, 4 * c), (4 * c, c)):
            x = torch.randn(b, k, h, w, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
            g = torch.randn(b, n, h, w, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
            weight, bias = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype), torch.zeros(n, dtype=dtype)
            if k > n:  # 4C -> C: in training mostly pwconv1's grad-input, on a transposed view of its weight
                weight = weight.t().contiguous().t()
            conv = functools.partial(conv1x1, x, weight, bias)
            plan[("conv", b * h * w, k, n, dtype)] = _true_is_faster(lambda m, f=conv: f(matmul=m), runs)
            grad = functools.partial(weight_and_bias_grad, g, x, weight)
            t = _true_is_faster(lambda t, f=grad: f(True, t), runs)
            plan[("grad_weight_t", b * h * w, k, n, dtype)] = t
            plan[("grad_weight", b * h * w, k, n, dtype)] = _true_is_faster(lambda m, f=grad, t=t: f(m, t), runs)
            # pwconv2's forward (4C -> C, + shortcut) and its grad-input (C -> 4C on the transposed weight, x GELU')
            post, other = ("add", g) if k > n else ("mul", g)
            weight = weight.contiguous() if k > n else weight.t().contiguous().t()
            fused = functools.partial(conv1x1, x, weight, bias, post, other)
            plan[(f"conv_{post}", b * h * w, k, n, dtype)] = _true_is_faster(lambda m, f=fused: f(matmul=m), runs)
        hidden_bytes = b * h * w * 4 * c * 4
        if dtype == torch.float32 and hidden_bytes >= TILED_MIN_BYTES and kernels.tiled_mlp_available():
            # the whole MLP, tiled, against the above
            plan[("mlp_tiled", b * h * w, c, 4 * c, dtype)] = _true_is_faster(_mlp_step(plan, b, c, h, w, gen), runs)
    return plan


def _mlp_step(plan: Plan, b: int, c: int, h: int, w: int, gen: torch.Generator) -> Callable[[bool], object]:
    """run(tiled): a float32 forward + backward of `InvertedMlp` at one stage's shape, with the plan's ways."""
    y, shortcut, grad = (
        torch.randn(b, c, h, w, generator=gen).contiguous(memory_format=torch.channels_last) for _ in range(3)
    )
    w1, b1 = torch.randn(4 * c, c, generator=gen) / c**0.5, torch.zeros(4 * c)
    w2, b2 = torch.randn(c, 4 * c, generator=gen) / (4 * c) ** 0.5, torch.zeros(c)
    ways = plan_ways(plan, y, c, 4 * c), plan_ways(plan, y, 4 * c, c)

    def run(tiled: bool) -> object:
        _, saved = mlp_forward(y, w1, b1, w2, b2, shortcut, *ways, tiled)
        return mlp_backward(grad, *saved, *ways, tiled)

    return run


def _true_is_faster(run: Callable[[bool], object], runs: int) -> bool:
    """Whether run(True) (a matmul, say) takes less time than run(False) (oneDNN), median of `runs` each, timed
    in turns: the first large products of a process run slow for a while (oneDNN 28.9 vs 16.6 ms at T's stage 1),
    and timing one way after the other had picked the wrong one there."""
    with torch.no_grad():
        first, second = median_seconds([lambda: run(True), lambda: run(False)], runs)
    return first < second


def median_seconds(calls: list[Callable[[], object]], runs: int) -> list[float]:
    """Median wall time of `runs` calls of each of `calls`, after one untimed call of each (warm-up), taken in turns
    (drift in the machine's speed then falls on all alike)."""
    for call in calls:
        call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(runs):
        for call, took in zip(calls, times):
            t0 = time.perf_counter()
            call()
            took.append(time.perf_counter() - t0)
    return [sorted(took)[runs // 2] for took in times]
