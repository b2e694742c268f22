"""`convnext bench` and `benchmarks/compare.py`: the fields are there and sane, memory is measured for real
(no timing assertions: timings on a shared machine mean nothing)."""

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from convnext.bench import PeakMemory, benchmark, format_result, matmul_peak_gflops
from convnext.cli import main
from convnext.flops import count_gmacs
from convnext.registry import create_model

SMALL = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}


def small() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("convnext_atto", num_classes=10, **SMALL)


def test_matmul_peak_is_positive():
    for dtype in (torch.float32, torch.bfloat16):
        g = matmul_peak_gflops(dtype, "cpu", n=128, runs=2)
        assert math.isfinite(g) and g > 0


def test_peak_memory_sees_torch_allocations():
    with PeakMemory(torch.device("cpu")) as mem:
        a = torch.ones(10 * 2**20 // 4)  # 10 MiB
        b = a * 2  # another 10 MiB live at once
        del a, b
    assert 19.5 <= mem.mb <= 21  # exactly the two live tensors (plus nothing much else)
    with PeakMemory(torch.device("cpu")) as mem2:
        for _ in range(5):
            torch.ones(10 * 2**20 // 4)  # freed each time: the peak stays at one tensor
    assert 9.5 <= mem2.mb <= 11


@pytest.mark.parametrize("impl", ["eager", "fast"])
def test_inference_fields(impl):
    model = small()
    r = benchmark(model, "small", batch=4, img_size=32, impl=impl, compile=False, warmup=1, runs=3, matmul_n=128)
    d = r.as_dict()
    assert d["mode"] == "inference" and d["batch"] == 4 and d["impl"] == impl and d["runs"] == 3
    assert d["img_per_s"] > 0 and d["latency_ms"] > 0 and d["latency_p90_ms"] >= d["latency_ms"] * 0.999
    assert d["img_per_s"] == pytest.approx(4 / (d["latency_ms"] / 1e3))
    assert d["gmacs"] == pytest.approx(count_gmacs(model, 32))
    assert d["achieved_gflops"] == pytest.approx(d["img_per_s"] * 2 * d["gmacs"])
    assert d["roofline_share"] == pytest.approx(d["achieved_gflops"] / d["matmul_peak_gflops"])
    assert d["peak_mem_mb"] >= 0 and d["grad_checkpointing"] == {}
    assert d["channels_last"] == (impl == "fast") and "img/s" in format_result(r)
    json.dumps(d)


def test_train_step_reports_grad_checkpointing_memory():
    """At a size where activations dominate, checkpointing must show a real drop in measured peak memory."""
    torch.manual_seed(0)
    model = create_model("convnext_atto", num_classes=10, depths=(2, 2, 2, 2), dims=(8, 16, 32, 64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = benchmark(model, "small", batch=8, img_size=64, impl="eager", train=True, warmup=1, runs=2, matmul_n=128)
    assert r.mode == "train" and r.img_per_s > 0
    assert r.achieved_gflops == pytest.approx(r.img_per_s * 2 * r.gmacs * 3)
    g = r.grad_checkpointing
    assert set(g) == {"img_per_s", "latency_ms", "peak_mem_mb", "time_ratio", "memory_ratio"}
    assert 0 < g["peak_mem_mb"] < r.peak_mem_mb and g["memory_ratio"] < 0.8
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model untouched
    assert "grad ckpt" in format_result(r)


def test_fast_train_bf16_runs():
    r = benchmark(small(), "small", batch=2, img_size=32, dtype="bf16", impl="fast", train=True, compile=False,
                  warmup=1, runs=2, grad_checkpointing=False, matmul_n=128)  # fmt: skip
    assert r.dtype == "bf16" and r.img_per_s > 0 and r.grad_checkpointing == {}


def test_cli_bench_json(capsys):
    args = ["bench", "convnext_atto", "--batch", "2", "--img-size", "32", "--impl", "eager", "--no-compile"]
    assert main(args + ["--runs", "2", "--warmup", "1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == "convnext_atto" and d["compile"] is False and d["img_per_s"] > 0
    assert d["gmacs"] == pytest.approx(count_gmacs(create_model("convnext_atto"), 32))


def _benchmark_module(name: str):
    """benchmarks/<name>.py, imported (the folder is scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


def test_compare_peers_compute_the_same_function():
    """timm and torchvision models built by compare.py hold our weights: same outputs on the same input."""
    compare = _benchmark_module("compare")
    case = compare.QUICK["tiny"]
    torch.manual_seed(0)
    ours = create_model(case.arch).eval()
    with torch.no_grad():
        for block in (b for s in ours.stages for b in s.blocks):
            block.gamma.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = ours(x)
        for impl in ("timm_eager", "torchvision"):
            torch.testing.assert_close(compare.peer_model(impl, case, ours).eval()(x), want, atol=1e-4, rtol=1e-4)


def test_compare_table_ratios():
    compare = _benchmark_module("compare")
    results = {
        "convnext_tiny": {
            "infer_fp32": {"batch": 16, "settings": {"ours": {"fp32": 20.0}, "timm_eager": {"fp32": 10.0},
                           "timm_compiled": {"fp32": "failed: boom"},
                           "onnxruntime": {"our export": 12.0, "timm export": 16.0}, "ours_again": {"fp32": 20.0}},
                           "agreement": {"timm_eager": {"fp32": 1e-6}}, "roofline": 25.0},
            "latency_fp32": {"batch": 1, "settings": {"ours": {"fp32": 20.0}, "onnxruntime": {"our export": 25.0},
                             "ours_again": {"fp32": 16.0}}, "agreement": {}, "roofline": 40.0},
        }
    }  # fmt: skip
    for r in results["convnext_tiny"].values():
        r.update({"img_per_s": {}, "errors": {}, "best_setting": {}})
        compare.summarise(r)
    infer = results["convnext_tiny"]["infer_fp32"]
    assert infer["img_per_s"] == {"ours": 20.0, "timm_eager": 10.0, "onnxruntime": 16.0, "ours_again": 20.0}
    assert infer["best_setting"]["onnxruntime"] == "timm export" and infer["control"] == 1.0
    assert infer["errors"] == {"timm_compiled": "fp32: failed: boom"}
    meta = {"machine": "cpu", "threads": 2, "torch": "x", "peak_gflops": {"fp32": 1.0, "bf16": 2.0}, "command": "c"}
    table = compare.markdown(results, meta)
    assert (
        "| infer_fp32 | 16 | 20.0 | 10.0 (2.00x) | failed | 16.0 (1.25x) | 1.00 | 1.25x (onnxruntime) "
        "| 25.0 img/s | 80% |" in table
    )
    # ours / ours = 1.25 in the latency row: marked, and a warning heads the table
    assert (
        "| latency_fp32 | 1 | 50.0 ms | - | - | 40.0 ms (0.80x) | 1.25 (!) | 0.80x (onnxruntime) | 25.00 ms | 50% |"
        in table
    )
    assert "WARNING: the A/A control is outside 1 +- 0.03 in convnext_tiny latency_fp32 (1.25)" in table.split("##")[0]
    assert "- convnext_tiny infer_fp32 onnxruntime: our export 12.0, timm export 16.0" in table
    assert "timm compiled CL: fp32: failed: boom" in table.split("## Failures")[1]


def test_compare_settings_are_each_peers_documented_best():
    """timm: eager and compiled, fp32 or bf16 by autocast and (inference) with bf16 weights; onnxruntime on our export
    (fixed and dynamic batch) and timm's in fp32 inference only; ours once (and again in the A/A control)."""
    compare = _benchmark_module("compare")
    atto = compare.CASES["atto"]
    assert compare.settings("timm_compiled", "infer_bf16", atto) == ["autocast", "bf16 weights"]
    assert compare.settings("timm_eager", "train_bf16", atto) == ["autocast"]
    assert compare.settings("timm_eager", "train_fp32", atto) == ["fp32"]
    ort = ["our export", "our export, dynamic batch", "timm export"]
    assert compare.settings("onnxruntime", "latency_fp32", atto) == ort
    assert (
        compare.settings("onnxruntime", "infer_bf16", atto) == compare.settings("onnxruntime", "train_fp32", atto) == []
    )
    assert compare.settings("torchvision", "infer_fp32", atto) == []  # torchvision has no atto
    assert (
        compare.settings("ours_again", "infer_bf16", atto) == compare.settings("ours", "infer_bf16", atto) == ["bf16"]
    )


def test_time_blocks_times_blocks_of_calls():
    """One entry per block, each the block's seconds per call; the block holds as many calls as fill block_s."""
    from convnext.bench import time_blocks

    calls = []
    seconds = time_blocks(lambda: calls.append(1), blocks=3, block_s=0.0, pause_s=0.0, device=torch.device("cpu"))
    assert len(seconds) == 3 and all(s >= 0 for s in seconds)
    assert len(calls) == 2 + 1 + 3  # warm-up, the call that sizes a block, one call per block


def test_folder_vs_resnet18_stand_in_and_peer_loop(tmp_path):
    """The photo-check benchmark builds its CIFAR stand-in (train after the first images, val from test, resized)
    and its ResNet-18 peer trains and scores on it."""
    from PIL import Image

    bench = _benchmark_module("folder_vs_resnet18")
    cifar = tmp_path / "cifar"
    for split in ("train", "test"):
        for c, cls in enumerate(("cat", "dog")):
            (cifar / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (32, 32), (100 * c, 40 * i, 0)).save(cifar / split / cls / f"{i}.jpg")
    out = tmp_path / "stand_in"
    bench.make_stand_in(cifar, out, side=40, per_train=2, per_val=1, skip=1)
    assert sorted(p.name for p in (out / "train" / "cat").iterdir()) == ["1.jpg", "2.jpg"]
    assert [p.name for p in (out / "val" / "dog").iterdir()] == ["0.jpg"]
    with Image.open(out / "val" / "dog" / "0.jpg") as im:
        assert im.size == (40, 40)
    row = bench.resnet18_loop(out, size=32, minutes=0.01, threads=1)
    assert row["top1"] in (0.0, 50.0, 100.0)  # 2 val images
    assert row["img_per_s"] > 0


def test_folder_vs_resnet18_real_photo_folders(tmp_path):
    """The CamVid patches are labelled by the class covering 60% of the window (training windows from the train and
    val sequences, scored ones from test); the Penn-Fudan crops are the pedestrians' boxes plus 10% and background
    windows of the same shape that overlap no pedestrian."""
    import numpy as np
    from PIL import Image

    bench = _benchmark_module("folder_vs_resnet18")
    camvid = tmp_path / "CamVid"
    for split in ("train", "val", "test"):
        (camvid / split).mkdir(parents=True)
        (camvid / f"{split}annot").mkdir()
        labels = np.full((32, 64), 3, np.uint8)  # road below ...
        labels[:16, :32] = 0  # ... sky top left ...
        labels[:16, 32:] = 11  # ... void top right
        Image.fromarray(labels).save(camvid / f"{split}annot" / f"{split}_0.png")
        Image.new("RGB", (64, 32), (90, 90, 90)).save(camvid / split / f"{split}_0.jpg")
    out = tmp_path / "patches"
    bench.make_camvid_patches(camvid, out, side=16, per_train=100, per_val=100)
    train = {c: {p.name for p in (out / "train" / c).iterdir()} for c in ("sky", "road", "car")}
    # windows every 8 px; at x 24 half the window is void, at y 8 half is road: neither is 60% sky
    assert train["sky"] == {f"{s}_0_{x}_0.jpg" for s in ("train", "val") for x in (0, 8, 16)}
    assert len(train["road"]) == 2 * 7 and not train["car"]  # x 0, 8, ..., 48 at y 16, from train and val
    assert {p.name for p in (out / "val" / "sky").iterdir()} == {f"test_0_{x}_0.jpg" for x in (0, 8, 16)}
    with Image.open(out / "val" / "road" / "test_0_48_16.jpg") as im:
        assert im.size == (16, 16)

    peds = tmp_path / "PennFudanPed"
    (peds / "PNGImages").mkdir(parents=True)
    (peds / "PedMasks").mkdir()
    for i in range(3):
        mask = np.zeros((100, 200), np.uint8)
        mask[20:70, 10:30] = 1  # one pedestrian: box (10, 20)-(30, 70), 20x50
        Image.fromarray(mask).save(peds / "PedMasks" / f"P{i}_mask.png")
        img = np.zeros((100, 200, 3), np.uint8)
        img[..., 1] = 120
        img[20:70, 10:30] = (250, 0, 0)  # the pedestrian is red, the rest green
        Image.fromarray(img).save(peds / "PNGImages" / f"P{i}.png")
    crops = tmp_path / "crops"
    bench.make_pedestrian_crops(peds, crops, n_train_images=2)
    assert sorted(p.name for p in (crops / "train" / "pedestrian").iterdir()) == ["P0_0.jpg", "P1_0.jpg"]
    assert [p.name for p in (crops / "val" / "background").iterdir()] == ["P2_0.jpg"]
    with Image.open(crops / "val" / "pedestrian" / "P2_0.jpg") as im:
        assert im.size == (24, 60)  # 10% of the box on each side
    with Image.open(crops / "val" / "background" / "P2_0.jpg") as im:
        assert im.size == (24, 60) and np.asarray(im)[..., 0].max() < 60  # no red: off the pedestrian's box


def test_dense_transfer_counts_pretraining_core_minutes_down_the_chain(tmp_path):
    """`--same-total` gives scratch rows the pre-training they lack: a fine-tuning run's core-minutes include the
    run its weights started from; a folder that is not a finished run is named."""
    bench = _benchmark_module("dense_transfer")

    def run(name: str, train_s: float, threads: int | None, checkpoint: str | None = None) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model": {"checkpoint": checkpoint}, "threads": threads}))
        (d / "results.json").write_text(json.dumps({"train_s": train_s}))
        return d

    pre = run("fcmae", 600.0, 2)
    ft = run("finetune", 300.0, 2, checkpoint=str(pre / "last.pt"))
    assert bench.core_minutes(pre) == 20.0
    assert bench.core_minutes(ft) == 30.0
    assert bench.core_minutes(run("default_threads", 120.0, None)) == 2.0 * (os.cpu_count() or 1)  # torch's default
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(FileNotFoundError, match="unfinished: not a finished run"):
        bench.core_minutes(tmp_path / "unfinished")
    names = [name for name, _, _ in bench.rows("convnextv2_atto", [str(pre)], resnet=False)]
    assert names == ["convnextv2_atto from scratch", "convnextv2_atto pre-trained (fcmae)"]


def test_profile_step_sorts_a_real_step_into_kinds():
    """benchmarks/profile_step.py: a fast-path training step (eager, tiny, float32) profiled and summed by kind;
    the 1x1 products, the depthwise work and the optimizer are each found, and the kinds hold the step's ops."""
    prof = _benchmark_module("profile_step")
    r = prof.profile_step("convnext_atto", batch=2, img_size=32, dtype=torch.float32, steps=1, compile=False)
    kinds = r["kinds_ms"]
    assert kinds["1x1 products"] > 0 and kinds["optimizer"] > 0 and kinds["stem and downsampling convolutions"] > 0
    assert any(k.startswith("depthwise") for k in kinds)
    assert 0 < r["pointwise_train_flops"] < r["train_flops"] and r["train_flops"] == pytest.approx(
        3 * 2e9 * count_gmacs(create_model("convnext_atto"), 32) * 2
    )
    # a binary post-op's shapes are (input, other, weight, ...): its weight decides the kind, not `other`
    binary = [[16, 1536, 14, 14], [16, 384, 14, 14], [384, 1536, 1, 1], [384]]
    assert prof.kind("mkldnn::_convolution_pointwise_", binary) == "1x1 products"
    assert prof.kind("aten::convolution_backward", [[16, 96, 56, 56], [16, 384, 56, 56], [96, 384, 1, 1]]) == (
        "1x1 grad-weight (oneDNN)"
    )
    assert prof.kind("convnext::layer_norm", [[16, 56, 56, 96]]) == "C kernel: layer_norm"
    assert prof.kind("aten::mkldnn_convolution", [[16, 96, 56, 56], [96, 1, 7, 7], [96]]) == (
        "depthwise convolution (oneDNN)"
    )


def test_large_photos_builds_a_phone_size_folder_by_sequence(tmp_path):
    """Every frame of train/val/test, sorted by name, resized; every 4th in val; the class is the sequence prefix."""
    from PIL import Image

    bench = _benchmark_module("large_photos")
    camvid = tmp_path / "CamVid"
    names = {"train": ["0001TP_000", "0001TP_030", "0006R0_000"], "val": ["0016E5_000"], "test": ["Seq05VD_f0"]}
    for split, stems in names.items():
        (camvid / split).mkdir(parents=True)
        for s in stems:
            Image.new("RGB", (48, 36), (10, 20, 30)).save(camvid / split / f"{s}.jpg")
    out = tmp_path / "phones"
    assert bench.make_phone_folder(camvid, out, size=(96, 72)) == 5
    # sorted: 0001TP_000 (val), 0001TP_030, 0006R0_000, 0016E5_000, Seq05VD_f0 (val)
    got = {str(p.relative_to(out)) for p in out.rglob("*.jpg")}
    assert got == {
        "val/0001TP/0001TP_000.jpg",
        "train/0001TP/0001TP_030.jpg",
        "train/0006R0/0006R0_000.jpg",
        "train/0016E5/0016E5_000.jpg",
        "val/Seq05V/Seq05VD_f0.jpg",
    }
    with Image.open(out / "val" / "Seq05V" / "Seq05VD_f0.jpg") as im:
        assert im.size == (96, 72) and im.format == "JPEG"
    with pytest.raises(FileNotFoundError, match="no frames"):
        bench.make_phone_folder(tmp_path / "empty", tmp_path / "x")


@pytest.mark.slow
def test_finetune_quick_runs_its_rows_end_to_end_and_continues(tmp_path, capsys):
    """benchmarks/finetune.py --quick on the real shared data, two of its rows (each row is a process that pays its
    own start-up, so the suite runs one of each kind: a `convnext train` row and a plain-loop row): the supervised
    source and its timm file are made, the CamVid 64 px target is built, each row trains in its own process and is
    scored; auto-ft starts from the source, timm's loop trains at auto-ft's size; a second call reads every step back
    instead of training again."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    missing = [str(shared / n) for n in ("cifar10-jpg.tar", "camvid.tar") if not (shared / n).is_file()]
    if missing:
        pytest.skip(f"real data not here: {', '.join(missing)}")
    bench = _benchmark_module("finetune")
    work, results = tmp_path / "work", tmp_path / "results"
    argv = ["--quick", "--rows", "auto-ft,timm", "--work", str(work), "--results", str(results), "--json"]
    assert bench.main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ["auto-ft", "timm"]
    assert all(r["target"] == "camvid64" and r["seed"] == 0 and 0 <= r["top1"] <= 100 for r in rows.values())
    source = work / "source-0.05m"
    assert any("fine-tun" in line and str(source / "supervised") in line for line in rows["auto-ft"]["recipe"])
    assert rows["timm"]["img_size"] == rows["auto-ft"]["img_size"] and rows["timm"]["steps"] >= 1
    (md,) = results.glob("finetune-*.md")
    table = md.read_text()
    assert "| row | camvid64 (auto-ft at" in table and all(f"| {name} | " in table for name in rows)
    assert json.loads(md.with_suffix(".json").read_text())["rows"] == report["rows"]

    trained = {p: p.stat().st_mtime_ns for p in work.rglob("results.json")}
    assert bench.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["rows"] == report["rows"]
    assert not [line for line in out if line.startswith("$ ")]  # no command run again
    assert {p: p.stat().st_mtime_ns for p in work.rglob("results.json")} == trained
