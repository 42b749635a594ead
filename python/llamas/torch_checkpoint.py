"""PyTorch checkpoints (`pytorch_model.bin`) read without torch, for `llamas convert`.

A torch.save file is a pickle whose tensors point into raw storages: since torch 1.6 a zip archive
(`<name>/data.pkl` plus one `<name>/data/<key>` entry per storage), before that the "legacy"
stream (magic number, protocol, system info, the pickle, its storage keys, then each storage as an
8-byte element count and its bytes). A pickle can run any code it names, so this reader's
unpickler resolves only the names a state dict of plain tensors uses (as torch.load's
weights_only does); any other name fails with LlamasError before anything runs. Tensors come back
as numpy arrays (bfloat16 as uint16 bit patterns, as safetensors_io writes them).
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from typing import Callable, Dict, Optional

import numpy as np

from ._C import LlamasError
from .safetensors_io import write_safetensors

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# torch storage classes -> numpy dtype of their elements (bfloat16 as its uint16 bit pattern).
_STORAGE_DTYPES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": np.uint16,
                   "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
                   "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
                   "BoolStorage": np.bool_}


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name]).newbyteorder("<")


class _Storage:
    """A storage the pickle refers to; its bytes are fetched once the pickle is read."""

    def __init__(self, storage_type: _StorageType, key: str, numel: int, view=None):
        self.type, self.key, self.numel, self.view = storage_type, key, numel, view


class _Pending:
    """A tensor the pickle rebuilds: a strided view of a storage."""

    def __init__(self, storage, offset, size, stride):
        if not isinstance(storage, _Storage):
            raise LlamasError("[convert] a tensor is rebuilt from something other than a storage")
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

    def materialise(self, array: np.ndarray, what: str, name: str) -> np.ndarray:
        size, stride, offset = self.size, self.stride, self.offset
        if len(size) != len(stride) or min(size + stride + (offset,), default=0) < 0:
            raise LlamasError(f"[convert] {what}: tensor {name} has a bad shape {size} or stride {stride}")
        elements = 1
        for n in size:
            elements *= n
        # An expanded (stride-0) view may hold more elements than its storage, but not without
        # bound: a 200-byte file asked for 32 GiB this way.
        if elements > 4 * array.size + (1 << 24):
            raise LlamasError(f"[convert] {what}: tensor {name} of shape {size} would take {elements:,} elements from "
                              f"a storage of {array.size:,} (a damaged file?)")
        if all(size):
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= array.size:
                raise LlamasError(f"[convert] {what}: tensor {name} of shape {size} reaches past its storage of "
                                  f"{array.size} elements")
            view = np.lib.stride_tricks.as_strided(array[offset:], shape=size,
                                                   strides=tuple(s * array.itemsize for s in stride))
        else:
            view = np.zeros(size, dtype=array.dtype)
        # (ascontiguousarray makes a 0-d array 1-d: the reshape keeps scalars scalar)
        return np.ascontiguousarray(view).reshape(size).astype(array.dtype.newbyteorder("="), copy=False)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _Pending(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_ignored):
    return data


class _StateDict(dict):
    """collections.OrderedDict as a state dict pickles it: a module's state_dict() also carries a
    `_metadata` attribute (per-module versions), set by the pickle's BUILD."""


_ALLOWED: Dict[tuple, Callable] = {
    ("collections", "OrderedDict"): _StateDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    """Resolves only the names a state dict of tensors needs."""

    def __init__(self, stream, what: str):
        super().__init__(stream)
        self._what = what

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise LlamasError(f"[convert] {self._what} refers to {module}.{name}, which a checkpoint of plain tensors "
                          "does not need; refusing to unpickle it (it could run code)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise LlamasError(f"[convert] {self._what}: unexpected persistent id {str(pid)[:80]}")
        view = pid[5] if len(pid) > 5 else None  # legacy: (view key, offset, size) of a storage view
        if view is not None and not (isinstance(view, tuple) and len(view) == 3 and
                                     all(isinstance(v, int) and v >= 0 for v in view[1:])):
            raise LlamasError(f"[convert] {self._what}: a storage view that is not (key, offset, size): {str(view)[:80]}")
        if not isinstance(pid[4], int) or pid[4] < 0:
            raise LlamasError(f"[convert] {self._what}: a storage of {str(pid[4])[:40]} elements")
        return _Storage(pid[1], str(pid[2]), pid[4], view)


def _load(stream, what: str):
    try:
        return _Unpickler(stream, what).load()
    except LlamasError:
        raise
    except Exception as e:  # pickle raises many kinds for a damaged stream
        raise LlamasError(f"[convert] {what} is not a readable torch.save file: {type(e).__name__}: {e}") from None


def _state_dict(obj, what: str) -> Dict[str, _Pending]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, _Pending) for k, v in obj.items()):
        raise LlamasError(f"[convert] {what} is not a state dict (names to tensors)")
    return obj


def _materialise(pending: Dict[str, _Pending], fetch: Callable[[_Storage], np.ndarray], what: str):
    out = {}
    for name, t in pending.items():
        array = fetch(t.storage)
        if t.storage.view is not None:
            _, view_offset, view_size = t.storage.view
            array = array[int(view_offset):int(view_offset) + int(view_size)]
        out[name] = t.materialise(array, what, name)
    return out


def _storage_array(raw: bytes, storage: _Storage, what: str) -> np.ndarray:
    size = storage.type.dtype.itemsize
    if len(raw) % size or len(raw) // size < storage.numel:
        raise LlamasError(f"[convert] {what}: storage {storage.key} holds {len(raw)} bytes, fewer than its "
                          f"{storage.numel} {storage.type.name} elements (truncated file?)")
    return np.frombuffer(raw, dtype=storage.type.dtype)


def _read_zip(path: str) -> Dict[str, np.ndarray]:
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise LlamasError(f"[convert] {path} is a damaged zip archive: {e}") from None
    with z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise LlamasError(f"[convert] {path} is a zip archive without one <name>/data.pkl: not a torch.save file")
        prefix = pkl[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and z.read(f"{prefix}byteorder").strip() not in (b"little", b""):
            raise LlamasError(f"[convert] {path} was saved on a big-endian machine; not supported")
        pending = _state_dict(_load(io.BytesIO(z.read(pkl[0])), path), path)
        cache: Dict[str, np.ndarray] = {}

        def fetch(storage: _Storage) -> np.ndarray:
            if storage.key not in cache:
                entry = f"{prefix}data/{storage.key}"
                try:
                    raw = z.read(entry)
                except KeyError:
                    raise LlamasError(f"[convert] {path} has no storage entry {entry}") from None
                except (zipfile.BadZipFile, OSError, EOFError) as e:
                    raise LlamasError(f"[convert] {path}: cannot read {entry}: {e}") from None
                cache[storage.key] = _storage_array(raw, storage, path)
            return cache[storage.key]

        return _materialise(pending, fetch, path)


def _read_legacy(path: str) -> Dict[str, np.ndarray]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if _load(f, path) != _LEGACY_MAGIC:
            raise LlamasError(f"[convert] {path} is neither a zip archive nor a legacy torch.save file")
        _load(f, path)  # protocol version
        _load(f, path)  # system info
        pending = _state_dict(_load(f, path), path)
        keys = _load(f, path)
        if not isinstance(keys, list):
            raise LlamasError(f"[convert] {path}: the storage key list is missing")
        storages = {t.storage.key: t.storage for t in pending.values()}
        arrays: Dict[str, np.ndarray] = {}
        for key in keys:
            storage: Optional[_Storage] = storages.get(str(key))
            head = f.read(8)
            if len(head) != 8:
                raise LlamasError(f"[convert] {path} ends before storage {key} (truncated file?)")
            (numel,) = struct.unpack("<q", head)
            if storage is None:
                raise LlamasError(f"[convert] {path}: storage {key} belongs to no tensor")
            if numel < 0:
                raise LlamasError(f"[convert] {path}: storage {key} has a negative size")
            if numel * storage.type.dtype.itemsize > size - f.tell():  # (not read: 2^60 elements was a MemoryError)
                raise LlamasError(f"[convert] {path} ends before storage {key}'s {numel:,} elements (truncated file?)")
            raw = f.read(numel * storage.type.dtype.itemsize)
            arrays[str(key)] = _storage_array(raw, storage, path)

    def fetch(storage: _Storage) -> np.ndarray:
        if storage.key not in arrays:
            raise LlamasError(f"[convert] {path}: storage {storage.key} has no data")
        return arrays[storage.key]

    return _materialise(pending, fetch, path)


def read_torch_checkpoint(path: str) -> Dict[str, np.ndarray]:
    """The tensors of a torch.save'd state dict, as numpy arrays, without importing torch."""
    try:
        return _read_checkpoint(path)
    except LlamasError:  # (a ValueError too)
        raise
    except (ValueError, TypeError, IndexError, OverflowError, MemoryError, struct.error) as e:
        # what the checks above did not foresee in a damaged file: still an answer, not a traceback
        raise LlamasError(f"[convert] {path} is damaged: {type(e).__name__}: {str(e)[:200]}") from None


def _read_checkpoint(path: str) -> Dict[str, np.ndarray]:
    if zipfile.is_zipfile(path):
        return _read_zip(path)
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":  # a zip's first entry, but no central directory at the end
            raise LlamasError(f"[convert] {path} is a damaged zip archive (truncated?): no central directory")
    return _read_legacy(path)


# Buffers older transformers GPT-2 checkpoints store beside the weights: the causal mask (a 1 x 1 x
# n_positions x n_positions tensor per layer, 48 MB in float32 for GPT-2 124M) and its fill value.
# llamas's attention is causal by construction, so they are dropped.
_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


def convert_folder(folder: str, force: bool = False, progress: Callable[[str], None] = lambda s: None) -> str:
    """Writes folder/model.safetensors from its pytorch_model.bin (or the shards its
    pytorch_model.bin.index.json names); returns the path written."""
    if not os.path.isdir(folder):
        raise LlamasError(f"[convert] {folder} is not a folder")
    out = os.path.join(folder, "model.safetensors")
    if os.path.exists(out) and not force:
        raise LlamasError(f"[convert] {out} already exists (--force replaces it)")
    index = os.path.join(folder, "pytorch_model.bin.index.json")
    single = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(single):
        files = [single]
    elif os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            shards = list(dict.fromkeys(weight_map.values()))
            for name in shards:  # files of this folder only (the safetensors loader's rule too)
                if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
                    raise LlamasError(f"[convert] {index} names a shard outside its folder: {str(name)[:80]!r}")
            files = [os.path.join(folder, name) for name in shards]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise LlamasError(f"[convert] {index} is not a shard index with a weight_map: {e}") from None
    else:
        raise LlamasError(f"[convert] {folder} has no pytorch_model.bin (nor pytorch_model.bin.index.json)")
    tensors: Dict[str, np.ndarray] = {}
    for i, path in enumerate(files, 1):
        if not os.path.isfile(path):
            raise LlamasError(f"[convert] {path} not found")
        progress(f"[convert] reading {os.path.basename(path)} ({i}/{len(files)}, "
                 f"{os.path.getsize(path) / 2**20:.1f} MiB)")
        shard = read_torch_checkpoint(path)
        if len(files) == 1:
            tensors.update(shard)
            continue
        for name in [n for n, f in weight_map.items() if os.path.join(folder, f) == path]:
            if name not in shard:  # the index names the tensors each shard holds; only those are taken
                raise LlamasError(f"[convert] {index} puts {name} in {os.path.basename(path)}, which does not hold it")
            tensors[name] = shard[name]
    masks = [n for n in tensors if n.endswith(_MASK_BUFFERS)]
    for name in masks:
        del tensors[name]
    notes = [f"dropped {len(masks)} attention-mask buffers"] if masks else []
    wte = tensors.get("transformer.wte.weight", tensors.get("wte.weight"))
    head = tensors.get("lm_head.weight")
    if head is not None and wte is not None and head.shape == wte.shape and np.array_equal(head, wte):
        del tensors["lm_head.weight"]  # tied to wte, which the loader reads it from
        notes.append("dropped lm_head.weight (the same as wte)")
    if not tensors:
        raise LlamasError(f"[convert] {folder}: the checkpoint holds no tensors")
    write_safetensors(out, tensors, {"format": "pt", "converted_by": "llamas convert"})
    size = sum(a.nbytes for a in tensors.values())
    progress(f"[convert] wrote {out}: {len(tensors)} tensors, {size / 2**20:.1f} MiB" + "".join(f"; {n}" for n in notes))
    return out
