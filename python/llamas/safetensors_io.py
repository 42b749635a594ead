"""Reading and writing safetensors files from Python (checkpoints, `Model.save`).

Format: an 8-byte little-endian header length, a JSON header (padded with spaces to a multiple of
8 bytes) mapping names to dtype, shape and data offsets, then the raw little-endian data. Writes
are atomic: the file is written beside its destination under a temporary name, flushed to disk,
then renamed over it, so a crash during the write leaves the previous file intact.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import Dict, Optional, Tuple

import numpy as np

from ._C import LlamasError

# bfloat16 has no numpy dtype: such tensors travel as uint16 bit patterns tagged "BF16".
_TO_TAG = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32",
           np.dtype(np.int64): "I64", np.dtype(np.uint8): "U8", np.dtype(np.uint16): "BF16",
           np.dtype(np.float64): "F64", np.dtype(np.int16): "I16", np.dtype(np.int8): "I8",
           np.dtype(np.bool_): "BOOL"}
_FROM_TAG = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "I64": np.int64, "U8": np.uint8,
             "BF16": np.uint16, "F64": np.float64, "I16": np.int16, "I8": np.int8, "BOOL": np.bool_}

# Called after the temporary file is complete and before it replaces the destination; tests set
# it to kill the process at that point.
_before_replace_hook = None


def write_safetensors(path: str, tensors: Dict[str, np.ndarray], metadata: Optional[Dict[str, str]] = None) -> None:
    """Writes `tensors` (name -> numpy array; uint16 arrays are stored as BF16) atomically."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        if arr.dtype not in _TO_TAG:
            raise LlamasError(f"[safetensors] {name}: unsupported dtype {arr.dtype}")
        # ascontiguousarray turns a 0-d array into shape (1,): reshape keeps scalars scalar
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).reshape(arr.shape)
        header[name] = {"dtype": _TO_TAG[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a model file should be readable like any other
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for arr in arrays:
                f.write(memoryview(arr.reshape(-1)).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        if _before_replace_hook is not None:
            _before_replace_hook(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def read_safetensors(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Returns (name -> read-only memory-mapped array, metadata). Every header entry is checked
    against the file size, so a truncated or garbled file is refused with its name."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LlamasError(f"[safetensors] {path} is truncated ({size} bytes; no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise LlamasError(f"[safetensors] {path}: header length {n} does not fit in a {size}-byte file")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise LlamasError(f"[safetensors] {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlamasError(f"[safetensors] {path}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise LlamasError(f"[safetensors] {path}: the header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_bytes = size - 8 - n
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if data_bytes > 0 else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        try:
            dtype = np.dtype(_FROM_TAG[info["dtype"]])
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise LlamasError(f"[safetensors] {path}: tensor {name!r} has a malformed or unsupported entry {info!r}") from None
        count = int(np.prod(shape)) if shape else 1
        if begin < 0 or end > data_bytes or end - begin != count * dtype.itemsize:
            raise LlamasError(f"[safetensors] {path}: tensor {name!r} ({info['dtype']} {shape}) needs bytes "
                              f"[{begin}, {end}) but the file holds {data_bytes} data bytes (truncated?)")
        out[name] = mm[begin:end].view(dtype).reshape(shape)
    return out, dict(metadata)
