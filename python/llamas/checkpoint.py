"""Training checkpoints: weights, AdamW moments, step, data-loader position and run settings in
one safetensors file, written atomically (temporary file, fsync, rename), so a kill during the
write leaves the previous checkpoint intact. Each tensor's crc32 is kept in the metadata and checked
on resume, so a damaged file (a flipped bit, a copy cut short and padded) is refused, not trained on:
zlib's crc32 runs at ~2 GB/s here, ~0.75 s for GPT-2 124M's 1.5 GB of weights and moments, against
the seconds the write and fsync take. Checkpoints written before the checksums load unchecked."""
from __future__ import annotations

import json
from typing import Any, Dict, Tuple

import numpy as np

from ._C import LlamasError
from .data_shards import array_crc32
from .safetensors_io import read_safetensors, write_safetensors

CHECKPOINT_NAME = "checkpoint.safetensors"
FORMAT = "llamas-checkpoint"
VERSION = 1
_KINDS = ("param", "exp_avg", "exp_avg_sq")


def save_checkpoint(path: str, trainer, state: Dict[str, Any]) -> None:
    """Writes the trainer's parameters and optimizer moments plus `state` (JSON-serialisable:
    step, config, loader position, ...) to `path` atomically."""
    tensors = {}
    for name, _shape, _decay in trainer._native.params():
        for kind in _KINDS:
            tensors[f"{kind}/{name}"] = trainer._native.tensor(kind, name)
    state = dict(state, steps_done=trainer.steps_done)
    checksums = {key: array_crc32(arr) for key, arr in tensors.items()}
    metadata = {"format": FORMAT, "version": str(VERSION), "state": json.dumps(state),
                "crc32": json.dumps(checksums, separators=(",", ":"))}
    write_safetensors(path, tensors, metadata)


def read_checkpoint(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise LlamasError(f"[checkpoint] {path} is not a llamas training checkpoint")
    if metadata.get("version") != str(VERSION):
        raise LlamasError(f"[checkpoint] {path} has version {metadata.get('version')}, this llamas reads {VERSION}")
    try:
        state = json.loads(metadata["state"])
    except (KeyError, json.JSONDecodeError) as e:
        raise LlamasError(f"[checkpoint] {path}: unreadable training state ({e})") from None
    _verify_checksums(path, tensors, metadata.get("crc32"))
    return tensors, state


def _verify_checksums(path: str, tensors: Dict[str, np.ndarray], stored) -> None:
    if stored is None:  # written by a llamas before checksums
        return
    try:
        checksums = json.loads(stored)
        if not isinstance(checksums, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise LlamasError(f"[checkpoint] {path}: unreadable checksums ({e})") from None
    for key, arr in tensors.items():
        want = checksums.get(key)
        if want is None:
            raise LlamasError(f"[checkpoint] {path}: tensor {key!r} has no checksum (the file was altered)")
        got = array_crc32(arr)
        if got != want:
            written = f"{want:#010x}" if isinstance(want, int) else repr(want)
            raise LlamasError(f"[checkpoint] {path}: tensor {key!r} is damaged (crc32 {got:#010x}, written "
                              f"{written}); resume from a copy of the run or start it again")



def restore_checkpoint(trainer, tensors: Dict[str, np.ndarray], state: Dict[str, Any], path: str) -> None:
    """Copies a checkpoint's weights and optimizer moments into `trainer` (whose model has the
    checkpoint's config) and sets its step count."""
    for name, shape, _decay in trainer._native.params():
        for kind in _KINDS:
            key = f"{kind}/{name}"
            if key not in tensors:
                raise LlamasError(f"[checkpoint] {path} has no tensor {key!r} (was it written for another model?)")
            src = tensors[key]
            if tuple(src.shape) != tuple(shape) or src.dtype != np.float32:
                raise LlamasError(f"[checkpoint] {path}: {key} is {src.dtype} {tuple(src.shape)}, "
                                  f"the model needs float32 {tuple(shape)}")
            trainer._native.tensor(kind, name)[...] = src
    trainer._native.steps_done = int(state["steps_done"])
