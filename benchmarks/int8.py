"""int8 ONNX against float32 (issue 41, item 3): top-1 on real runs' held-out images, and speed against
onnxruntime's own int8 of the same model.

    python benchmarks/int8.py accuracy --pair runs/c10 /tmp/data/cifar10-images --pair RUN DATA ...
    python benchmarks/int8.py speed --run runs/c10 --tiny      # on an idle machine (a few minutes a model)
    python benchmarks/int8.py speed --run runs/c10 --quick     # a smoke run of the pipeline (numbers meaningless)

accuracy: for each (run folder, held-out data) pair, `convnext export RUN --format onnx --dynamic-batch` writes the
float32 file and the same command with `--int8` the int8 one (calibrated on the run's own training images), each
run as a user runs it, in a process of its own. The checkpoint (torch), the float32 file and the int8 file are then
scored on DATA by the library's eval (`convnext.infer.eval_dataset` and `evaluate`, what `convnext eval` runs), each
with its own preprocessing and test-time views (the .onnx files' from their metadata), on the same images in the
same order. Reported: top-1 of each, the int8 drop in points (checkpoint - int8), and the share of images whose int8
top-1 is the checkpoint's. Accuracy does not depend on machine load: this part may run on a busy machine. Rows are
written to `<out>/int8-<cpu>-<date>.md` and `.json`, a rerun the same day replacing the rows of its pairs.

speed: the run's ConvNeXt (its weights, its input size) and with `--tiny` convnext_tiny at 224 (random weights),
at batch 1 (latency) and batch 16 and 32 (throughput), `--threads` threads, every implementation timed in a process
of its own as `benchmarks/compare.py` times (`compare.run_child`: blocks of calls with a pause before each, the
median block; onnxruntime with ORT_ENABLE_ALL; `--wait spin`, the default, leaves each runtime its own way for idle
threads to wait, `--wait passive` parks them, as compare.py's `--wait` does):

  int8 ours         our int8 file (`convnext.quantize.export_int8`, as `convnext export --int8`) on onnxruntime
  int8 ours (A/A)   the same in another process, last: int8 ours / int8 ours should read 1.00 +- 0.03
  ORT int8 static   onnxruntime's documented default: `quantize_static(fp32, out, reader)` with its defaults on the
                    plain float32 export, calibrated on the same images; and the same after `quant_pre_process`,
                    the pre-processing its documentation recommends ("pre-processed")
  ORT int8 dynamic  `quantize_dynamic(fp32, out)` with its defaults
  ORT fp32          onnxruntime on our float32 export
  ours fp32, bf16   `convnext.optimize` (what `convnext bench` runs)

Every ONNX file is traced at the batch it is timed at. Each implementation's top-1 on the timed images (the run's
training images) is compared with the eager float32 model's. Writes `<out>/int8-speed-<cpu>-<date>.md` and `.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import CONTROL_TOLERANCE, WAITS, run_child  # noqa: E402  (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_kind() -> str:
    """'amd' or 'intel' from /proc/cpuinfo's vendor (else the machine's architecture)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine().lower()
    return "amd" if "AuthenticAMD" in text else "intel" if "GenuineIntel" in text else platform.machine().lower()


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    import onnxruntime

    return {"cpu": cpu_name(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip


# ------------------------------------------------------------------------------------------ accuracy


def convnext_cli(argv: list[str], threads: int) -> dict:
    """`convnext ARGV --json` in a process of its own (as a user runs it): its JSON answer."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "convnext", *argv, "--json"], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"convnext {' '.join(argv)}: {(p.stderr.strip().splitlines() or ['failed'])[-1]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def score(source: str | Path, data: str, run_cfg: dict, batch: int) -> dict:
    """The library's eval of `source` (a run folder or an .onnx file, resolved with its own preprocessing) on the
    held-out images of `data`; the split is read as the run read it (its val_split)."""
    from torch.utils.data import DataLoader

    from convnext.infer import eval_dataset, evaluate, tta_views
    from convnext.resolve import resolve

    loaded = resolve(source)
    split = {"val_split": run_cfg["data"]["val_split"]} if run_cfg["data"].get("val_split") else {}
    ds, classes = eval_dataset(data, loaded.preprocess, loaded.classes, loaded.run, **split)
    t0 = time.perf_counter()
    r = evaluate(loaded.model, DataLoader(ds, batch_size=batch), len(classes), "cpu", preprocess=loaded.preprocess)
    seconds = time.perf_counter() - t0
    return {"top1": r["top1"], "n": r["n"], "views": tta_views(loaded.preprocess), "preds": r["preds"],
            "targets": r["targets"], "preprocess": str(loaded.preprocess), "seconds": seconds}  # fmt: skip


def accuracy_row(run: Path, data: str, work: Path, args: argparse.Namespace) -> dict:
    """Export the pair's run to float32 and int8 ONNX, score all three on `data`: one table row."""
    run_cfg = json.loads((run / "config.json").read_text())
    fp32, int8 = work / "fp32.onnx", work / "int8.onnx"
    export = ["export", str(run), "--format", "onnx", "--dynamic-batch", "--force"]
    calib = ["--calib-images", str(args.calib_images)] if args.calib_images else []
    commands = {"fp32": [*export, "--output", str(fp32)], "int8": [*export, "--int8", *calib, "--output", str(int8)]}
    reports = {}
    for name, argv in commands.items():
        log(f"  convnext {' '.join(argv)}")
        reports[name] = convnext_cli(argv, args.threads)
    scores = {}
    for name, source in (("torch", run), ("onnx_fp32", fp32), ("onnx_int8", int8)):
        log(f"  eval {name} on {data}")
        scores[name] = score(source, data, run_cfg, args.batch)
        log(f"    top-1 {scores[name]['top1']:.2f} ({scores[name]['n']} images, {scores[name]['views']} views, "
            f"{scores[name]['seconds']:.0f} s)")  # fmt: skip
    ref = scores["torch"]
    for name, s in scores.items():
        if not np.array_equal(s["targets"], ref["targets"]) or s["preprocess"] != ref["preprocess"]:
            raise RuntimeError(f"{name} was not scored on the checkpoint's images with its preprocessing")
    same = {name: float((s["preds"] == ref["preds"]).mean()) for name, s in scores.items() if name != "torch"}
    return {
        "run": str(run),
        "data": data,
        "model": run_cfg["model"]["name"],
        "img_size": run_cfg["data"]["img_size"],
        "n": ref["n"],
        "views": ref["views"],
        "top1": {name: s["top1"] for name, s in scores.items()},
        "int8_drop": ref["top1"] - scores["onnx_int8"]["top1"],
        "same_top1_as_torch": same,
        "quantization": reports["int8"],
        "commands": [f"convnext {' '.join(c).replace(str(work) + os.sep, '')}" for c in commands.values()]
        + [f"convnext eval {s} --data {data}" for s in (run, fp32.name, int8.name)],
    }


def accuracy_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# int8 ONNX against float32: top-1 on held-out images ({meta['cpu']}, onnxruntime {meta['onnxruntime']}, "
        f"torch {meta['torch']})",
        "",
        "Each run exported with `convnext export RUN --format onnx --dynamic-batch` (float32) and the same with "
        "`--int8` (static int8, calibrated on the run's own training images); the checkpoint (torch), the float32 "
        "file and the int8 file scored by the library's eval on the same held-out images with the same "
        "preprocessing and test-time views. drop = torch - int8 (points); same top-1 = share of images whose "
        "prediction equals the checkpoint's. Target: drop <= 1 point.",
        "",
        "| run | model, px | held-out images | views | torch | ONNX fp32 | ONNX int8 | int8 drop | same top-1 (fp32 / "
        "int8) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, same = r["top1"], r["same_top1_as_torch"]
        lines.append(
            f"| {r['run']} | {r['model']}, {r['img_size']} | {r['data']} ({r['n']}) | {r['views']} | "
            f"{t['torch']:.2f} | {t['onnx_fp32']:.2f} | {t['onnx_int8']:.2f} | {r['int8_drop']:+.2f} | "
            f"{100 * same['onnx_fp32']:.2f}% / {100 * same['onnx_int8']:.2f}% |"
        )
    lines += ["", "Quantization (from each int8 file's report):", ""]
    for r in rows:
        q = r["quantization"]
        lines.append(f"- {r['run']}: {q['calibration_images']} calibration images, int8 top-1 = float32 top-1 on "
                     f"{100 * q['agreement']:.1f}% of them, max |logit diff| {q['max_diff']:.3g}")  # fmt: skip
    lines += ["", "Commands (the benchmark runs the exports as written, in a temporary folder; the evals are what "
              "`convnext eval` runs):", ""]  # fmt: skip
    for r in rows:
        lines += [f"    {c}" for c in r["commands"]]
    lines += ["", "Benchmark commands that made the rows:", ""]
    lines += [f"    {c}" for c in dict.fromkeys(r["benchmark_command"] for r in rows)] + [""]
    return "\n".join(lines)


def accuracy(args: argparse.Namespace) -> int:
    for run, data in args.pair:
        if not (Path(run) / "config.json").is_file():
            raise SystemExit(f"int8.py: error: --pair {run}: not a training run folder (no config.json)")
        if not Path(data).exists():
            raise SystemExit(f"int8.py: error: --pair {run} {data}: {data} does not exist")
    torch.set_num_threads(args.threads)
    stem = Path(args.out) / f"int8-{cpu_kind()}-{datetime.date.today().isoformat()}"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", *sys.argv])
    for run, data in args.pair:
        log(f"{run} on {data}:")
        with tempfile.TemporaryDirectory() as work:
            row = accuracy_row(Path(run), data, Path(work), args) | {"benchmark_command": command}
        # today's file gains the row (replacing an earlier one of the same pair): a file of another day is kept
        old = json.loads(Path(f"{stem}.json").read_text())["rows"] if Path(f"{stem}.json").exists() else []
        rows = [r for r in old if (r["run"], r["data"]) != (row["run"], row["data"])] + [row]
        meta = machine() | {"threads": args.threads}
        table = accuracy_markdown(rows, meta)
        Path(f"{stem}.md").write_text(table)
        Path(f"{stem}.json").write_text(json.dumps({"rows": rows, "meta": meta}, indent=1) + "\n")
        log(f"wrote {stem}.md, .json")
    print(table)
    return 0


# ------------------------------------------------------------------------------------------ speed

IMPLS = (
    "int8_ours",
    "int8_ort_static",
    "int8_ort_static_pre",
    "int8_ort_dynamic",
    "ort_fp32",
    "ours_fp32",
    "ours_bf16",
)
CONTROL = "int8_ours_again"  # our int8 file in a second process, last: the A/A control
LABELS = {
    "int8_ours": "int8 ours (ORT)",
    "int8_ort_static": "ORT int8 static (defaults)",
    "int8_ort_static_pre": "ORT int8 static (defaults, pre-processed)",
    "int8_ort_dynamic": "ORT int8 dynamic (defaults)",
    "ort_fp32": "ORT fp32",
    "ours_fp32": "ours fp32 (optimize)",
    "ours_bf16": "ours bf16 (optimize)",
    CONTROL: "int8 ours again (A/A)",
}
FILES = {"int8_ours": "int8", CONTROL: "int8", "int8_ort_static": "ort-static", "int8_ort_static_pre": "ort-static-pre",
         "int8_ort_dynamic": "ort-dynamic", "ort_fp32": "fp32"}  # fmt: skip


def session(path: str, threads: int, spin: bool = False):
    """onnxruntime as compare.py runs it: ORT_ENABLE_ALL, `threads` intra-op threads, the pool spinning between calls
    (`spin`, onnxruntime's default) or parked."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def child(spec: dict) -> dict:
    """One implementation timed in this (fresh) process, its logits on the timed batch saved for the check."""
    from convnext.bench import build_runner, time_blocks
    from convnext.fast import keep_freed_memory
    from convnext.resolve import resolve

    torch.set_num_threads(spec["threads"])
    keep_freed_memory()  # as compare.py: the allocator setting optimize() makes holds for every implementation
    x = torch.from_numpy(np.load(spec["inputs"]))
    impl = spec["impl"]
    if impl in FILES:
        s = session(spec["files"][FILES[impl]], spec["threads"], spec.get("wait") == "spin")
        feed = {s.get_inputs()[0].name: x.numpy()}

        def run() -> np.ndarray:
            return s.run(None, feed)[0]

    else:
        model = resolve(spec["source"]).model
        model.load_state_dict(torch.load(spec["weights"], weights_only=True))
        y = torch.zeros(len(x), dtype=torch.long)
        dtype = torch.bfloat16 if impl == "ours_bf16" else torch.float32
        run = build_runner(model, x, y, impl="fast", dtype=dtype, compile=not spec["quick"])  # quick: no compiling
    out = run()  # the first call compiles
    got = out.float().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, dtype=np.float32)
    np.save(spec["output"], got)
    return {"seconds_per_call": time_blocks(run, spec["blocks"], spec["block_s"], spec["pause_s"], torch.device("cpu"))}


def write_files(loaded, images: torch.Tensor, batch: int, folder: Path) -> dict[str, str]:
    """The ONNX files timed at `batch`: our float32 export, our int8 (as `convnext export --int8`), and
    onnxruntime's own int8 of that float32 file: static with its defaults on the same calibration images, on the
    file as exported and after the pre-processing its documentation recommends (`quant_pre_process`), and dynamic
    with its defaults."""
    from onnxruntime.quantization import quant_pre_process, quantize_dynamic, quantize_static

    from convnext.export import deploy_metadata, export_model, quiet_loggers
    from convnext.flops import in_chans_of
    from convnext.quantize import CalibrationReader, export_int8

    folder.mkdir(parents=True, exist_ok=True)
    names = ("fp32", "int8", "pre", "ort-static", "ort-static-pre", "ort-dynamic")
    files = {k: str(folder / f"{k}.onnx") for k in names}
    size, chans = images.shape[-1], in_chans_of(loaded.model)
    meta = deploy_metadata(loaded)
    export_model(loaded.model, "onnx", files["fp32"], img_size=size, in_chans=chans, batch_size=batch, force=True)
    export_int8(loaded.model, files["int8"], images, meta, force=True, in_chans=chans, batch_size=batch)
    name = session(files["fp32"], 1).get_inputs()[0].name
    peers = {
        "pre": lambda: quant_pre_process(files["fp32"], files["pre"]),
        "ort-static": lambda: quantize_static(files["fp32"], files["ort-static"],
                                              CalibrationReader(name, images.numpy(), batch)),
        "ort-static-pre": lambda: quantize_static(files["pre"], files["ort-static-pre"],
                                                  CalibrationReader(name, images.numpy(), batch)),
        "ort-dynamic": lambda: quantize_dynamic(files["fp32"], files["ort-dynamic"]),
    }  # fmt: skip
    for key, make in peers.items():
        try:  # a peer onnxruntime cannot make is timed as failed (its file is missing), the rest still run
            with quiet_loggers("", level=logging.ERROR):  # its advice to pre-process, given after pre-processing too
                make()
        except Exception as e:  # onnxruntime's own error types
            log(f"    onnxruntime could not write {key}.onnx: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return files


def speed(args: argparse.Namespace) -> int:
    from convnext.quantize import calibration_images
    from convnext.resolve import resolve

    run_cfg = json.loads((Path(args.run) / "config.json").read_text())
    cases = [("run", str(args.run))] + ([("convnext_tiny", "convnext_tiny")] if args.tiny else [])
    batches = (1, 2) if args.quick else (1, 16, 32)
    timing = {"threads": args.threads, "blocks": args.blocks, "block_s": args.block_s, "pause_s": args.pause_s,
              "quick": args.quick, "wait": args.wait}  # fmt: skip
    torch.set_num_threads(args.threads)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, source in cases:
            torch.manual_seed(0)  # convnext_tiny's random weights
            loaded = resolve(source, img_size=32 if args.quick and key != "run" else None)
            name = f"{loaded.name} ({source})" if key == "run" else f"{loaded.name} (random weights)"
            weights = Path(tmp) / f"{key}.pt"
            torch.save(loaded.model.state_dict(), weights)
            images = calibration_images(loaded.preprocess, args.calib_images, run=run_cfg)  # the run's training images
            log(f"{name} at {loaded.preprocess.img_size} px: {len(images)} calibration images")
            results[name] = {}
            for batch in batches:
                x = images[:batch].contiguous()
                np.save(Path(tmp) / "inputs.npy", x.numpy())
                with torch.inference_mode():
                    reference = loaded.model(x).float().numpy()
                log(f"  batch {batch}: writing the ONNX files")
                files = write_files(loaded, images, batch, Path(tmp) / f"{key}-b{batch}")
                out = Path(tmp) / "out.npy"
                r: dict = {"batch": batch, "img_per_s": {}, "blocks": {}, "same_top1": {}, "max_diff": {}, "errors": {}}
                for impl in [*IMPLS, CONTROL]:  # the control last: drift over the sequence shows in it
                    log(f"  batch {batch}: {LABELS[impl]}")
                    spec = {**timing, "impl": impl, "inputs": str(Path(tmp) / "inputs.npy"), "files": files,
                            "source": source, "weights": str(weights), "output": str(out)}  # fmt: skip
                    try:
                        seconds = run_child(spec, script=Path(__file__).resolve())["seconds_per_call"]
                    except RuntimeError as e:  # one implementation failing must not lose the rest of the table
                        r["errors"][impl] = str(e)
                        log(f"    failed: {e}")
                        continue
                    got = np.load(out)
                    r["img_per_s"][impl] = batch / statistics.median(seconds)
                    r["blocks"][impl] = [batch / s for s in seconds]
                    r["same_top1"][impl] = float((got.argmax(1) == reference.argmax(1)).mean())
                    r["max_diff"][impl] = float(np.abs(got - reference).max())
                    log(f"    {r['img_per_s'][impl]:.1f} img/s (median of {len(seconds)} blocks)")
                ips = r["img_per_s"]
                if "int8_ours" in ips and CONTROL in ips:
                    r["control"] = ips["int8_ours"] / ips[CONTROL]
                results[name][batch] = r
                shutil.rmtree(Path(tmp) / f"{key}-b{batch}", ignore_errors=True)
    meta = machine() | {
        "threads": args.threads,
        "quick": args.quick,
        "calibration_images": args.calib_images,
        "method": f"one process per implementation (benchmarks/compare.py's run_child), {WAITS[args.wait]}, "
        f"{args.blocks} blocks of ~{args.block_s} s with {args.pause_s} s pauses, median block; onnxruntime "
        f"ORT_ENABLE_ALL; A/A control tolerance {CONTROL_TOLERANCE}",
        "command": " ".join(["python", *sys.argv]),
    }
    day = datetime.date.today().isoformat()
    stem = Path(args.out) / f"int8-speed-{cpu_kind()}-{day}{'-quick' if args.quick else ''}"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    table = speed_markdown(results, meta)
    Path(f"{stem}.md").write_text(table)
    Path(f"{stem}.json").write_text(json.dumps({"results": results, "meta": meta}, indent=1) + "\n")
    log(f"wrote {stem}.md, .json")
    print(table)
    return 0


def speed_markdown(results: dict, meta: dict) -> str:
    head = ["batch", *(LABELS[i] for i in (*IMPLS, CONTROL)), "A/A"]
    lines = [
        f"# int8 ONNX speed ({meta['cpu']}, {meta['threads']} threads, onnxruntime {meta['onnxruntime']}, torch "
        f"{meta['torch']}){' QUICK SMOKE RUN: numbers meaningless' if meta['quick'] else ''}",
        "",
        "Cells: img/s (batch 1: ms per image) and, in brackets, int8 ours' speed / that implementation's (> 1: our "
        "int8 is faster). A/A: int8 ours / int8 ours timed in another process (should read 1.00 +- "
        f"{CONTROL_TOLERANCE}; `(!)` where it does not and the row does not hold). Method: {meta['method']}.",
        "",
    ]
    unsteady = []
    for model, by_batch in results.items():
        lines += [f"## {model}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for batch, r in by_batch.items():
            ips, ours = r["img_per_s"], r["img_per_s"].get("int8_ours")
            cells = [str(batch)]
            for impl in (*IMPLS, CONTROL):
                if impl not in ips:
                    cells.append("failed" if impl in r["errors"] else "-")
                    continue
                v = f"{1e3 / ips[impl]:.2f} ms" if int(batch) == 1 else f"{ips[impl]:.1f}"
                cells.append(v + (f" ({ours / ips[impl]:.2f}x)" if ours and impl not in ("int8_ours", CONTROL) else ""))
            control = r.get("control")
            bad = control is not None and abs(control - 1) > CONTROL_TOLERANCE
            cells.append("-" if control is None else f"{control:.2f}{' (!)' if bad else ''}")
            if bad:
                unsteady.append(f"{model} batch {batch} ({control:.2f})")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if unsteady:
        lines[1:1] = ["", f"**WARNING: the A/A control is outside 1 +- {CONTROL_TOLERANCE} in {', '.join(unsteady)}: "
                      "those rows do not hold (a busy or unsteady machine); rerun on an idle one.**"]  # fmt: skip
    lines += ["## Outputs against the eager float32 model (same top-1 on the timed images; max |logit diff|)", ""]
    for model, by_batch in results.items():
        for batch, r in by_batch.items():
            cells = [f"{LABELS[i]} {100 * r['same_top1'][i]:.0f}% / {r['max_diff'][i]:.2g}" for i in r["same_top1"]]
            lines.append(f"- {model} batch {batch}: {', '.join(cells)}")
    errors = [(m, b, i, e) for m, bs in results.items() for b, r in bs.items() for i, e in r["errors"].items()]
    if errors:
        lines += ["", "## Failures", ""] + [f"- {m} batch {b} {LABELS[i]}: {e}" for m, b, i, e in errors]
    lines += ["", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="part", required=True)
    a = sub.add_parser("accuracy", help="top-1 of the checkpoint, the float32 and the int8 ONNX on held-out images")
    held_out = "a run folder and its held-out data (a folder or a dataset name, as `convnext eval --data`)"
    a.add_argument("--pair", nargs=2, action="append", required=True, metavar=("RUN", "DATA"), help=held_out)
    a.add_argument("--calib-images", type=int, default=None, help="passed to `convnext export --int8` (its default)")
    a.add_argument("--batch", type=int, default=64, help="eval batch")
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    s = sub.add_parser("speed", help="int8 ours against ORT's int8, ORT fp32 and ours fp32/bf16, one process each")
    s.add_argument("--run", required=True, help="a run folder: its model, weights, size and calibration images")
    s.add_argument("--tiny", action="store_true", help="also convnext_tiny at 224 (random weights)")
    s.add_argument("--calib-images", type=int, default=128, help="calibration images (also the timed inputs)")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--blocks", type=int, default=7, help="timed blocks per implementation (the median counts)")
    s.add_argument("--block-s", type=float, default=1.0, help="seconds of calls in a row per block")
    s.add_argument("--pause-s", type=float, default=0.5, help="sleep before each block (threads park)")
    s.add_argument("--wait", choices=list(WAITS), default="spin", help="idle threads between calls: each "
                   "runtime's default (spin), or parked (passive)")  # fmt: skip
    s.add_argument("--quick", action="store_true", help="batches 1 and 2, convnext_tiny at 32 px, 2 short blocks, "
                   "optimize without compiling: proves the pipeline, numbers meaningless")  # fmt: skip
    s.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.part == "speed":
        if not (Path(args.run) / "config.json").is_file():
            p.error(f"--run {args.run}: not a training run folder (no config.json)")
        if args.threads < 1 or args.blocks < 1 or args.block_s < 0 or args.pause_s < 0 or args.calib_images < 32:
            p.error("--threads and --blocks must be >= 1, --block-s and --pause-s >= 0, --calib-images >= 32")
        if args.quick:
            args.blocks, args.block_s, args.pause_s = 2, 0.0, 0.0
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(child(json.loads(argv[1]))))
        return 0
    args = parse_args(argv)
    return accuracy(args) if args.part == "accuracy" else speed(args)


if __name__ == "__main__":
    sys.exit(main())
