"""Model configurations, read from and written to Hugging Face config.json files."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from ._C import LlamasError

_SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_NULLABLE = ("bos_token_id", "eos_token_id")
# Largest sizes a config may give (GPT-2 XL: vocab 50,257, context 1,024, width 1,600, 48 layers).
_LIMITS = {"vocab_size": 2 ** 31 - 1, "n_positions": 1 << 20, "n_embd": 1 << 16, "n_layer": 1 << 12, "n_head": 1 << 16}


def read_json_object(path: str, missing_hint: str) -> dict[str, Any]:
    """A JSON file of a model folder that must hold an object; errors name the file."""
    if os.path.exists(path) and not os.path.isfile(path):  # (a pipe blocks, /dev/zero never ends)
        raise LlamasError(f"[load] {path} is not a regular file (a folder, a device or a pipe)")
    if os.path.isfile(path) and os.path.getsize(path) > 64 << 20:
        raise LlamasError(f"[load] {path} is {os.path.getsize(path):,} bytes: not a model's JSON file")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise LlamasError(f"[load] {path} not found: {missing_hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlamasError(f"[load] {path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise LlamasError(f"[load] {path} must hold a JSON object")
    return d


@dataclasses.dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    bos_token_id: Optional[int] = 50256
    eos_token_id: Optional[int] = 50256
    # Attention scores times head_dim^-0.5 (unless scale_attn_weights is false), divided by
    # layer + 1 when scale_attn_by_inverse_layer_idx (Stanford CRFM's GPT-2 checkpoints).
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def num_parameters(self) -> int:
        c, f = self.n_embd, self.n_inner or 4 * self.n_embd
        per_layer = 4 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * f + f) + (f * c + c)
        return self.vocab_size * c + self.n_positions * c + self.n_layer * per_layer + 2 * c

    def validate(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LlamasError(f"[config] {name} must be a positive integer, got {value!r}")
            if value > _LIMITS[name]:  # (past these a size overflows, or the first buffer is terabytes)
                raise LlamasError(f"[config] {name} must be at most {_LIMITS[name]:,}, got {value:,}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or isinstance(self.n_inner, bool)
                                         or not 0 < self.n_inner <= 1 << 20):
            raise LlamasError(f"[config] n_inner must be null or a positive integer up to 1,048,576, got {self.n_inner!r}")
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1e30:
            raise LlamasError(f"[config] layer_norm_epsilon must be a positive number below 1e30, got {eps!r}")
        # (An id past the vocabulary, as GPT2Config's default 50256 in a small model, is never
        # generated, as in transformers.)
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise LlamasError(f"[config] {name} must be null or a token id (an integer >= 0), got {value!r}")
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx"):
            if not isinstance(getattr(self, name), bool):
                raise LlamasError(f"[config] {name} must be true or false, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise LlamasError(f"[config] n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.activation_function not in _SUPPORTED_ACTIVATIONS:
            raise LlamasError(
                f"[config] activation_function {self.activation_function!r} is not supported "
                f"(GPT-2 uses the tanh GELU: {', '.join(_SUPPORTED_ACTIVATIONS)})")

    def to_native(self) -> dict:
        return {
            "vocab_size": self.vocab_size, "n_positions": self.n_positions, "n_embd": self.n_embd,
            "n_layer": self.n_layer, "n_head": self.n_head, "n_inner": self.n_inner or 0,
            "layer_norm_epsilon": float(self.layer_norm_epsilon),
            "scale_attn_weights": self.scale_attn_weights,
            "scale_attn_by_inverse_layer_idx": self.scale_attn_by_inverse_layer_idx,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPT2Config":
        model_type = d.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise LlamasError(f"[config] unknown model_type {model_type!r}: this version of llamas runs 'gpt2'")
        fields = {f.name for f in dataclasses.fields(cls)}
        # null bos/eos ids mean "none" (the tokenizer's <|endoftext|>, if any, is the EOS then);
        # other nulls mean the default.
        kwargs = {k: v for k, v in d.items() if k in fields and (v is not None or k in _NULLABLE)}
        # What transformers' GPT2LMHeadModel would do differently, refused rather than ignored.
        if d.get("tie_word_embeddings") is False:
            raise LlamasError("[config] tie_word_embeddings is false: llamas runs GPT-2 with its output layer tied "
                              "to the token embedding, not a separate lm_head")
        # reorder_and_upcast_attn only changes float16 rounding (llamas computes attention in float32);
        # cross-attention layers are unused without an encoder, as in transformers' generate.
        for name in ("tie_word_embeddings", "reorder_and_upcast_attn", "add_cross_attention"):
            if name in d and d[name] is not None and not isinstance(d[name], bool):
                raise LlamasError(f"[config] {name} must be true or false, got {d[name]!r}")
        # Older configs spell the context length n_ctx.
        if "n_positions" not in kwargs and isinstance(d.get("n_ctx"), int):
            kwargs["n_positions"] = d["n_ctx"]
        config = cls(**kwargs)
        config.validate()
        return config

    @classmethod
    def from_file(cls, path: str) -> "GPT2Config":
        d = read_json_object(path, "a model folder needs config.json")
        try:
            return cls.from_dict(d)
        except TypeError as e:
            raise LlamasError(f"[load] {path}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_ctx": self.n_positions})
        # llamas runs and trains without dropout; transformers would train a saved model with its
        # default of 0.1 each unless the config says otherwise
        d.update({"embd_pdrop": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.0})
        return d

    def save(self, folder: str) -> None:
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_hf_dict(), f, indent=2)
