"""Token shard files and the dataset folder that holds them.

A shard is one little-endian file: a 32-byte header followed by the tokens.

====== ===== ===================================================================
offset bytes field
====== ===== ===================================================================
0      8     magic ``b"LLMSTOK\\0"``
8      4     version (uint32) = 1
12     4     token width in bytes (uint32): 2 (uint16 tokens) or 4 (uint32 tokens)
16     8     token count (uint64)
24     8     payload checksum (uint64): ``zlib.crc32`` of the payload, zero-extended
32     ...   payload: ``count`` tokens of ``width`` bytes each
====== ===== ===================================================================

A dataset folder (written by :func:`llamas.data.prepare`) holds ``meta.json``, the shards
``train_000000.bin``, ..., ``val_000000.bin``, ... and a copy of the tokenizer in ``tokenizer/``.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from typing import Optional

import numpy as np

from ._C import LlamasError

MAGIC = b"LLMSTOK\0"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")
HEADER_SIZE = HEADER.size  # 32
META_FORMAT = "llamas-tokens"
META_VERSION = 1
_CRC_CHUNK = 1 << 24  # bytes per crc32 update when verifying


def token_width(vocab_size: int) -> int:
    """Bytes per token for a vocabulary: 2 when every id fits in uint16, else 4."""
    return 2 if vocab_size <= 65536 else 4


def _dtype(width: int) -> np.dtype:
    return np.dtype("<u2") if width == 2 else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    """``train_000000.bin`` style name of shard ``index`` of ``split``."""
    return f"{split}_{index:06d}.bin"


class ShardWriter:
    """Streams tokens into one shard file, written atomically.

    Tokens go to ``path + ".tmp"`` as they arrive (the checksum is updated incrementally);
    :meth:`close` writes the real header, flushes, fsyncs and renames the file into place, so a
    reader never sees a partial shard under the final name.
    """

    def __init__(self, path: str, width: int):
        if width not in (2, 4):
            raise LlamasError(f"[data] {path}: token width must be 2 or 4, got {width}")
        self.path = path
        self.width = width
        self.dtype = _dtype(width)
        self.count = 0
        self._crc = 0
        self._tmp = path + ".tmp"
        self._f = open(self._tmp, "wb")
        self._f.write(b"\0" * HEADER_SIZE)

    def write(self, tokens) -> None:
        """Appends tokens (any integer array-like; values must fit the width)."""
        arr = np.ascontiguousarray(tokens, dtype=self.dtype)
        data = arr.tobytes()
        self._crc = zlib.crc32(data, self._crc)
        self._f.write(data)
        self.count += arr.size

    def close(self) -> None:
        """Finalises the header and atomically moves the file to its name."""
        self._f.seek(0)
        self._f.write(HEADER.pack(MAGIC, VERSION, self.width, self.count, self._crc & 0xFFFFFFFF))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Closes and removes the temporary file (after an error)."""
        try:
            self._f.close()
        finally:
            if os.path.exists(self._tmp):
                os.remove(self._tmp)


def write_shard(path: str, tokens, width: int) -> None:
    """Writes one complete shard holding ``tokens`` (atomically)."""
    w = ShardWriter(path, width)
    try:
        w.write(tokens)
    except BaseException:
        w.abort()
        raise
    w.close()


def read_shard_header(path: str) -> tuple[int, int, int]:
    """Validates a shard's header and size; returns ``(width, count, checksum)``."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
    except OSError as e:
        raise LlamasError(f"[data] cannot read shard {path}: {e.strerror or e}") from None
    if len(head) < HEADER_SIZE:
        raise LlamasError(f"[data] {path}: truncated shard ({size} bytes, shorter than the "
                          f"{HEADER_SIZE}-byte header)")
    magic, version, width, count, checksum = HEADER.unpack(head)
    if magic != MAGIC:
        raise LlamasError(f"[data] {path}: not a llamas token shard (magic {magic!r}, "
                          f"expected {MAGIC!r})")
    if version != VERSION:
        raise LlamasError(f"[data] {path}: unsupported shard version {version} "
                          f"(this llamas reads version {VERSION})")
    if width not in (2, 4):
        raise LlamasError(f"[data] {path}: invalid token width {width} (expected 2 or 4)")
    expected = HEADER_SIZE + count * width
    if size != expected:
        what = "truncated" if size < expected else "has extra bytes"
        raise LlamasError(f"[data] {path}: {what}: {size} bytes, but the header says {count} "
                          f"tokens x {width} bytes + {HEADER_SIZE} = {expected}")
    return width, count, checksum


def array_crc32(arr: np.ndarray) -> int:
    """zlib's crc32 of an array's bytes, read in bounded views (never a copy of the array)."""
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    crc = 0
    for start in range(0, flat.size, _CRC_CHUNK):
        crc = zlib.crc32(flat[start:start + _CRC_CHUNK], crc)
    return crc


def read_shard(path: str, verify_checksum: bool = True) -> np.ndarray:
    """Memory-maps a shard and returns its tokens (``uint16`` or ``uint32``, read-only).

    The header (magic, version, width), the file size (``32 + count * width`` exactly) and, unless
    ``verify_checksum`` is False, the payload's crc32 are checked; any mismatch raises
    :class:`llamas.LlamasError` naming the file.
    """
    path = os.fspath(path)
    width, count, checksum = read_shard_header(path)
    dtype = _dtype(width)
    if count == 0:
        arr = np.zeros(0, dtype=dtype)
    else:
        arr = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(count,))
    if verify_checksum:
        crc = array_crc32(arr)
        if crc != checksum:
            raise LlamasError(f"[data] {path}: checksum mismatch (stored {checksum:#010x}, "
                              f"computed {crc:#010x}): the shard is corrupt")
    return arr


class TokenDataset:
    """One split (``"train"`` or ``"val"``) of a dataset folder written by ``llamas data prepare``.

    Attributes: ``folder``, ``split``, ``meta`` (the parsed meta.json), ``vocab_size``,
    ``eos_token_id``, ``token_width``, ``tokenizer_dir`` (absolute path of the copied tokenizer),
    ``shard_paths``, ``shards`` (memory-mapped token arrays, one per shard), ``checksums`` (their
    crc32s), ``num_tokens``,
    ``num_documents``. Every shard is validated on open (header, size, checksum, and no token
    ``>= vocab_size``).
    """

    def __init__(self, folder: str, split: str = "train", verify_checksum: bool = True):
        self.folder = os.path.abspath(os.fspath(folder))
        self.split = split
        meta_path = os.path.join(self.folder, "meta.json")
        if not os.path.isdir(self.folder):
            raise LlamasError(f"[data] dataset folder {self.folder} does not exist")
        if not os.path.exists(meta_path):
            raise LlamasError(f"[data] {self.folder} has no meta.json: not a prepared token dataset "
                              f"(create one with `llamas data prepare`)")
        try:
            with open(meta_path, "r", encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise LlamasError(f"[data] cannot read {meta_path}: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
            raise LlamasError(f"[data] {meta_path}: not a llamas token dataset "
                              f"(format {meta.get('format') if isinstance(meta, dict) else None!r})")
        if meta.get("version") != META_VERSION:
            raise LlamasError(f"[data] {meta_path}: unsupported dataset version {meta.get('version')!r}")
        self.meta = meta
        try:
            self.vocab_size = int(meta["vocab_size"])
            self.eos_token_id: Optional[int] = meta.get("eos_token_id")
            self.token_width = int(meta["token_width"])
            info = meta.get("splits", {}).get(split)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LlamasError(f"[data] {meta_path}: malformed meta.json ({e})") from None
        names = list(info.get("shards", [])) if isinstance(info, dict) else []
        if not names:
            available = [s for s, v in meta.get("splits", {}).items() if isinstance(v, dict) and v.get("shards")]
            raise LlamasError(f"[data] {self.folder} has no shards for split {split!r} "
                              f"(splits with shards: {', '.join(available) or 'none'})")
        self.num_documents = int(info.get("documents", 0))
        self.tokenizer_dir = os.path.join(self.folder, meta.get("tokenizer", "tokenizer"))
        self.shard_paths = [os.path.join(self.folder, n) for n in names]
        self.shards = []
        self.checksums = []  # each shard's crc32, from its header
        for path in self.shard_paths:
            if not os.path.exists(path):
                raise LlamasError(f"[data] {self.folder}: shard {os.path.basename(path)} listed in "
                                  f"meta.json is missing")
            self.checksums.append(read_shard_header(path)[2])
            arr = read_shard(path, verify_checksum=verify_checksum)
            if arr.dtype.itemsize != self.token_width:
                raise LlamasError(f"[data] {path}: token width {arr.dtype.itemsize} differs from "
                                  f"meta.json's {self.token_width}")
            if arr.size and int(arr.max()) >= self.vocab_size:
                raise LlamasError(f"[data] {path}: token id {int(arr.max())} >= vocab_size "
                                  f"{self.vocab_size}")
            self.shards.append(arr)
        self.num_tokens = int(sum(a.size for a in self.shards))

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return (f"TokenDataset({self.folder!r}, split={self.split!r}, shards={len(self.shards)}, "
                f"tokens={self.num_tokens}, vocab_size={self.vocab_size})")
