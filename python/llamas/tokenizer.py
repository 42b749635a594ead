"""Tokenizer wrapper over the Hugging Face `tokenizers` library (tokenizer.json, or GPT-2's
vocab.json + merges.txt)."""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional

from ._C import LlamasError


def _check_encodable(text) -> None:
    """Raises the LlamasError that names why tokenizers refused text (its own TypeError does not)."""
    if not isinstance(text, str):
        raise LlamasError(f"[tokenizer] expected a str to encode, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # tokenizers would raise "TextInputSequence must be str"
        raise LlamasError(f"[tokenizer] the text is not valid Unicode: a lone surrogate at character {e.start}") from None


def _byte_level_decoder() -> dict:
    """GPT-2's byte-level alphabet: the character each byte is written as in the vocabulary, inverted
    (printable Latin-1 bytes stand for themselves, the rest are shifted to U+0100 on)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, shift = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shift)] = b
            shift += 1
    return chars


class Tokenizer:
    def __init__(self, backend, eos_token_id: Optional[int], source: str):
        self._tok = backend
        self.eos_token_id = eos_token_id
        self.source = source

    @classmethod
    def from_folder(cls, folder: str, eos_token_id: Optional[int] = None) -> "Tokenizer":
        import tokenizers

        tokenizer_json = os.path.join(folder, "tokenizer.json")
        vocab = os.path.join(folder, "vocab.json")
        merges = os.path.join(folder, "merges.txt")
        try:
            if os.path.exists(tokenizer_json):
                with open(tokenizer_json, "rb") as f:  # (from_file takes only UTF-8 paths)
                    backend = tokenizers.Tokenizer.from_buffer(f.read())
                source = tokenizer_json
            elif os.path.exists(vocab) and os.path.exists(merges):
                # Files given to BPE() directly are "deprecated" (tokenizers 0.22, the last
                # release for Python 3.9, warns), but from_file reads them through Python dicts:
                # 100 ms instead of 50 for GPT-2's vocabulary.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    backend = tokenizers.ByteLevelBPETokenizer(vocab, merges)
                source = vocab
            else:
                raise LlamasError(
                    f"[tokenizer] {folder} has no tokenizer.json and no vocab.json + merges.txt")
        except LlamasError:
            raise
        except Exception as e:  # tokenizers raises plain Exceptions for malformed files
            raise LlamasError(f"[tokenizer] cannot read the tokenizer in {folder}: {e}") from None
        if eos_token_id is None:
            eos_token_id = backend.token_to_id("<|endoftext|>")
        return cls(backend, eos_token_id, source)

    @property
    def decodes_by_concatenation(self) -> bool:
        """True when decode(a + b) == decode(a) + decode(b) whenever decode(a) ends on a whole
        character: byte-level BPE (GPT-2's) concatenates token bytes. Streams then decode only the
        new tokens instead of the whole sequence at every step."""
        backend = getattr(self._tok, "_tokenizer", self._tok)
        return type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"

    def _added_tokens(self) -> dict:
        """Added tokens (end-of-text and the like) by id, as the backend lists them."""
        backend = getattr(self._tok, "_tokenizer", self._tok)
        return backend.get_added_tokens_decoder() if hasattr(backend, "get_added_tokens_decoder") else {}

    def _vocab_bytes(self) -> list:
        """Each id's token as bytes through GPT-2's byte-level alphabet (None where the token is
        missing or not written in that alphabet): walked once, for token_bytes and piece_bytes."""
        cached = getattr(self, "_vocab_bytes_cache", None)
        if cached is None:
            backend = getattr(self._tok, "_tokenizer", self._tok)
            to_byte = _byte_level_decoder()
            cached = []
            for i in range(backend.get_vocab_size()):
                token = backend.id_to_token(i)
                mapped = token is not None and all(c in to_byte for c in token)
                cached.append(bytes(to_byte[c] for c in token) if mapped else None)
            self._vocab_bytes_cache = cached
        return cached

    def token_bytes(self) -> Optional[list]:
        """Each token id's bytes (empty for added/special tokens such as end-of-text), for a
        byte-level BPE tokenizer; None for any other kind (their tokens are not byte strings)."""
        if not self.decodes_by_concatenation:
            return None
        special = set(self._added_tokens())
        if self.eos_token_id is not None:
            special.add(self.eos_token_id)
        return [b"" if b is None or i in special else b for i, b in enumerate(self._vocab_bytes())]

    def piece_bytes(self, build: bool = True, skip_special: bool = False) -> Optional[list]:
        """Each token id's bytes as decode() writes them (added and special tokens too: their text),
        for a byte-level BPE tokenizer whose every token maps to bytes; None otherwise (or, with
        build=False, when it has not been built yet). Built once (GPT-2's 50,257 tokens: ~0.1 s,
        so the long-lived Engine builds it, not a one-off generate): a stream then decodes a token
        by looking it up instead of calling the tokenizer (~5 us a token, 16 of them per server
        step), and decode(ids) == b"".join(table[i] for i in ids).decode("utf-8", "replace")."""
        if skip_special:  # the same table with the special tokens' text taken out
            table = self.piece_bytes(build)
            if table is None:
                return None
            skipping = getattr(self, "_piece_bytes_skipping", None)
            if skipping is None:
                skipping = list(table)
                for i in self.special_ids():
                    if i < len(skipping):
                        skipping[i] = b""
                self._piece_bytes_skipping = skipping
            return skipping
        cached = getattr(self, "_piece_bytes", False)
        if cached is not False or not build:
            return cached or None
        table = None
        if self.decodes_by_concatenation:
            added = self._added_tokens()
            table = []
            for i, b in enumerate(self._vocab_bytes()):
                if i in added:
                    table.append(self._tok.decode([i], skip_special_tokens=False).encode("utf-8"))
                elif b is None:
                    table = None  # a token that is not a byte string: decode it the tokenizer's way
                    break
                else:
                    table.append(b)
        self._piece_bytes = table
        return table

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise LlamasError(f"[tokenizer] expected a str to encode, got {type(text).__name__}")
        try:
            return self._tok.encode(text).ids
        except TypeError:  # a lone surrogate; checked only once tokenizers has refused the text
            _check_encodable(text)
            raise

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        try:
            return [e.ids for e in self._tok.encode_batch(texts)]
        except TypeError:  # name the text tokenizers refused; nothing is checked on the way in
            for text in texts:
                _check_encodable(text)
            raise

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def special_ids(self) -> frozenset:
        """Ids of the special tokens (added tokens marked special, such as end-of-text), which
        decode(..., skip_special_tokens=True) leaves out."""
        return frozenset(i for i, t in self._added_tokens().items() if getattr(t, "special", False))

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self._tok.id_to_token(token_id)

    def save(self, folder: str, model_max_length: int = 1024) -> None:
        """Writes tokenizer.json (and tokenizer_config.json naming the end-of-text token) into folder."""
        self._tok.save(os.path.join(folder, "tokenizer.json"))
        if self.eos_token_id is not None:
            with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
                json.dump({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
                           "model_max_length": model_max_length, "tokenizer_class": "GPT2Tokenizer"}, f, indent=2)
