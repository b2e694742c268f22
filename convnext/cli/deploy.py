"""Deployment commands: `export` (ONNX / TorchScript / ExportedProgram) and `bench`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from convnext.cli.args import add_model_args, device_of, positive_int, resolve_args


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="ONNX / TorchScript / ExportedProgram, checked against eager PyTorch")
    add_model_args(p)
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "exported-program"])
    p.add_argument("--output", required=True, help="file to write (.onnx, .pt, .pt2)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="norms stay fp32 in fp16/bf16")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size (checked at two)")
    p.add_argument("--dynamic-size", action="store_true", help="onnx: any height and width (checked at two sizes)")
    p.add_argument("--int8", action="store_true", help="onnx: int8 post-training static quantization")
    p.add_argument("--calib", default=None, metavar="DIR", help="--int8: calibration images (default: the run's data)")
    p.add_argument("--calib-images", type=positive_int, default=None, help="--int8: how many (default 128)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="traced batch (fixed unless --dynamic-batch)")
    p.add_argument("--img-size", type=positive_int, default=None, help="input size (default: the weights' / run's)")
    p.add_argument("--opset", type=int, default=20, help="ONNX opset (17 or newer; from 20 GELU is one op)")
    p.add_argument("--atol", type=float, default=None, help="tolerance relative to max(1, max |logit|)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="images/s, latency, peak memory and share of the measured matmul peak")
    add_model_args(p)
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--img-size", type=positive_int, default=224)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--impl", choices=["fast", "eager"], default="fast", help="fast: convnext.optimize (default)")
    p.add_argument("--channels-last", action="store_true", help="eager: channels_last weights and input")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on for fast")
    p.add_argument("--train", action="store_true", help="a full training step (fwd + bwd + AdamW)")
    p.add_argument("--no-grad-ckpt", action="store_true", help="--train: skip the gradient-checkpointing run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)


def _export_flag_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the export flags together (before anything is loaded), or None."""
    from convnext.resolve import is_run_dir

    source = args.checkpoint or args.model or ""
    if Path(source).suffix == ".onnx":
        return f"{source} is an ONNX file already: export the checkpoint or run it was made from"
    if args.dynamic_size and args.format != "onnx":
        return f"--dynamic-size needs --format onnx (a {args.format} file is checked at one input size only)"
    if args.int8 and (args.format != "onnx" or args.dtype != "fp32"):
        return "--int8 needs --format onnx and --dtype fp32 (it quantizes the float32 ONNX export)"
    if (args.calib or args.calib_images) and not args.int8:
        return "--calib and --calib-images go with --int8"
    if args.int8 and not args.calib and not (is_run_dir(source) or is_run_dir(Path(source).parent)):
        return f"--int8 needs calibration images: give --calib DIR, or a training run (not {source or 'nothing'})"
    return None


def cmd_export(args: argparse.Namespace) -> int:
    from convnext.export import ParityError, deploy_metadata, export_model
    from convnext.flops import in_chans_of

    error = _export_flag_error(args)
    if error:
        print(f"convnext export: error: {error}", file=sys.stderr)
        return 2
    loaded = resolve_args(args, img_size=args.img_size)
    options = dict(
        in_chans=in_chans_of(loaded.model),
        batch_size=args.batch_size,
        dynamic_batch=args.dynamic_batch,
        dynamic_size=args.dynamic_size,
        force=args.force,
        atol=args.atol,
        opset=args.opset,
    )
    metadata = deploy_metadata(loaded, args.dynamic_size) if args.format == "onnx" else None
    try:
        if args.int8:
            from convnext.quantize import calibration_images, export_int8

            images = calibration_images(loaded.preprocess, args.calib_images or 128, args.calib, loaded.run)
            source = f" from {args.calib}" if args.calib else " from the run's training images"
            q = export_int8(loaded.model, args.output, images, metadata, source=source, **options)
            r = q.fp32
        else:
            r = export_model(loaded.model, args.format, args.output, img_size=loaded.preprocess.img_size,
                             dtype=args.dtype, metadata=metadata, **options)  # fmt: skip
    except FileExistsError as e:
        print(f"convnext export: error: {e}", file=sys.stderr)
        return 2
    except ParityError as e:
        print(f"convnext export: parity check FAILED: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(q.as_dict() if args.int8 else r.as_dict()))
        return 0
    batch = "dynamic" if args.dynamic_batch else str(args.batch_size)
    size = "dynamic size" if args.dynamic_size else f"{loaded.preprocess.img_size}px"
    print(f"wrote {args.output} ({r.format}, {'int8' if args.int8 else r.dtype}, batch {batch}, {size})")
    print(
        f"  parity vs eager PyTorch at batch {', '.join(map(str, r.batch_sizes))}, {', '.join(map(str, r.sizes))}px"
        f"{' (the float32 file before quantization)' if args.int8 else ''}: max |diff| {r.max_diff:.3g} (tolerance "
        f"{r.tolerance:.3g}); vs the fp32 model {r.max_diff_vs_fp32:.3g}"
    )
    if args.int8:
        print(
            f"  int8 vs float32 on its {q.calibration_images} calibration images: same top-1 on "
            f"{100 * q.agreement:.1f}%, max |logit diff| {q.max_diff:.3g}"
        )
    if metadata:
        print(f"  metadata: {len(loaded.classes or [])} class names, preprocessing {loaded.preprocess}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from convnext.bench import benchmark, format_result

    if Path(args.checkpoint or args.model or "").suffix == ".onnx":
        print("convnext bench: error: bench times PyTorch models; give the checkpoint or run the .onnx came from",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from convnext.registry import split_name

    model = args.model
    named = model and not (args.checkpoint or args.pretrained or Path(model).exists())
    if named and not model.startswith("hf-hub:"):
        model = split_name(model)[0]  # timing needs no weights: do not download a tag's
    loaded = resolve_args(argparse.Namespace(**{**vars(args), "model": model}))
    r = benchmark(
        loaded.model,
        loaded.name,
        batch=args.batch,
        img_size=args.img_size,
        dtype=args.dtype,
        impl=args.impl,
        train=args.train,
        channels_last=args.channels_last,
        compile=args.compile,
        device=device_of(args.device),
        warmup=args.warmup,
        runs=args.runs,
        grad_checkpointing=not args.no_grad_ckpt,
    )
    print(json.dumps(r.as_dict()) if args.json else format_result(r))
    return 0
