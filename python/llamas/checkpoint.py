"""Training checkpoints: weights, AdamW moments, step, data-loader position and run settings in
one safetensors file, written atomically (temporary file, fsync, rename), so a kill during the
write leaves the previous checkpoint intact."""
from __future__ import annotations

import json
from typing import Any, Dict, Tuple

import numpy as np

from ._C import LlamasError
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
    metadata = {"format": FORMAT, "version": str(VERSION), "state": json.dumps(state)}
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
    return tensors, state


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
