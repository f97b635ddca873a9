"""Argument types of the command line (`demo`, `bench`): each turns a bad value into
argparse's one-line usage error naming the option, never a traceback."""

from __future__ import annotations

import argparse

import torch

from .patterns import PATTERNS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def positive_list(text: str) -> list[int]:
    values = [positive(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated positive integers")
    return values


def pattern_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    bad = [v for v in values if v not in PATTERNS]
    if bad or not values:
        raise argparse.ArgumentTypeError(
            f"{bad or text!r} is not a supported pattern {sorted(PATTERNS)}")
    return values


def dtype_list(text: str) -> list[torch.dtype]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in DTYPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"{', '.join(bad) or repr(text)}: choose from {', '.join(DTYPES)}")
    return [DTYPES[n] for n in names]


def dtype_names(text: str) -> str:
    """`dtype_list`'s check, keeping the text (the bench passes it on as it is)."""
    dtype_list(text)
    return text
