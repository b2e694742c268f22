"""`convnext` command line: argument parsing only; every command calls a library function.

Each command family lives in its own module with `add_commands(subparsers)`; each parser sets `func`,
which takes the parsed namespace and returns an exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from convnext.cli import core, dense, deploy, infer, pretrain, roadmap, train, weights
from convnext.engine import interrupt

FAMILIES = [core, roadmap, train, pretrain, weights, infer, deploy, dense]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convnext", description="ConvNeXt V1/V2: build, train, evaluate, export.")
    _verbosity(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for family in FAMILIES:
        family.add_commands(sub)
    for command in sub.choices.values():  # also after the command (`convnext list -v`), not overriding one before
        _verbosity(command, argparse.SUPPRESS)
    return parser


def _verbosity(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging, tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="warnings and errors only")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    if args.verbose and args.quiet:
        parser.error("-v/--verbose and -q/--quiet exclude each other")
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s")
    try:
        with interrupt.catching():  # a Ctrl-C swallowed by a finaliser still stops training at the next step
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        run = getattr(args, "resume", None) or getattr(args, "output", None)
        where = f"; {run} keeps its last checkpoint: continue with --resume {run}" if run and args.command in (
            "train", "pretrain", "detect", "segment") and (Path(run) / "last.pt").exists() else ""  # fmt: skip
        print(f"convnext {args.command}: interrupted{where}", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        # One clear line for bad input; the traceback only with -v.
        if args.verbose:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"convnext {args.command}: error: {worker_error(str(msg))}", file=sys.stderr)
        return 2


def worker_error(msg: str) -> str:
    """A DataLoader worker's error arrives wrapped with the worker's traceback ("Caught X in DataLoader worker
    process 0. Original Traceback ..."): keep the error's own last line, which names the file."""
    if "Original Traceback" not in msg:
        return msg
    last = [line for line in msg.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
