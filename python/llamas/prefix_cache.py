"""Prefix caching: the KV blocks of finished sequences' prompts (and outputs), kept so that a new
request that starts with the same tokens skips computing them.

Blocks are the KV cache's own 16-position blocks, shared by reference (`Sequence.share_blocks`,
`Sequence.adopt`): a cached block is never copied and never written again, since only full blocks
are shared and a sequence writes only past its length. Each block is keyed by a hash chained over
every token before it (so a key names the whole prefix, as vLLM's block hashes do) and the key's
entry also keeps the block's own 16 tokens, checked on a hit. Least recently used blocks go first
when the cache is over its byte budget.

Because every kernel is batch-invariant, keys and values computed for a prompt in one request are
bit-identical to what another request would compute for the same tokens: output with a cache hit
equals output without one.
"""
from __future__ import annotations

import collections
from typing import List, Sequence, Tuple

from ._C import LlamasError

BLOCK = 16  # positions per KV block (kv_cache.h: kKvBlockSize)


def cache_bytes(prefix_cache_mb, op: str) -> int:
    """A prefix-cache size in MiB (Engine's and create_app's prefix_cache_mb), checked, as bytes."""
    if isinstance(prefix_cache_mb, bool) or not isinstance(prefix_cache_mb, (int, float)) \
            or not 0 <= prefix_cache_mb < 2 ** 40:
        raise LlamasError(f"[{op}] prefix_cache_mb must be a number >= 0, got {prefix_cache_mb!r}")
    return int(prefix_cache_mb * 2 ** 20)


class PrefixCache:
    """Full KV blocks of earlier sequences, by prefix. Used from the scheduler's thread only;
    the counters may be read from any thread."""

    def __init__(self, max_bytes: int, kv_dtype: str = "float32"):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = int(max_bytes)
        self.kv_dtype = kv_dtype  # of every cached block (the scheduler clears the cache if the model's changes)
        # key -> (block ref, the block's tokens); least recently used first.
        self._blocks: "collections.OrderedDict[int, Tuple[object, Tuple[int, ...]]]" = collections.OrderedDict()
        self.bytes = 0
        self.hit_tokens = 0       # prompt tokens served from the cache, in all
        self.queried_tokens = 0   # prompt tokens of the requests that looked
        self.evicted_blocks = 0

    @property
    def blocks(self) -> int:
        return len(self._blocks)

    def _keys(self, tokens: Sequence[int], n_blocks: int):
        key = 0
        for b in range(n_blocks):
            chunk = tuple(tokens[b * BLOCK:(b + 1) * BLOCK])
            key = hash((key, chunk))
            yield key, chunk

    def lookup(self, tokens: Sequence[int], max_blocks: int) -> List[object]:
        """Refs to the cached blocks of tokens' longest cached prefix, at most max_blocks."""
        self.queried_tokens += len(tokens)
        found, keys = [], []
        for key, chunk in self._keys(tokens, min(max_blocks, len(tokens) // BLOCK)):
            entry = self._blocks.get(key)
            if entry is None or entry[1] != chunk:
                break
            found.append(entry[0])
            keys.append(key)
        self._touch(keys)
        self.hit_tokens += len(found) * BLOCK
        return found

    def _touch(self, keys: List[int]) -> None:
        # Deepest first, so a prefix's first blocks are the most recently used: eviction takes the
        # ends of chains before their starts (a block whose parent is gone is never found).
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def insert(self, seq) -> int:
        """Caches the full blocks of a sequence's KV (of its tokens so far); returns how many blocks
        were new."""
        if self.max_bytes == 0:
            return 0
        tokens = seq.tokens
        n_blocks = min(seq.length, len(tokens)) // BLOCK
        added, keys = 0, []
        for b, (key, chunk) in enumerate(self._keys(tokens, n_blocks)):
            keys.append(key)
            entry = self._blocks.get(key)
            if entry is not None and entry[1] == chunk:
                continue
            if entry is not None:  # a hash collision: the newer prefix takes the key
                self._drop(key)
            ref = seq.share_blocks(b, 1)[0]
            self._blocks[key] = (ref, chunk)
            self.bytes += ref.nbytes
            added += 1
        self._touch(keys)
        self._evict()
        return added

    def _drop(self, key: int) -> None:
        ref, _ = self._blocks.pop(key)
        self.bytes -= ref.nbytes

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._blocks:
            key = next(iter(self._blocks))
            self._drop(key)
            self.evicted_blocks += 1

    def clear(self) -> None:
        """Drops every cached block (a block still used by a running sequence lives on there)."""
        self._blocks.clear()
        self.bytes = 0
