"""Training data: clean text files, train a byte-level BPE tokenizer, write token shards, and
read them back as batches.

    from llamas import data
    data.train_tokenizer(["a.txt", "b.txt"], vocab_size=8192, out="tok")
    meta = data.prepare(["a.txt", "b.txt"], "tok", "shards", val_fraction=0.1)
    loader = data.DataLoader(data.TokenDataset("shards", "train"), batch_size=8, seq_len=256)
    inputs, targets = loader.next_batch()          # int32 (8, 256) each

Cleaning (the same for both): each file is read as UTF-8 (invalid bytes are an error naming the
file and byte offset), a leading BOM is dropped, ``\\r\\n`` and ``\\r`` become ``\\n``; the file is one
document, or several split on ``doc_separator``; each document loses trailing whitespace and
leading blank lines; empty documents are dropped.

The shard format and :class:`TokenDataset` are in :mod:`llamas.data_shards`; :class:`DataLoader` is
in :mod:`llamas.data_loader`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from ._C import LlamasError
from .data_loader import DataLoader
from .data_shards import (META_FORMAT, META_VERSION, ShardWriter, TokenDataset, read_shard,
                          shard_name, token_width, write_shard)

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[^\S\n]*\n)+")
_ENCODE_BATCH_CHARS = 1 << 22  # characters handed to encode_batch at once

__all__ = ["DataLoader", "TokenDataset", "clean_text", "iter_documents", "prepare", "read_shard",
           "train_tokenizer", "write_shard", "EOS_TOKEN"]


# -- cleaning ---------------------------------------------------------------------------------
MAX_VOCAB = 1 << 20  # tokens a trained tokenizer may have (GPT-2 has 50,257; the largest in use ~256k)

def read_text(path: str) -> str:
    """Reads a file as strict UTF-8 (BOM dropped, newlines normalised to ``\\n``)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise LlamasError(f"[data] cannot read {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LlamasError(f"[data] {path} is not valid UTF-8: byte offset {e.start} "
                          f"({raw[e.start:e.start + 4]!r}...: {e.reason})") from None
    return clean_text(text)


def clean_text(text: str) -> str:
    """Drops a leading BOM and normalises ``\\r\\n`` and ``\\r`` to ``\\n``."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _clean_document(doc: str) -> str:
    return _LEADING_BLANK_LINES.sub("", doc.rstrip())


def iter_documents(files: Sequence[str], doc_separator: Optional[str] = None,
                   stats: Optional[dict] = None) -> Iterator[str]:
    """Yields the cleaned, non-empty documents of ``files`` in order. ``stats`` (if given) gets
    ``dropped_empty`` and ``bytes`` counts."""
    if doc_separator is not None:
        if not isinstance(doc_separator, str) or not doc_separator:
            raise LlamasError("[data] doc_separator must be a non-empty string")
        doc_separator = clean_text(doc_separator)
    if stats is not None:
        stats.setdefault("dropped_empty", 0)
        stats.setdefault("bytes", 0)
    for path in files:
        text = read_text(os.fspath(path))
        if stats is not None:
            stats["bytes"] += len(text.encode("utf-8"))
        pieces = text.split(doc_separator) if doc_separator is not None else [text]
        for piece in pieces:
            doc = _clean_document(piece)
            if doc:
                yield doc
            elif stats is not None:
                stats["dropped_empty"] += 1


_LONG_WORD = re.compile(r"\S{%d,}" % 256)


def _training_texts(docs):
    """The documents as BPE training sees them, with runs of 256+ non-space characters cut into
    256-character pieces: BPE trains on whole words, and one 400 KB line without a space took 73 s
    (4 MB ran past a minute). Text of words shorter than that trains as it was."""
    for doc in docs:
        if not _LONG_WORD.search(doc):
            yield doc
            continue
        pos = 0
        for m in _LONG_WORD.finditer(doc):
            yield doc[pos:m.start()]
            word = m.group()
            for i in range(0, len(word), 256):
                yield word[i:i + 256]
            pos = m.end()
        yield doc[pos:]


def _check_files(files) -> list[str]:
    if isinstance(files, (str, bytes)) or hasattr(files, "__fspath__"):
        files = [files]
    files = [os.fspath(f) for f in files]
    if not files:
        raise LlamasError("[data] no input files given")
    for f in files:
        if not os.path.isfile(f):
            raise LlamasError(f"[data] input file {f} does not exist" if not os.path.exists(f)
                              else f"[data] input {f} is not a regular file")
    return files


# -- tokenizer training -------------------------------------------------------------------------
def train_tokenizer(files, vocab_size: int, out: str, min_frequency: int = 2,
                    doc_separator: Optional[str] = None) -> str:
    """Trains a byte-level BPE tokenizer (GPT-2 style, no prefix space, special token
    ``<|endoftext|>``) on the cleaned documents of ``files``.

    Writes ``tokenizer.json``, ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` to
    ``out`` (loadable by :meth:`llamas.tokenizer.Tokenizer.from_folder` and by Hugging Face
    ``GPT2TokenizerFast.from_pretrained``). Returns ``out``.
    """
    import tokenizers

    files = _check_files(files)
    # (tokenizers allocates for the vocabulary up front: 10^10 asked it for 567 GB and aborted)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or \
            not 257 <= vocab_size <= MAX_VOCAB:
        raise LlamasError(f"[data] vocab_size must be an integer in [257, {MAX_VOCAB:,}] (256 byte tokens + "
                          f"{EOS_TOKEN} at least), got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, (int, np.integer)) or \
            not 1 <= min_frequency < 2 ** 32:
        raise LlamasError(f"[data] min_frequency must be an integer in [1, 2^32), got {min_frequency!r}")
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise LlamasError(f"[data] output {out} exists and is not a folder")
    docs = list(iter_documents(files, doc_separator))
    if not docs:
        raise LlamasError(f"[data] no non-empty documents in {', '.join(files)}")
    tok = tokenizers.ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator(_training_texts(docs), vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                            special_tokens=[EOS_TOKEN], show_progress=False)
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    tok.save_model(out)
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
                   "model_max_length": 1024, "tokenizer_class": "GPT2Tokenizer"}, f, indent=2)
    return out


# -- prepare ----------------------------------------------------------------------------------
class _SplitWriter:
    """Writes one split's tokens into shards of at most ``shard_tokens`` tokens."""

    def __init__(self, out: str, split: str, width: int, shard_tokens: int):
        self.out, self.split, self.width, self.shard_tokens = out, split, width, shard_tokens
        self.shards: list[str] = []
        self.tokens = 0
        self.documents = 0
        self._w: Optional[ShardWriter] = None

    def write(self, tokens: np.ndarray) -> None:
        pos = 0
        while pos < tokens.size:
            if self._w is None:
                name = shard_name(self.split, len(self.shards))
                self._w = ShardWriter(os.path.join(self.out, name), self.width)
                self.shards.append(name)
            take = min(tokens.size - pos, self.shard_tokens - self._w.count)
            self._w.write(tokens[pos:pos + take])
            pos += take
            self.tokens += take
            if self._w.count >= self.shard_tokens:
                self._w.close()
                self._w = None

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None

    def abort(self) -> None:
        if self._w is not None:
            self._w.abort()
            self._w = None


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        # On a terminal the line is redrawn in place; in a log file only the final line is written.
        self.tty = sys.stderr.isatty()
        self.t0 = self.last = time.perf_counter()

    def update(self, docs: int, tokens: int, nbytes: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not final and (not self.tty or now - self.last < 0.25)):
            return
        self.last = now
        rate = nbytes / 1e6 / max(now - self.t0, 1e-9)
        sys.stderr.write(("\r" if self.tty else "") + f"  {docs} documents, {tokens} tokens, {rate:.1f} MB/s"
                         + ("\n" if final else ""))
        sys.stderr.flush()


def _val_bucket(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "little") % 10000


# A split right after a lone "\n" between two non-space characters is a pre-token boundary of
# GPT-2's byte-level pre-tokenizer, so pieces cut there encode to the same ids as the whole; the
# pieces let encode_batch use every core on one long document (a 170 kB play: 0.26 s whole,
# 0.085 s in 43 pieces on 2 cores).
_SAFE_SPLIT = re.compile(r"(?<=\S)\n(?=\S)")
_PIECE_CHARS = 4096


def _split_for_encoding(doc: str) -> list[str]:
    if len(doc) <= 2 * _PIECE_CHARS:
        return [doc]
    pieces, start = [], 0
    for m in _SAFE_SPLIT.finditer(doc, _PIECE_CHARS):
        if m.end() - start >= _PIECE_CHARS:
            pieces.append(doc[start:m.end()])
            start = m.end()
    pieces.append(doc[start:])
    return pieces


def _encoded(tokenizer, docs: Iterable[str], dedup: bool, stats: dict) -> Iterator[tuple[bytes, np.ndarray]]:
    """(digest, tokens + [eos]) per kept document, tokenised with encode_batch in chunks."""
    seen: set[bytes] = set()
    eos = tokenizer.eos_token_id
    batch: list[tuple[bytes, str]] = []
    chars = 0

    splitting = [True]  # until a document shows the tokenizer's pieces differ from the whole

    def flush():
        pieces = [_split_for_encoding(d) if splitting[0] else [d] for _, d in batch]
        flat = tokenizer.encode_batch([p for ps in pieces for p in ps])
        if splitting[0] and len(pieces[0]) > 1 and \
                [t for ids in flat[:len(pieces[0])] for t in ids] != tokenizer.encode(batch[0][1]):
            splitting[0] = False  # not a GPT-2-style pre-tokenizer: encode whole documents
            pieces = [[d] for _, d in batch]
            flat = tokenizer.encode_batch([d for _, d in batch])
        at = 0
        for (digest, _), ps in zip(batch, pieces):
            toks = [t for ids in flat[at:at + len(ps)] for t in ids]
            at += len(ps)
            arr = np.empty(len(toks) + 1, dtype=np.int64)
            arr[:-1] = toks
            arr[-1] = eos
            yield digest, arr
        batch.clear()

    for doc in docs:
        digest = hashlib.blake2b(doc.encode("utf-8"), digest_size=16).digest()
        if dedup:
            if digest in seen:
                stats["dropped_duplicates"] += 1
                continue
            seen.add(digest)
        batch.append((digest, doc))
        chars += len(doc)
        if chars >= _ENCODE_BATCH_CHARS or len(batch) >= 4096:
            yield from flush()
            chars = 0
    if batch:
        yield from flush()


def prepare(files, tokenizer_dir: str, out: str, val_fraction: float = 0.1, dedup: bool = False,
            doc_separator: Optional[str] = None, shard_tokens: int = 100_000_000,
            progress: bool = False) -> dict:
    """Cleans, splits and tokenises ``files`` into token shards in ``out``; returns the meta dict
    (also written to ``out/meta.json``).

    Each document becomes ``tokenizer.encode(doc) + [eos]``. A document goes to the validation
    split when ``blake2b(text) % 10000 < val_fraction * 10000``; if no document landed there (and
    ``val_fraction > 0``) the last document does, and a single document is split by tokens (its
    last ``val_fraction`` goes to val). ``val_fraction=0`` writes no val split. Shards hold at most
    ``shard_tokens`` tokens. ``progress`` prints a ``\\r``-updated line on stderr.
    """
    from .tokenizer import Tokenizer

    files = _check_files(files)
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= float(val_fraction) < 1.0:
        raise LlamasError(f"[data] val_fraction must be in [0, 1), got {val_fraction!r}")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, (int, np.integer)) or shard_tokens < 1:
        raise LlamasError(f"[data] shard_tokens must be a positive integer, got {shard_tokens!r}")
    tokenizer_dir, out = os.fspath(tokenizer_dir), os.fspath(out)
    if not os.path.isdir(tokenizer_dir):
        raise LlamasError(f"[data] tokenizer folder {tokenizer_dir} does not exist")
    tokenizer = Tokenizer.from_folder(tokenizer_dir)
    if tokenizer.eos_token_id is None:
        raise LlamasError(f"[data] the tokenizer in {tokenizer_dir} has no {EOS_TOKEN} token "
                          f"(needed as the end-of-document marker)")
    backend = getattr(tokenizer, "_tok", None)  # whole documents: never truncate or pad
    for off in ("no_truncation", "no_padding"):
        if hasattr(backend, off):
            getattr(backend, off)()
    vocab_size = int(tokenizer.vocab_size)
    width = token_width(vocab_size)
    if os.path.exists(out) and not os.path.isdir(out):
        raise LlamasError(f"[data] output {out} exists and is not a folder")
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "meta.json")):
        os.remove(os.path.join(out, "meta.json"))  # an interrupted rerun must not look complete

    threshold = float(val_fraction) * 10000
    writers = {s: _SplitWriter(out, s, width, int(shard_tokens)) for s in ("train", "val")}
    pending: dict[str, Optional[np.ndarray]] = {"train": None, "val": None}
    stats = {"dropped_empty": 0, "dropped_duplicates": 0, "bytes": 0}
    prog = _Progress(progress)
    ndocs = ntokens = 0

    def emit(split: str, tokens: np.ndarray) -> None:
        if tokens.size and int(tokens.max()) >= vocab_size:
            raise LlamasError(f"[data] tokenizer {tokenizer_dir} produced id {int(tokens.max())} >= "
                              f"its vocab_size {vocab_size}")
        writers[split].write(tokens)
        writers[split].documents += 1

    try:
        docs = iter_documents(files, doc_separator, stats)
        for digest, tokens in _encoded(tokenizer, docs, dedup, stats):
            split = "val" if threshold > 0 and _val_bucket(digest) < threshold else "train"
            # Hold back the latest document of each split: the fallbacks below may move it.
            if pending[split] is not None:
                emit(split, pending[split])
            pending[split] = tokens
            ndocs += 1
            ntokens += tokens.size
            prog.update(ndocs, ntokens, stats["bytes"])
        if ndocs == 0:
            raise LlamasError(f"[data] no documents left in {', '.join(files)} "
                              f"({stats['dropped_empty']} empty, {stats['dropped_duplicates']} duplicates)")
        if threshold > 0:
            if ndocs == 1:  # one document: split it by tokens
                doc = pending["train"] if pending["train"] is not None else pending["val"]
                n_val = min(max(1, int(round(doc.size * float(val_fraction)))), doc.size - 1)
                if n_val < 1:
                    raise LlamasError(f"[data] cannot make a validation split: the only document "
                                      f"has {doc.size} token(s)")
                pending["train"], pending["val"] = doc[:doc.size - n_val], doc[doc.size - n_val:]
            elif pending["val"] is None:  # no document hashed to val: the last one goes there
                pending["val"], pending["train"] = pending["train"], None
            elif pending["train"] is None and writers["train"].documents == 0:
                pending["train"], pending["val"] = pending["val"], None  # keep train non-empty
        for split in ("train", "val"):
            if pending[split] is not None:
                emit(split, pending[split])
            writers[split].close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    prog.update(ndocs, ntokens, stats["bytes"], final=True)
    if threshold > 0 and writers["val"].tokens == 0:
        raise LlamasError("[data] the validation split came out empty")  # unreachable by design

    _copy_tokenizer(tokenizer_dir, os.path.join(out, "tokenizer"))
    meta = {
        "format": META_FORMAT, "version": META_VERSION, "tokenizer": "tokenizer",
        "vocab_size": vocab_size, "eos_token_id": int(tokenizer.eos_token_id), "token_width": width,
        "splits": {s: {"shards": w.shards, "tokens": w.tokens, "documents": w.documents}
                   for s, w in writers.items()},
        "sources": files, "dropped_empty": stats["dropped_empty"],
        "dropped_duplicates": stats["dropped_duplicates"],
    }
    _remove_stale_shards(out, set(writers["train"].shards) | set(writers["val"].shards))
    _write_json_atomic(os.path.join(out, "meta.json"), meta)
    return meta


def _copy_tokenizer(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in TOKENIZER_FILES:
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.exists(s) and not (os.path.exists(d) and os.path.samefile(s, d)):
            shutil.copyfile(s, d)


def _remove_stale_shards(out: str, keep: set) -> None:
    pattern = re.compile(r"(train|val)_\d{6}\.bin(\.tmp)?")
    for name in os.listdir(out):
        if pattern.fullmatch(name) and name not in keep:
            os.remove(os.path.join(out, name))


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
