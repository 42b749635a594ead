"""argparse value checks and arguments shared by the `llamas` subcommands."""
from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def add_dtype_args(p: argparse.ArgumentParser) -> None:
    """--dtype and --kv-dtype, as llamas.load takes them (generate, bench, serve)."""
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weight precision (bfloat16 halves the bytes read per token)")
    p.add_argument("--kv-dtype", default=None, choices=["float32", "bfloat16"],
                   help="KV-cache precision (default: same as --dtype; bfloat16 halves the cache's memory "
                        "and the bytes attention reads per token)")
