"""Argument types shared by the command families: counts and sizes that must be positive."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1 (`--epochs`, `--batch-size`, `--img-size`, `--topk`)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """A number > 0 (`--budget-min`)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value
