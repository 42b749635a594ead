"""argparse value checks and arguments shared by the `llamas` subcommands."""
from __future__ import annotations

import argparse
import math

from .dtypes import COMPUTE_DTYPES, KV_DTYPES, WEIGHT_DTYPES


def _parse(text: str, kind, expected: str):
    """kind(text), or an argparse error naming what was expected: argparse's own message for a
    ValueError names the function ("invalid positive_int value"), not what the flag takes."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _parse(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _parse(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def finite_float(text: str) -> float:
    value = _parse(text, float, "a number >= 0")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _parse(text, float, "a number > 0")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def port_number(text: str) -> int:
    value = _parse(text, int, "a port number in [0, 65535]")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [0, 65535], got {value}")
    return value


def add_engine_args(p: argparse.ArgumentParser, model_help: str) -> None:
    """The model and batching options a command that runs requests through an Engine takes
    (serve, run-batch): --model, --dtype, --kv-dtype, --compute-dtype, --threads, --max-batch,
    --max-tokens, --kv-cache-mb."""
    p.add_argument("--model", default=None, metavar="DIR", help=model_help)
    add_dtype_args(p)
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--max-batch", type=positive_int, default=16,
                   help="sequences decoded together in one batched step (default 16)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="largest max_tokens a request may ask for (default: the model's context length)")
    p.add_argument("--kv-cache-mb", type=positive_float, default=None, metavar="MB",
                   help="KV cache the running requests may fill, in MiB: each is admitted with room for its prompt + "
                        "max_tokens reserved, the rest wait in the queue, and one that could never fit gets a 400 "
                        "(default: no limit when --max-batch sequences at the full context fit in half of the "
                        "memory the weights leave, else that half)")


def add_dtype_args(p: argparse.ArgumentParser) -> None:
    """--dtype, --kv-dtype and --compute-dtype, as llamas.load takes them (generate, bench, eval,
    and through add_engine_args serve, run-batch)."""
    p.add_argument("--dtype", default="float32", choices=WEIGHT_DTYPES,
                   help="weight precision (bfloat16 halves the bytes read per token; int8 quantizes them at "
                        "load to 1.125 bytes a weight)")
    p.add_argument("--kv-dtype", default=None, choices=KV_DTYPES,
                   help="KV-cache precision (default: same as --dtype, bfloat16 for int8; bfloat16 halves the cache's memory "
                        "and the bytes attention reads per token; int8 quarters them)")
    p.add_argument("--compute-dtype", default="float32", choices=COMPUTE_DTYPES,
                   help="precision of the matrix products' activations (bfloat16 needs --dtype bfloat16 or int8; "
                        "about twice the prefill speed on CPUs with AVX512_BF16; int8 needs --dtype int8: "
                        "W8A8, faster still on CPUs with AVX512_VNNI)")
