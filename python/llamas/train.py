"""Training: `llamas.create`, `llamas.Trainer`, learning-rate schedules and model presets."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Tuple, Union

import numpy as np

from . import _C
from ._C import LlamasError
from .config import GPT2Config
from .model import Model
from .tokenizer import Tokenizer

# Architectures for `llamas train --config NAME`; vocab_size comes from the data's tokenizer.
PRESETS = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128),
    "small": dict(n_embd=128, n_layer=4, n_head=4, n_positions=256),
    "shakespeare": dict(n_embd=256, n_layer=6, n_head=8, n_positions=256),
    "124M": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    "355M": dict(n_embd=1024, n_layer=24, n_head=16, n_positions=1024),
    "774M": dict(n_embd=1280, n_layer=36, n_head=20, n_positions=1024),
    "1558M": dict(n_embd=1600, n_layer=48, n_head=25, n_positions=1024),
}


def preset_config(name: str, vocab_size: int, eos_token_id: int = 0, n_positions: Optional[int] = None) -> GPT2Config:
    if name not in PRESETS:
        raise LlamasError(f"[config] unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    fields = dict(PRESETS[name])
    if n_positions is not None:
        fields["n_positions"] = n_positions
    return GPT2Config(vocab_size=vocab_size, bos_token_id=eos_token_id, eos_token_id=eos_token_id, **fields)


def create(config: Union[GPT2Config, dict], seed: int = 0, tokenizer: Optional[Tokenizer] = None) -> Model:
    """A fresh GPT-2 with float32 weights and GPT-2's initialisation (normal 0.02; residual
    projections scaled by 1/sqrt(2 n_layer)). The same seed gives the same weights."""
    if isinstance(config, dict):
        config = GPT2Config.from_dict(config)
    if not isinstance(config, GPT2Config):
        raise LlamasError(f"[create] config must be a llamas.GPT2Config or a dict, got {type(config).__name__}")
    config.validate()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise LlamasError(f"[create] seed must be a non-negative integer, got {seed!r}")
    native = _C.create_gpt2(config.to_native(), seed & ((1 << 64) - 1))
    return Model(native, config, tokenizer, None)


class WarmupCosine:
    """Learning-rate multiplier: linear warmup over `warmup_steps` (step s gets (s+1)/warmup),
    then cosine decay to `min_ratio` at `total_steps`, flat after that."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
        if warmup_steps < 0 or total_steps <= 0 or warmup_steps > total_steps:
            raise LlamasError(f"[schedule] need 0 <= warmup_steps <= total_steps and total_steps > 0, "
                              f"got warmup {warmup_steps}, total {total_steps}")
        if not 0.0 <= min_ratio <= 1.0:
            raise LlamasError(f"[schedule] min_ratio must be in [0, 1], got {min_ratio}")
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if step >= self.total_steps:
            return self.min_ratio
        span = max(1, self.total_steps - self.warmup_steps)
        progress = (step - self.warmup_steps) / span
        return self.min_ratio + 0.5 * (1.0 - self.min_ratio) * (1.0 + math.cos(math.pi * progress))

    def __repr__(self) -> str:
        return f"WarmupCosine(warmup_steps={self.warmup_steps}, total_steps={self.total_steps}, min_ratio={self.min_ratio})"


def _positive_float(name: str, value, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise LlamasError(f"[trainer] {name} must be a {'non-negative' if allow_zero else 'positive'} finite number, got {value!r}")
    return float(value)


# A target that is not learned from or scored (PyTorch's and transformers' ignore_index: padding,
# or a prompt's tokens in supervised fine-tuning): losses are means over the other targets.
IGNORE_TARGET = _C.IGNORE_TARGET  # -100 (ops::kIgnoreTarget)


def _batch_arrays(inputs, targets, vocab_size: int, n_positions: int, op: str) -> Tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(inputs), np.asarray(targets)
    for name, a in (("inputs", x), ("targets", y)):
        if a.ndim != 2 or a.size == 0:
            raise LlamasError(f"[{op}] {name} must be a non-empty 2-D (B, T) array, got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.integer):
            raise LlamasError(f"[{op}] {name} must hold integer token ids, got dtype {a.dtype}")
    if x.shape != y.shape:
        raise LlamasError(f"[{op}] inputs {x.shape} and targets {y.shape} must have the same shape")
    if x.shape[1] > n_positions:
        raise LlamasError(f"[{op}] sequence length {x.shape[1]} exceeds the model's context {n_positions}")
    for name, a in (("inputs", x), ("targets", y)):
        ids = a[a != IGNORE_TARGET] if name == "targets" else a
        if ids.size == 0:
            raise LlamasError(f"[{op}] every target is {IGNORE_TARGET} (ignored): nothing to learn from or score")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            extra = f" (and not {IGNORE_TARGET}, which is ignored)" if name == "targets" else ""
            raise LlamasError(f"[{op}] {name} contain token id {bad}, outside the vocabulary [0, {vocab_size}){extra}")
    return np.ascontiguousarray(x, dtype=np.int32), np.ascontiguousarray(y, dtype=np.int32)


class Trainer:
    """AdamW training of a float32 model in place.

    `step(inputs, targets)` runs one optimizer step on int (B, T) arrays (split into micro-batches
    of `micro_batch_size` rows whose gradients accumulate) and returns the mean loss before the
    update; a target of -100 (`IGNORE_TARGET`, PyTorch's ignore_index: padding, a prompt's tokens)
    is not learned from, and the mean is over the others. Weight decay applies to 2-D weights only;
    gradients are clipped to a global L2 norm of `grad_clip` (0 disables). `schedule` is None (constant `lr`) or a callable step -> multiplier
    of `lr`, such as `WarmupCosine`.
    """

    def __init__(self, model: Model, lr: float = 3e-4, betas: Tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, grad_clip: float = 1.0,
                 schedule: Optional[Callable[[int], float]] = None, micro_batch_size: Optional[int] = None):
        if not isinstance(model, Model):
            raise LlamasError(f"[trainer] expected a llamas.Model, got {type(model).__name__}")
        if model.dtype != "float32":
            raise LlamasError(f"[trainer] training needs float32 weights, the model is {model.dtype} "
                              "(load it with dtype='float32')")
        self.lr = _positive_float("lr", lr, allow_zero=True)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
            raise LlamasError(f"[trainer] betas must be two numbers in [0, 1), got {betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = _positive_float("eps", eps)
        self.weight_decay = _positive_float("weight_decay", weight_decay, allow_zero=True)
        self.grad_clip = _positive_float("grad_clip", grad_clip, allow_zero=True)
        if schedule is not None and not callable(schedule):
            raise LlamasError(f"[trainer] schedule must be None or a callable step -> multiplier, got {schedule!r}")
        self.schedule = schedule
        if micro_batch_size is not None and (isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int)
                                             or micro_batch_size < 1):
            raise LlamasError(f"[trainer] micro_batch_size must be a positive integer or None, got {micro_batch_size!r}")
        self.micro_batch_size = micro_batch_size
        self.model = model
        self._native = _C.GPT2Trainer(model._native, self.betas[0], self.betas[1], self.eps, self.weight_decay,
                                      self.grad_clip)
        self.last_grad_norm: Optional[float] = None
        self.last_lr: Optional[float] = None

    @property
    def steps_done(self) -> int:
        return self._native.steps_done

    def lr_at(self, step: int) -> float:
        """The learning rate step `step` (0-based) uses."""
        if self.schedule is None:
            return self.lr
        factor = float(self.schedule(step))
        if not math.isfinite(factor) or factor < 0:
            raise LlamasError(f"[trainer] schedule returned {factor} at step {step}; it must be finite and >= 0")
        return self.lr * factor

    def step(self, inputs, targets) -> float:
        cfg = self.model.config
        x, y = _batch_arrays(inputs, targets, cfg.vocab_size, cfg.n_positions, "train_step")
        lr = self.lr_at(self.steps_done)
        micro = self.micro_batch_size or x.shape[0]
        loss, norm = self._native.step(x, y, micro, lr)
        self.last_grad_norm, self.last_lr = norm, lr
        return loss

    def compute_gradients(self, inputs, targets) -> float:
        """Zeroes the gradients and accumulates those of one batch, without updating; returns the
        loss. The gradients are then `gradient(name)`."""
        cfg = self.model.config
        x, y = _batch_arrays(inputs, targets, cfg.vocab_size, cfg.n_positions, "compute_gradients")
        return self._native.compute_gradients(x, y)

    def gradient(self, name: str) -> np.ndarray:
        return np.array(self._native.tensor("grad", name))

    def evaluate(self, loader: Iterable, max_batches: Optional[int] = None) -> float:
        """Mean loss over the (inputs, targets) batches of `loader` (for example a
        `llamas.data.DataLoader`, iterated once in order), without gradients."""
        return evaluate(self.model, loader, max_batches)


def evaluate(model: Model, loader: Iterable, max_batches: Optional[int] = None) -> float:
    """Mean per-token cross-entropy of `model` over the batches of `loader` (targets of -100 left out)."""
    total, tokens = 0.0, 0
    cfg = model.config
    for i, (inputs, targets) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = _batch_arrays(inputs, targets, cfg.vocab_size, cfg.n_positions, "evaluate")
        loss_sum, counted = model._native.loss(x, y)
        total += loss_sum
        tokens += counted
    if tokens == 0:
        raise LlamasError("[evaluate] the loader yielded no batches")
    return total / tokens
