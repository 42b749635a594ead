"""Turns a growing list of generated token ids into text pieces that never split a UTF-8
character and never leak any part of a stop string."""
from __future__ import annotations

from typing import Optional, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = (), include_stop: bool = False, skip_special: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special  # special tokens (end-of-text...) decode to no text
        self._stop = [s for s in stop if s]
        self._include_stop = include_stop  # the text ends after the stop string instead of before it
        # Characters of text pushed with check_stop=False: a stop string ending within them is not
        # a stop (min_tokens), one that only starts there is.
        self._unchecked = 0
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = []
        self._emitted = 0          # characters of the decoded text already handed out
        # With a byte-level tokenizer, ids[:_base] decode to _base_text, which ends on a whole
        # character, so each push decodes only ids[_base:] (not the whole sequence per token).
        self._incremental = bool(getattr(tokenizer, "decodes_by_concatenation", False))
        self._base = 0
        self._base_text = ""
        # ... and with its bytes table, ids[_base:] are their bytes, kept here, decoded per push.
        self._pieces = tokenizer.piece_bytes(build=False, skip_special=skip_special) \
            if self._incremental and hasattr(tokenizer, "piece_bytes") else None
        self._pending = b""
        self.stopped = False       # a stop string was found
        self.text = ""             # the final text once finished

    def push(self, token_id: int, check_stop: bool = True) -> str:
        """Adds a token; returns the newly safe text (possibly empty). With check_stop=False the
        text so far cannot end at a stop string (a request's first min_tokens tokens)."""
        self._ids.append(token_id)
        if self._pieces is not None:
            self._pending += self._pieces[token_id] if 0 <= token_id < len(self._pieces) else b""
            tail = self._pending.decode("utf-8", "replace")
            text = self._base_text + tail
            if not tail.endswith(REPLACEMENT):
                self._base, self._base_text, self._pending = len(self._ids), text, b""
        elif self._incremental:
            tail = self._decode(self._ids[self._base:])
            text = self._base_text + tail
            if not tail.endswith(REPLACEMENT):
                self._base, self._base_text = len(self._ids), text
        else:
            text = self._decode(self._ids)
        if not check_stop:
            self._unchecked = len(text)
        cut = self._find_stop(text) if self._stop and check_stop else None
        if cut is not None:
            self.stopped = True
            self.text = text[:cut]
            return self._take(self.text, len(self.text))
        # Hold back an incomplete UTF-8 character (decoded as U+FFFD at the end) and any suffix
        # that could still grow into a stop string.
        safe = len(text)
        while safe > self._emitted and text[safe - 1] == REPLACEMENT:
            safe -= 1
        if self._stop:  # (on the text before an incomplete character: "好" + half of the next
            # one no longer ends with the stop string "好好"'s start, and "好" went out)
            safe -= self._stop_prefix_overlap(text, safe)
        self.text = text
        return self._take(text, safe)

    def _decode(self, ids) -> str:
        if self._skip_special:
            return self._tokenizer.decode(ids, skip_special_tokens=True)
        return self._tokenizer.decode(ids)

    def finish(self) -> str:
        """Flushes what was held back (the sequence ended without a stop string)."""
        if self.stopped:
            return ""
        return self._take(self.text, len(self.text))

    def _take(self, text: str, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        piece = text[self._emitted:upto]
        self._emitted = upto
        return piece

    def _find_stop(self, text: str) -> Optional[int]:
        best = None
        # A stop string can only newly appear near the end; search from what could overlap it.
        start = max(0, self._emitted - self._longest_stop)
        for s in self._stop:
            i = text.find(s, start)
            while i != -1 and i + len(s) <= self._unchecked:  # wholly in unchecked text: not a stop
                i = text.find(s, i + 1)
            if i != -1:
                end = i + len(s) if self._include_stop else i
                if best is None or end < best:
                    best = end
        return best

    def _stop_prefix_overlap(self, text: str, end: int) -> int:
        """The longest start of a stop string that text[:end] ends with (no copy of the text: this
        runs at every token)."""
        longest = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, end), longest, -1):
                if text.endswith(s[:k], 0, end):
                    longest = k
                    break
        return longest
