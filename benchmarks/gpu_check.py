"""The GPU check (issue 38): one script, under 8 minutes on one GPU, that runs what the CPU tests cannot.

    python benchmarks/gpu_check.py            # writes benchmarks/results/gpu-<device>-<date>.md
    python benchmarks/gpu_check.py --dry-run  # lists the steps (works without a GPU)

(a) train, pretrain, detect and segment each train a few steps of a tiny model in a one-rank NCCL process group
    (CONVNEXT_PROCESS_GROUP=1 under torchrun), through the collective device guard of tests/engine/
    test_collectives.py: a CPU tensor handed to NCCL fails the step.
(b) ConvNeXt-T training img/s, bf16 autocast, channels-last, batch 128, 224 px, against timm's convnext_tiny in the
    same loop (AdamW, synthetic batches already on the GPU): 5 warm-up steps, then 3 runs of 20 timed steps.
(c) inference img/s, batch 256, bf16 channels-last: ours eager and torch.compile'd against timm's compiled.
(d) ConvNeXt-XXL under FSDP2 (`engine.distributed.shard`, one rank) for a few bf16 steps, with peak memory.
(e) ONNX export of ConvNeXt-T (`convnext.export`), run by onnxruntime against the model on the GPU.
Each step records pass/fail and its figures; the exit status is 1 when a step failed. Without a CUDA device it
says so and exits 0 without writing a file. Timings need an otherwise idle GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUARD = ROOT / "tests" / "engine" / "test_collectives.py"
TINY = '{"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}'
STEPS = {
    "a": "train, pretrain, detect, segment: a few steps each in a one-rank NCCL group, collectives guarded",
    "b": "ConvNeXt-T training img/s (bf16, channels-last, batch 128) vs timm convnext_tiny, same loop",
    "c": "inference img/s (bf16, channels-last, batch 256): ours eager and compiled vs timm compiled",
    "d": "ConvNeXt-XXL under FSDP2 (one rank): a few bf16 steps, peak memory",
    "e": "ONNX export parity of ConvNeXt-T: onnxruntime against the model on the GPU",
}


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- (a) the jobs in a one-rank NCCL group
def job_commands(work: Path) -> dict[str, list[str]]:
    """Each job's `convnext` arguments on tiny data written under `work`."""
    from convnext.dense.backbone import BackboneConfig
    from convnext.dense.config import DenseOptim, DetectConfig, DetectData, RunConfig, SegmentConfig, SegmentData

    images = _module(ROOT / "tests" / "train" / "conftest.py", "train_conftest").write_image_folder(work / "cls", n=8)
    pre = _module(ROOT / "tests" / "pretrain" / "conftest.py", "pretrain_conftest")._write_folder(work / "pre")
    dense = _module(ROOT / "tests" / "dense" / "conftest.py", "dense_conftest")
    peds, seg = dense.write_instance_folder(work / "peds", n=6), dense.write_label_folder(work / "seg", n=6)
    run = {"epochs": 1, "max_steps": 2, "batch_size": 2, "num_workers": 2, "eval_every": 0}
    det = DetectConfig(
        backbone=BackboneConfig("convnext_atto"), fpn_channels=32, optim=DenseOptim(lr=1e-4, warmup_steps=1),
        data=DetectData(root=str(peds), test_split=2, train_sizes=(64, 80), test_size=64, max_size=96),
        run=RunConfig(output=str(work / "runs" / "detect"), **run),
    )  # fmt: skip
    sdata = SegmentData(format="folder", train_images=str(seg / "images"), train_labels=str(seg / "labels"),
                        val_images=str(seg / "images"), val_labels=str(seg / "labels"), num_classes=3,
                        ignore_ids=(3,), crop=(32, 48), scale=(64, 80), test_scale=(64, 80))  # fmt: skip
    segc = SegmentConfig(backbone=BackboneConfig("convnext_atto"), data=sdata, channels=16, aux_channels=8,
                         optim=DenseOptim(lr=1e-3, warmup_steps=1), run=RunConfig(output=str(work / "runs" / "seg"),
                         **run))  # fmt: skip
    for name, cfg in (("detect", det), ("segment", segc)):
        (work / f"{name}.json").write_text(json.dumps(cfg.to_dict()))
    return {
        "train": ["train", "--preset", "demo", "--data", str(images), "--epochs", "1", "--batch-size", "8",
                  "--output", str(work / "runs" / "train"), "--model.kwargs", TINY, "--img-size", "32",
                  "--amp", "bf16", "--channels_last", "true", "--device", "cuda"],
        "pretrain": ["pretrain", "--data", str(pre), "--output", str(work / "runs" / "pretrain"), "--epochs", "1",
                     "--model.kwargs", TINY, "--img-size", "32", "--model.patch_size", "1", "--batch-size", "8",
                     "--data.eval_images", "8", "--fcmae.decoder_dim", "32", "--amp", "bf16", "--device", "cuda"],
        "detect": ["detect", "train", "--config", str(work / "detect.json"), "--device", "cuda"],
        "segment": ["segment", "train", "--config", str(work / "segment.json"), "--device", "cuda"],
    }  # fmt: skip


def check_jobs(out: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for job, args in job_commands(work).items():
            log = work / "guard" / job
            env = {**os.environ, "CONVNEXT_PROCESS_GROUP": "1", "GUARD_LOG": str(log), "PYTHONPATH": str(ROOT)}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   str(GUARD), *args]  # fmt: skip
            t = time.perf_counter()
            r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
            if r.returncode != 0:
                raise RuntimeError(f"{job}: exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
            counts = json.loads((log / "rank0.json").read_text())
            if not sum(counts.values()):
                raise RuntimeError(f"{job}: no collective ran: the one-rank group was not used")
            out[job] = f"ok in {time.perf_counter() - t:.0f}s; collectives checked: {counts}"


# ---------------------------------------------------------------- (b), (c) speed against timm
def _timed(fn: Callable[[], None], warmup: int, steps: int, runs: int = 3) -> list[float]:
    """Seconds per step of `fn`, one figure per run (CUDA synchronised around each run)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) / steps)
    return out


def _rate(batch: int, secs: list[float]) -> str:
    rates = [batch / s for s in secs]
    return f"{statistics.mean(rates):.0f} img/s (runs {', '.join(f'{r:.0f}' for r in rates)})"


def _models(name: str = "convnext_tiny"):
    import timm

    from convnext import create_model

    return {"ours": create_model(name), "timm": timm.create_model(name)}


def check_train_speed(out: dict, batch: int = 128) -> None:
    import torch
    import torch.nn.functional as F

    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    rates = {}
    for who, model in _models().items():
        model = model.cuda().to(memory_format=torch.channels_last).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step(model=model, opt=opt) -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        secs = _timed(step, 5, 20)
        rates[who] = batch / statistics.mean(secs)
        out[who] = _rate(batch, secs)
        del model, opt
        torch.cuda.empty_cache()
    out["ours / timm"] = f"{rates['ours'] / rates['timm']:.3f}x (target >= 1.0)"


def check_inference_speed(out: dict, batch: int = 256) -> None:
    import torch

    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    models = _models()
    rates = {}
    for who, model in (("ours eager", models["ours"]), ("ours compiled", models["ours"]),
                       ("timm compiled", models["timm"])):  # fmt: skip
        model = model.cuda().to(memory_format=torch.channels_last).eval()
        run = torch.compile(model) if "compiled" in who else model

        @torch.inference_mode()
        def forward(run=run) -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                run(x)

        secs = _timed(forward, 5, 20)
        rates[who] = batch / statistics.mean(secs)
        out[who] = _rate(batch, secs)
    best = max(rates["ours eager"], rates["ours compiled"])
    out["ours (best) / timm compiled"] = f"{best / rates['timm compiled']:.3f}x (target >= 1.0)"


# ---------------------------------------------------------------- (d) XXL under FSDP
def check_fsdp_xxl(out: dict, batch: int = 8, steps: int = 3) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from convnext import create_model
    from convnext.engine.distributed import DistInfo, check_shard, shard

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        info = DistInfo(0, 1, 0, torch.device("cuda", 0), group=True)
        check_shard("convnext_xxlarge", info)
        torch.cuda.reset_peak_memory_stats()
        with torch.device("cuda"):  # built on the GPU: no 3 GB of CPU initialisation first
            model = create_model("convnext_xxlarge")
        params = sum(p.numel() for p in model.parameters())
        shard(model, info)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x, y = torch.randn(batch, 3, 224, 224, device="cuda"), torch.randint(0, 1000, (batch,), device="cuda")
        losses = []
        t = time.perf_counter()
        for _ in range(steps):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        torch.cuda.synchronize()
        if not all(math.isfinite(v) for v in losses):
            raise RuntimeError(f"a loss is not finite: {losses}")
        out["parameters"] = f"{params / 1e6:.0f} M"
        out["steps"] = f"{steps} at batch {batch}, 224 px, {(time.perf_counter() - t) / steps:.2f}s/step"
        out["losses"] = ", ".join(f"{v:.4f}" for v in losses)
        out["peak memory"] = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- (e) ONNX on CUDA
def check_onnx(out: dict) -> None:
    """`convnext.export.export_model` writes and checks the file from the CPU model (its own parity check); then
    onnxruntime (its CUDA provider where installed) runs it against the model on the GPU, in float32 (TF32 off)."""
    import copy

    import onnxruntime as ort
    import torch

    from convnext import create_model
    from convnext.export import export_model

    cpu_model = create_model("convnext_tiny").eval()
    model = copy.deepcopy(cpu_model).cuda()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tiny.onnx"
            report = export_model(cpu_model, "onnx", path, img_size=224, batch_size=2)
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
            session = ort.InferenceSession(str(path), providers=providers)
            x = torch.randn(2, 3, 224, 224, device="cuda")
            with torch.inference_mode():
                want = model(x).float().cpu()
            got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})[0])
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    diff = float((got - want).abs().max() / max(1.0, float(want.abs().max())))
    if diff > 1e-3:
        raise RuntimeError(f"ONNX output differs from the CUDA model's by {diff:.2e} (relative)")
    out["export check"] = json.dumps(report.as_dict(), default=str)[:300]
    out["onnxruntime vs CUDA model"] = f"{session.get_providers()[0]}: max |diff| / max(1, |y|) = {diff:.2e} (<= 1e-3)"


CHECKS: dict[str, Callable[[dict], None]] = {
    "a": check_jobs, "b": check_train_speed, "c": check_inference_speed, "d": check_fsdp_xxl, "e": check_onnx,
}  # fmt: skip


def environment() -> dict[str, str]:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "bf16": str(torch.cuda.is_bf16_supported()),
        "python": platform.python_version(),
        "commit": commit.stdout.strip() or "?",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="list the steps and exit")
    p.add_argument("--only", default="abcde", help="the steps to run, e.g. 'ae'")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the result file")
    args = p.parse_args(argv)
    unknown = sorted(set(args.only) - set(STEPS))
    if unknown:
        p.error(f"--only: no step {''.join(unknown)} (steps: {''.join(STEPS)})")
    if args.dry_run:
        for key in args.only:
            print(f"({key}) {STEPS[key]}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (no result file written)")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    env = environment()
    results: dict[str, tuple[bool, dict, float]] = {}
    for key in args.only:
        out: dict = {}
        t = time.perf_counter()
        print(f"({key}) {STEPS[key]} ...", flush=True)
        try:
            CHECKS[key](out)
            ok = True
        except Exception as e:  # a failed step is recorded and the others still run
            out["error"] = f"{type(e).__name__}: {e}"
            print(traceback.format_exc(), file=sys.stderr)
            ok = False
        results[key] = (ok, out, time.perf_counter() - t)
        print(f"({key}) {'pass' if ok else 'FAIL'} in {results[key][2]:.0f}s: {out}", flush=True)
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
    path = write_report(Path(args.out), env, results)
    print(f"wrote {path}")
    return 0 if all(ok for ok, _, _ in results.values()) else 1


def write_report(folder: Path, env: dict[str, str], results: dict[str, tuple[bool, dict, float]]) -> Path:
    device = re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower()).strip("-")
    path = folder / f"gpu-{device}-{datetime.date.today().isoformat()}.md"
    setup = ", ".join(f"{k} {v}" for k, v in env.items())
    lines = [f"# GPU check: {env['gpu']}, {datetime.date.today().isoformat()}", "",
             f"`python benchmarks/gpu_check.py` (issue 38). {setup}", ""]  # fmt: skip
    for key, (ok, out, secs) in results.items():
        lines += [f"## ({key}) {STEPS[key]}: {'pass' if ok else 'FAIL'} ({secs:.0f}s)", ""]
        lines += [f"- {k}: {v}" for k, v in out.items()] + [""]
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    sys.exit(main())
