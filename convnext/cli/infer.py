"""Inference commands: `eval` and `predict`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from convnext.cli.args import (
    MODEL_HELP,
    add_model_args,
    amp_dtype,
    device_of,
    positive_int,
    resolve_args,
    warn_random,
    workers_for,
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="top-1/top-5, loss, per-class accuracy and confusion matrix on a dataset")
    add_model_args(p)
    p.add_argument("--data", required=True, help="image folder (its val/ split if any), cifar10, cifar100 or digits")
    p.add_argument("--data-dir", default=None, help="where cifar10/cifar100 live")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (default: 0 on the CPU, "
                   "the cores on a GPU)")  # fmt: skip
    p.add_argument("--img-size", type=positive_int, default=None, help="override the weights' / run's eval size")
    p.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"], default="auto",
                   help="autocast dtype (auto: bf16 on a GPU that has it, none on the CPU)")  # fmt: skip
    p.add_argument("--no-ema", action="store_true", help="skip the run's EMA weights")
    p.add_argument("--map-classes", action="store_true",
                   help="when the data's class names share none with the model's (ImageNet wnid folders for a model "
                        "named by words), score the i-th class in sorted order as the model's i-th (same count); "
                        "without it such data is refused.")  # fmt: skip
    p.add_argument("--tta", action="store_true", help="average the logits over the image and its mirror (and the "
                   "shifts of the run's data.tta_shift); shows top-1 without it too")  # fmt: skip
    p.add_argument("--pairs", type=positive_int, default=5, help="most confused pairs shown with examples (5)")
    p.add_argument("--output-dir", default=None, help="write the report (metrics.json, confusion, reliability and "
                   "most-confused PNGs) here (run: RUN/eval-DATA)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top-k classes of images or folders of images")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and folders (searched recursively)")
    add_model_args(p, positional=False)
    p.add_argument("--topk", type=positive_int, default=5)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (default: 0 on the CPU, "
                   "the cores on a GPU)")  # fmt: skip
    p.add_argument("--img-size", type=positive_int, default=None)
    p.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"], default="auto")
    p.add_argument("--json", action="store_true", help="one JSON object per image (JSON lines)")
    p.add_argument("--tta", action="store_true", help="average over the image and its mirror (and the run's shifts)")
    p.add_argument("--features", default=None, metavar="OUT", help="write the pooled features as OUT.npy (float32, "
                   "N x C) and the index OUT.csv (path, label, prob)")  # fmt: skip
    p.add_argument("--cam", action="store_true", help="write a Grad-CAM overlay PNG per image (last stage)")
    p.add_argument(
        "--cam-class", default=None, metavar="NAME", help="the class the maps are for (default: the top one)"
    )
    p.add_argument("--cam-dir", default="cam", metavar="DIR", help="where the overlays go (cam/; new or empty)")
    p.add_argument("--cam-method", choices=["gradcam", "gradcam++"], default="gradcam")
    p.add_argument("--force", action="store_true", help="overwrite --features files, write into a non-empty --cam-dir")
    p.set_defaults(func=cmd_predict)


def cmd_eval(args: argparse.Namespace) -> int:
    from convnext.infer import run_eval

    loaded = resolve_args(args, img_size=args.img_size)
    warn_random(loaded)
    with_ema = not args.no_ema and loaded.run is not None and bool(loaded.run.get("ema"))  # a run that kept one
    ema = resolve_args(args, ema=True, img_size=args.img_size).model if with_ema else None
    tag = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(args.data).name) or "data"
    output_dir = args.output_dir or (loaded.run_dir / f"eval-{tag}" if loaded.run_dir else None)
    kwargs = {"data_dir": args.data_dir} if args.data_dir else {}
    device = device_of(args.device)
    for model in (loaded.model, ema):
        if model is not None:
            model.to(device)
    summary = run_eval(
        loaded,
        args.data,
        batch_size=args.batch_size,
        workers=workers_for(args.workers, device_of(args.device)),
        device=device,
        amp_dtype=amp_dtype(args.amp, device_of(args.device)),
        output_dir=output_dir,
        progress=True,
        ema=ema,
        map_classes=args.map_classes,
        tta=args.tta,
        pairs=args.pairs,
        **kwargs,
    )
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{summary['model']} on {summary['data']}: {summary['n']} images")
    rows = [("model", summary)] + ([("EMA", summary["ema"])] if "ema" in summary else [])
    for label, r in rows:
        print(f"  {label:6s} top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  loss {r['loss']:.4f}")
        if "tta" in r:
            t = r["tta"]
            print(f"  {'':6s} TTA over {t['views']} views: top-1 {r['top1']:.2f}% vs {t['top1_without']:.2f}% "
                  f"without ({t['gain']:+.2f})")  # fmt: skip
    print(f"  macro-F1 {summary['macro_f1']:.4f}  balanced accuracy {summary['balanced_accuracy']:.4f}  "
          f"ECE {summary['ece']:.4f}")  # fmt: skip
    worst = sorted((v, k) for k, v in summary["per_class_accuracy"].items() if v is not None)[:5]
    print("  lowest per-class accuracy: " + ", ".join(f"{k} {v:.1f}%" for v, k in worst))
    if "confusion_png" in summary:
        print(f"  report: {Path(summary['confusion_png']).parent}/ (metrics.json, confusion, reliability, most "
              "confused PNGs)")  # fmt: skip
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from convnext.infer import predict

    loaded = resolve_args(args, img_size=args.img_size)
    cam = _cam_request(args, loaded)  # every output checked before any image is read
    if args.features:
        from convnext.cam import check_cam_model
        from convnext.features import check_writable, features_files

        check_cam_model(loaded.model, loaded.name, flag="--features")
        check_writable(features_files(args.features), "--features", force=args.force)
    warn_random(loaded)
    loaded.model.to(device_of(args.device))
    ok = failed = 0
    kept = []
    for r in predict(
        loaded,
        args.inputs,
        topk=args.topk,
        batch_size=args.batch_size,
        workers=workers_for(args.workers, device_of(args.device)),
        device=device_of(args.device),
        amp_dtype=amp_dtype(args.amp, device_of(args.device)),
        progress=True,
        tta=args.tta,
        features=bool(args.features),
        cam=cam,
    ):
        failed += "error" in r
        ok += "error" not in r
        if "features" in r:
            kept.append(r)
            r = {k: v for k, v in r.items() if k != "features"}
        if args.json:
            print(json.dumps(r), flush=True)
        elif "error" in r:
            print(f"{r['path']}: ERROR {r['error']}", flush=True)
        else:
            print(f"{r['path']}: " + ", ".join(f"{t['label']} ({t['prob']:.3f})" for t in r["topk"]), flush=True)
    if args.features:
        from convnext.features import write_features

        npy, index = write_features(kept, args.features)
        print(f"features of {len(kept)} images: {npy} ({index})", file=sys.stderr)
    if cam is not None and ok:
        print(f"class activation maps: {cam.folder}/", file=sys.stderr)
    if failed:
        print(f"{failed} of {ok + failed} images could not be read", file=sys.stderr)
    return 0 if ok or not failed else 1


def _cam_request(args: argparse.Namespace, loaded):
    """`--cam` and its flags, checked: the model has spatial maps, the class exists, the folder takes files."""
    if not args.cam:
        if args.cam_class is not None:
            raise ValueError("--cam-class needs --cam")
        return None
    from convnext.cam import check_cam_folder, check_cam_model
    from convnext.infer import CamRequest, class_index

    check_cam_model(loaded.model, loaded.name)
    index = class_index(loaded, args.cam_class) if args.cam_class is not None else None
    check_cam_folder(Path(args.cam_dir), force=args.force)
    return CamRequest(Path(args.cam_dir), index, args.cam_method)
