"""Weight commands: `convert` (between state-dict layouts, or into a transformers folder), `download` (into the
cache) and `push` (to the Hugging Face Hub)."""

from __future__ import annotations

import argparse
from pathlib import Path

LAYOUT_CHOICES = ("ours", "official", "timm", "torchvision", "hf")
SOURCE_HELP = "a training run (folder, best.pt or last.pt), a pretrained folder, an hf-hub:ORG/NAME or a weight file"
NETWORK_HELP = ("Every request waits at most $CONVNEXT_TIMEOUT seconds (default 30) to connect and between two reads "
                "of the answer; giving up is one line naming the endpoint.")  # fmt: skip


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between layouts (any layout in, safetensors or .pth out)")
    p.add_argument("src", help="weight file (.pth/.pt/.bin/.safetensors, or a Hugging Face model folder); with --to "
                   "hf and a folder DST also " + SOURCE_HELP)  # fmt: skip
    p.add_argument("dst", help="output file: .safetensors, or .pth/.pt for torch.save; with --to hf a folder name "
                   "writes a folder transformers' from_pretrained loads")  # fmt: skip
    p.add_argument("--to", choices=LAYOUT_CHOICES, default="ours", help="layout to write (default: ours)")
    p.add_argument("--model", help="registered model the weights must load into (checked before writing)")
    p.add_argument("--ema", action="store_true", help="take the EMA weights when the file has both")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("download", help="download published weights into the cache, checking their sha256",
                       epilog=f"{NETWORK_HELP} A download that fails on the way (no answer, a dropped connection, a "
                       "short body, HTTP 5xx) is retried; only a whole, verified file is kept.")  # fmt: skip
    p.add_argument("name", help="arch.tag, or arch for its default weights (see `convnext list --pretrained`)")
    p.add_argument("--cache-dir", default=None, help="default: $CONVNEXT_HOME/weights or ~/.cache/convnext/weights")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("push", help="upload a run or weights to the Hugging Face Hub (safetensors, config, model card)",
                       epilog=f"{NETWORK_HELP} A push is not repeated (a commit is not safe to repeat); HF_ENDPOINT "
                       "names another Hub.")  # fmt: skip
    p.add_argument("src", metavar="RUN_OR_FILE", help=SOURCE_HELP)
    p.add_argument("--repo", default=None, metavar="ORG/NAME", help="the Hub repo (created if missing)")
    p.add_argument("--model", default=None, help="weight file: the registered name it loads into (default: its shapes)")
    p.add_argument("--ema", action="store_true", help="push the EMA weights")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to commit to (made if missing; default: main)")
    p.add_argument("--token", default=None, help="write token (default: HF_TOKEN or the saved `hf auth login`)")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--save-dir", default=None, help="also keep the folder here (without --repo: only write it)")
    p.add_argument("--force", action="store_true", help="--save-dir: replace the files already there")
    p.set_defaults(func=cmd_push)


def cmd_convert(args: argparse.Namespace) -> int:
    from convnext.resolve import WEIGHT_SUFFIXES, resolve
    from convnext.weights import detect_layout, from_ours, read_state_dict, save_weights, to_ours

    dst = Path(args.dst)
    if args.to == "hf" and dst.suffix not in WEIGHT_SUFFIXES:  # `--to hf` into anything else writes a folder
        return _convert_to_hf_folder(args)
    if dst.exists() and not args.force:
        raise ValueError(f"{dst}: already exists; pass --force to replace it")
    sd = read_state_dict(args.src, ema=args.ema)
    layout = detect_layout(sd)
    ours = to_ours(sd, layout)
    if args.model:  # the weights must load into the model they name (its classes, input channels), strictly
        resolve(args.src, model=args.model, ema=args.ema)
    out = from_ours(ours, args.to)
    meta = {"format": "pt", "layout": args.to, "source": Path(args.src).name, "source_layout": layout}
    save_weights(out, dst, metadata=meta, force=args.force, wrap_key="model" if args.to == "official" else None)
    print(f"{args.src} ({layout} layout, {len(sd)} tensors) -> {dst} ({args.to} layout, {len(out)} tensors)")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    import warnings

    from convnext.registry import split_name
    from convnext.weights import fetch, resolve_spec

    spec = resolve_spec(*split_name(args.name))
    if spec.non_commercial:
        warnings.warn(f"{spec.name}: the weights are licensed {spec.license}: non-commercial use only", stacklevel=1)
    print(fetch(spec, args.cache_dir))
    return 0


def _convert_to_hf_folder(args: argparse.Namespace) -> int:
    from convnext.publish import FOLDER_FILES, check_folder, pretrained_files, write_folder
    from convnext.resolve import resolve

    check_folder(args.dst, FOLDER_FILES[:3], args.force)  # before any work
    src = resolve(args.src, model=args.model, ema=args.ema)
    texts, weights = pretrained_files(src, transformers=True)
    written = write_folder(args.dst, texts, weights, force=args.force)
    kind = texts["config.json"]["architectures"][0]
    print(f"{args.src} -> {args.dst} (transformers {kind}: {', '.join(p.name for p in written)})")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    import tempfile

    from convnext.publish import (
        FOLDER_FILES,
        check_folder,
        check_repo_id,
        model_card,
        pretrained_files,
        push_files,
        push_token,
        write_folder,
    )
    from convnext.resolve import resolve

    if not (args.repo or args.save_dir):
        raise ValueError("give --repo ORG/NAME to push (or --save-dir DIR to only write the folder)")
    if args.repo:  # before any work
        check_repo_id(args.repo)
    token = push_token(args.token) if args.repo else None
    if args.save_dir:
        check_folder(args.save_dir, FOLDER_FILES, args.force)
    src = resolve(args.src, model=args.model, ema=args.ema)
    texts, weights = pretrained_files(src)
    with_hf = "model_type" in texts["config.json"]
    card = model_card(args.repo or Path(args.save_dir).resolve().name, src, with_hf)
    with tempfile.TemporaryDirectory(prefix="convnext-push-") as tmp:
        folder = Path(args.save_dir) if args.save_dir else Path(tmp) / "repo"
        files = write_folder(folder, texts, weights, force=args.force, extra={"README.md": card})
        if args.save_dir:
            print(f"wrote {folder}: {', '.join(p.name for p in files)}")
        if args.repo:
            url = push_files(files, args.repo, args.private, args.revision, token, args.message)
            print(f"pushed {args.src} to {args.repo}: {url}")
    return 0
