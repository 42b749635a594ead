"""Deterministic, resumable batches of (inputs, targets) windows from a :class:`TokenDataset`."""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from ._C import LlamasError
from .data_shards import TokenDataset


def _window_count(num_tokens: int, seq_len: int) -> int:
    """Windows of ``seq_len + 1`` tokens at stride ``seq_len`` in a stream of ``num_tokens``."""
    return max(0, (num_tokens - 1) // seq_len)


# A loader state without this key was written by a llamas whose windows stopped at each shard's
# end (the last <= seq_len tokens of every shard, and the pair joining it to the next, were never
# trained on: half the tokens at --shard-tokens 1000 --seq 512).
_LAYOUT = "across-shards"


class DataLoader:
    """Batches of ``seq_len + 1``-token windows, as int32 ``(inputs, targets)`` of shape ``(B, T)``.

    The split's shards are read as one stream of tokens, in order: window ``i`` covers its tokens
    ``[i*T, i*T + T + 1)``, across a shard's end where it falls there (shards are cut at token
    counts, not documents, so an edge means nothing). ``inputs = window[:-1]``,
    ``targets = window[1:]``.

    :meth:`next_batch` yields training batches forever: epoch ``e`` visits the windows in the order
    ``np.random.Generator(np.random.PCG64([seed, e])).permutation(n_windows)`` (identity order
    when ``shuffle=False``), ``batch_size`` at a time; the last ``n_windows % batch_size`` windows
    of an epoch are dropped. :meth:`state_dict` / :meth:`load_state_dict` resume exactly.

    Iterating the loader (``for x, y in loader``) is one full pass in window order, independent
    of :meth:`next_batch`'s position: use it for evaluation. ``len(loader)`` is the number of full
    batches per epoch; :meth:`eval_batches` can also yield the final partial batch.
    """

    def __init__(self, dataset, batch_size: int, seq_len: int, seed: int = 0, shuffle: bool = True):
        if isinstance(dataset, (str, bytes)) or hasattr(dataset, "__fspath__"):
            dataset = TokenDataset(dataset, "train")
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise LlamasError(f"[data] {name} must be a positive integer, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise LlamasError(f"[data] seed must be a non-negative integer, got {seed!r}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        lengths = [int(s.size) for s in dataset.shards]
        self._offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])  # first token of each shard
        self.num_windows = _window_count(int(self._offsets[-1]), self.seq_len)
        if self.num_windows < self.batch_size:
            raise LlamasError(self._too_small_message(int(self._offsets[-1])))
        self._epoch = 0
        self._batch_index = 0
        self._perm: Optional[np.ndarray] = None
        self._perm_epoch = -1

    def _too_small_message(self, num_tokens: int) -> str:
        where = f"{getattr(self.dataset, 'folder', 'dataset')} ({getattr(self.dataset, 'split', '?')} split)"
        B, T = self.batch_size, self.seq_len
        msg = (f"[data] {where} has {num_tokens} tokens = {self.num_windows} windows of "
               f"seq_len+1 = {T + 1} tokens, fewer than batch_size {B}.")
        fit_t = max(0, min(T - 1, (num_tokens - 1) // B))  # largest T' < T with at least B windows
        options = []
        if self.num_windows >= 1:
            options.append(f"batch_size <= {self.num_windows} with seq_len {T}")
        if fit_t:
            options.append(f"seq_len <= {fit_t} with batch_size {B}")
        if options:
            return msg + " Use " + " or ".join(options) + ", or add more data."
        return msg + " Add more data."

    # -- properties -------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Epoch of the next training batch (0-based)."""
        return self._epoch

    @property
    def batch_index(self) -> int:
        """Index within the epoch of the next training batch."""
        return self._batch_index

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per epoch: ``num_windows // batch_size``."""
        return self.num_windows // self.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    # -- batches ----------------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
                self._perm = rng.permutation(self.num_windows)
            else:
                self._perm = np.arange(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def _gather(self, window_ids) -> tuple[np.ndarray, np.ndarray]:
        """Builds (inputs, targets) for the given global window ids."""
        T = self.seq_len
        ids = np.asarray(window_ids, dtype=np.int64)
        firsts = ids * T
        shard_of = np.searchsorted(self._offsets, firsts, side="right") - 1
        buf = np.empty((ids.size, T + 1), dtype=np.int32)
        shards, offsets = self.dataset.shards, self._offsets
        for row, (first, s) in enumerate(zip(firsts.tolist(), shard_of.tolist())):
            filled = 0
            while filled < T + 1:  # a window can run over a shard's end, and over short shards
                start = first + filled - int(offsets[s])
                piece = shards[s][start:start + T + 1 - filled]
                buf[row, filled:filled + piece.size] = piece
                filled += piece.size
                s += 1
        return np.ascontiguousarray(buf[:, :-1]), np.ascontiguousarray(buf[:, 1:])

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The next training batch ``(inputs, targets)``, int32 ``(batch_size, seq_len)`` each."""
        B = self.batch_size
        order = self._order(self._epoch)
        b = self._batch_index
        batch = self._gather(order[b * B:(b + 1) * B])
        self._batch_index += 1
        if self._batch_index >= self.batches_per_epoch:
            self._epoch += 1
            self._batch_index = 0
        return batch

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One pass over all full batches in window order (for evaluation)."""
        return self.eval_batches(include_partial=False)

    def eval_batches(self, include_partial: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Windows in order, ``batch_size`` at a time; with ``include_partial`` the last
        ``num_windows % batch_size`` windows come as one smaller batch, so every window is seen."""
        B = self.batch_size
        end = self.num_windows if include_partial else self.batches_per_epoch * B
        for start in range(0, end, B):
            yield self._gather(np.arange(start, min(start + B, end)))

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serialisable position: restore it with :meth:`load_state_dict`."""
        return {"seed": self.seed, "epoch": self._epoch, "batch_index": self._batch_index,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "shuffle": self.shuffle,
                "num_windows": self.num_windows, "layout": _LAYOUT}

    def load_state_dict(self, state: dict) -> None:
        """Continues from a :meth:`state_dict`: the following batches are exactly those an
        uninterrupted loader would have produced. Refuses a state made with a different
        batch_size, seq_len, seed, shuffle or dataset size."""
        if not isinstance(state, dict):
            raise LlamasError(f"[data] loader state must be a dict, got {type(state).__name__}")
        if state.get("layout") != _LAYOUT and len(self.dataset.shards) > 1:
            raise LlamasError("[data] cannot resume: the saved loader state was written by a llamas whose "
                              "windows stopped at each shard's end; this one reads the shards as one stream, "
                              "so the same position names other tokens. Start the run again")
        for key in ("batch_size", "seq_len", "seed", "shuffle", "num_windows"):
            if key not in state:
                if key == "num_windows":
                    continue
                raise LlamasError(f"[data] loader state has no {key!r}")
            mine = getattr(self, key)
            if (bool(state[key]) if key == "shuffle" else int(state[key])) != mine:
                raise LlamasError(
                    f"[data] cannot resume: the saved loader state has {key}={state[key]!r} but this "
                    f"loader has {key}={mine!r}; create the loader with the same {key} to resume "
                    f"exactly" + (" (the dataset changed)" if key == "num_windows" else ""))
        epoch, index = int(state.get("epoch", 0)), int(state.get("batch_index", 0))
        if epoch < 0 or not 0 <= index < self.batches_per_epoch:
            raise LlamasError(f"[data] invalid loader state: epoch {epoch}, batch_index {index} "
                              f"(batches per epoch: {self.batches_per_epoch})")
        self._epoch, self._batch_index = epoch, index
