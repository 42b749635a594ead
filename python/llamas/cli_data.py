"""`llamas data ...` subcommands: train-tokenizer and prepare."""
from __future__ import annotations

import re
import sys

from ._C import LlamasError

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    r"""Turns the escapes ``\n``, ``\t``, ``\r`` and ``\\`` of a command-line string into characters."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def add_parser(sub) -> None:
    """Registers `llamas data` and its subcommands on the top-level subparsers."""
    d = sub.add_parser("data", help="prepare training data and tokenizers",
                       description="Prepare token shards and train tokenizers.")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="{train-tokenizer,prepare}")

    t = dsub.add_parser(
        "train-tokenizer", help="train a byte-level BPE tokenizer on text files",
        description="Train a GPT-2 style byte-level BPE tokenizer (special token <|endoftext|>) on the "
                    "cleaned documents of FILES and write tokenizer.json, vocab.json, merges.txt and "
                    "tokenizer_config.json to --out.")
    t.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N",
                   help="vocabulary size including the 256 byte tokens and <|endoftext|> (>= 257)")
    t.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    t.add_argument("--min-frequency", type=int, default=2, metavar="N",
                   help="minimum pair count for a merge (default 2)")
    t.add_argument("--doc-separator", default=None, metavar="STR",
                   help=r"split each file into documents at STR (\n, \t, \r, \\ escapes understood)")

    p = dsub.add_parser(
        "prepare", help="clean, split and tokenise text files into token shards",
        description="Clean FILES (UTF-8, newlines normalised, empty documents dropped), split them into "
                    "train/val by document, tokenise each document followed by <|endoftext|>, and write "
                    "checksummed token shards, meta.json and a copy of the tokenizer to --out.")
    p.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files (each one document "
                   "unless --doc-separator splits it)")
    p.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="tokenizer folder (tokenizer.json, or vocab.json + merges.txt)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="fraction of documents for validation, chosen by a hash of their text "
                        "(default 0.1; 0 = no validation split)")
    p.add_argument("--dedup", action="store_true", help="drop documents identical to an earlier one")
    p.add_argument("--doc-separator", default=None, metavar="STR",
                   help=r"split each file into documents at STR (\n, \t, \r, \\ escapes understood)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N",
                   help="maximum tokens per shard file (default 100000000)")


def run(args) -> int:
    """Executes a parsed `llamas data ...` command; returns the exit code."""
    from . import data

    sep = unescape(args.doc_separator) if args.doc_separator is not None else None
    if sep == "":
        raise LlamasError("[data] --doc-separator must not be empty")
    if args.data_command == "train-tokenizer":
        out = data.train_tokenizer(args.files, args.vocab_size, args.out,
                                   min_frequency=args.min_frequency, doc_separator=sep)
        from .tokenizer import Tokenizer
        tok = Tokenizer.from_folder(out)
        print(f"trained a byte-level BPE tokenizer: vocab_size {tok.vocab_size}, "
              f"<|endoftext|> = {tok.eos_token_id}, written to {out}")
        return 0
    if args.data_command == "prepare":
        meta = data.prepare(args.files, args.tokenizer, args.out, val_fraction=args.val_fraction,
                            dedup=args.dedup, doc_separator=sep, shard_tokens=args.shard_tokens,
                            progress=True)
        splits = meta["splits"]
        for name in ("train", "val"):
            s = splits[name]
            print(f"{name:<5}  {s['documents']:>8} documents  {s['tokens']:>12} tokens  "
                  f"{len(s['shards']):>4} shards")
        print(f"dropped {meta['dropped_empty']} empty and {meta['dropped_duplicates']} duplicate "
              f"documents; vocab_size {meta['vocab_size']}, {meta['token_width']}-byte tokens; "
              f"written to {args.out}")
        sys.stdout.flush()
        return 0
    raise LlamasError(f"[data] unknown data command {args.data_command!r}")
