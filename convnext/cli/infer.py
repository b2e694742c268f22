"""Inference commands: `eval`, `predict`, `export`, `bench`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from convnext.cli.args import positive_int

MODEL_HELP = ("registered name (convnext_tiny, convnext_tiny.fb_in1k), a training run folder or its best.pt / last.pt, "
              "a weight file, a pretrained folder or hf-hub:ORG/NAME")  # fmt: skip


def _model_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--checkpoint", default=None, help="weights in any layout loaded into MODEL (or alone: any source)")
    p.add_argument("--pretrained", action="store_true", help="load the name's published weights")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: cuda when available)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="top-1/top-5, loss, per-class accuracy and confusion matrix on a dataset")
    _model_args(p)
    p.add_argument("--data", required=True, help="image folder (its val/ split if any), cifar10, cifar100 or digits")
    p.add_argument("--data-dir", default=None, help="where cifar10/cifar100 live")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--img-size", type=positive_int, default=None, help="override the weights' / run's eval size")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast dtype")
    p.add_argument("--no-ema", action="store_true", help="skip the run's EMA weights")
    p.add_argument("--map-classes", action="store_true",
                   help="when the data's class names share none with the model's (ImageNet wnid folders for a model "
                        "named by words), score the i-th class in sorted order as the model's i-th (same count); "
                        "without it such data is refused.")  # fmt: skip
    p.add_argument("--output-dir", default=None, help="write metrics.json and confusion.png here (run: RUN/eval-DATA)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top-k classes of images or folders of images")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and folders (searched recursively)")
    _model_args(p, positional=False)
    p.add_argument("--topk", type=positive_int, default=5)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--img-size", type=positive_int, default=None)
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--json", action="store_true", help="one JSON object per image (JSON lines)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="ONNX / TorchScript / ExportedProgram, checked against eager PyTorch")
    _model_args(p)
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "exported-program"])
    p.add_argument("--output", required=True, help="file to write (.onnx, .pt, .pt2)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="norms stay fp32 in fp16/bf16")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size (checked at two)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="traced batch (fixed unless --dynamic-batch)")
    p.add_argument("--img-size", type=positive_int, default=None, help="input size (default: the weights' / run's)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (17 or newer)")
    p.add_argument("--atol", type=float, default=None, help="tolerance relative to max(1, max |logit|)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="images/s, latency, peak memory and share of the measured matmul peak")
    _model_args(p)
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


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _amp(name: str):
    import torch

    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _resolve(args: argparse.Namespace, ema: bool = False, img_size: int | None = None):
    """What the model and --checkpoint arguments name (`convnext.resolve`): a checkpoint is loaded into the model
    named beside it, or, alone, is the source."""
    from convnext.resolve import resolve

    if args.checkpoint is not None:
        return resolve(args.checkpoint, model=args.model, ema=ema, img_size=img_size)
    if args.model is None:
        raise ValueError("name a model (a registered name, a run folder, a weight file, an hf-hub: repo) or give "
                         "--checkpoint")  # fmt: skip
    return resolve(args.model, pretrained=args.pretrained, ema=ema, img_size=img_size)


def _warn_random(loaded) -> None:
    if loaded.random:
        print(
            f"warning: {loaded.name} has random weights; pass --pretrained, --checkpoint FILE or a run folder",
            file=sys.stderr,
        )


def cmd_eval(args: argparse.Namespace) -> int:
    from convnext.infer import run_eval

    loaded = _resolve(args, img_size=args.img_size)
    _warn_random(loaded)
    with_ema = not args.no_ema and loaded.run is not None and bool(loaded.run.get("ema"))  # a run that kept one
    ema = _resolve(args, ema=True, img_size=args.img_size).model if with_ema else None
    tag = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(args.data).name) or "data"
    output_dir = args.output_dir or (loaded.run_dir / f"eval-{tag}" if loaded.run_dir else None)
    kwargs = {"data_dir": args.data_dir} if args.data_dir else {}
    device = _device(args.device)
    for model in (loaded.model, ema):
        if model is not None:
            model.to(device)
    summary = run_eval(
        loaded,
        args.data,
        batch_size=args.batch_size,
        workers=args.workers,
        device=device,
        amp_dtype=_amp(args.amp),
        output_dir=output_dir,
        progress=True,
        ema=ema,
        map_classes=args.map_classes,
        **kwargs,
    )
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{summary['model']} on {summary['data']}: {summary['n']} images")
    rows = [("model", summary)] + ([("EMA", summary["ema"])] if "ema" in summary else [])
    for label, r in rows:
        print(f"  {label:6s} top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  loss {r['loss']:.4f}")
    worst = sorted((v, k) for k, v in summary["per_class_accuracy"].items() if v is not None)[:5]
    print("  lowest per-class accuracy: " + ", ".join(f"{k} {v:.1f}%" for v, k in worst))
    if "confusion_png" in summary:
        print(f"  confusion matrix: {summary['confusion_png']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from convnext.infer import predict

    loaded = _resolve(args, img_size=args.img_size)
    _warn_random(loaded)
    loaded.model.to(_device(args.device))
    ok = failed = 0
    for r in predict(
        loaded,
        args.inputs,
        topk=args.topk,
        batch_size=args.batch_size,
        workers=args.workers,
        device=_device(args.device),
        amp_dtype=_amp(args.amp),
        progress=True,
    ):
        failed += "error" in r
        ok += "error" not in r
        if args.json:
            print(json.dumps(r), flush=True)
        elif "error" in r:
            print(f"{r['path']}: ERROR {r['error']}", flush=True)
        else:
            print(f"{r['path']}: " + ", ".join(f"{t['label']} ({t['prob']:.3f})" for t in r["topk"]), flush=True)
    if failed:
        print(f"{failed} of {ok + failed} images could not be read", file=sys.stderr)
    return 0 if ok or not failed else 1


def cmd_export(args: argparse.Namespace) -> int:
    from convnext.export import ParityError, export_model
    from convnext.flops import in_chans_of

    loaded = _resolve(args, img_size=args.img_size)
    try:
        r = export_model(
            loaded.model,
            args.format,
            args.output,
            img_size=loaded.preprocess.img_size,
            in_chans=in_chans_of(loaded.model),
            batch_size=args.batch_size,
            dynamic_batch=args.dynamic_batch,
            dtype=args.dtype,
            force=args.force,
            atol=args.atol,
            opset=args.opset,
        )
    except FileExistsError as e:
        print(f"convnext export: error: {e}", file=sys.stderr)
        return 2
    except ParityError as e:
        print(f"convnext export: parity check FAILED: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r.as_dict()))
    else:
        batch = "dynamic" if args.dynamic_batch else str(args.batch_size)
        print(f"wrote {r.path} ({r.format}, {r.dtype}, batch {batch}, {loaded.preprocess.img_size}px)")
        print(
            f"  parity vs eager PyTorch at batch {', '.join(map(str, r.batch_sizes))}: max |diff| {r.max_diff:.3g} "
            f"(tolerance {r.tolerance:.3g}); vs the fp32 model {r.max_diff_vs_fp32:.3g}"
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from convnext.bench import benchmark, format_result

    if args.threads:
        torch.set_num_threads(args.threads)
    from convnext.registry import split_name

    model = args.model
    named = model and not (args.checkpoint or args.pretrained or Path(model).exists())
    if named and not model.startswith("hf-hub:"):
        model = split_name(model)[0]  # timing needs no weights: do not download a tag's
    loaded = _resolve(argparse.Namespace(**{**vars(args), "model": model}))
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
        device=_device(args.device),
        warmup=args.warmup,
        runs=args.runs,
        grad_checkpointing=not args.no_grad_ckpt,
    )
    print(json.dumps(r.as_dict()) if args.json else format_result(r))
    return 0
