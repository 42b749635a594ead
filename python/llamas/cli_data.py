"""`llamas data ...` subcommands (placeholder; being written)."""
from __future__ import annotations


def add_parser(sub) -> None:
    d = sub.add_parser("data", help="prepare training data and tokenizers",
                       description="Prepare token shards and train tokenizers.")
    d.add_subparsers(dest="data_command", required=True)


def run(args) -> int:
    raise NotImplementedError
