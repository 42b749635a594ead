"""Regular expressions for structured output, parsed: the syntax of llamas.regex_dfa (ECMAScript's,
less what a finite automaton cannot do) into (kind, ...) tuples over Unicode code point intervals."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from ._C import LlamasError

Intervals = List[Tuple[int, int]]   # sorted, disjoint, inclusive code point ranges
Intervals3 = List[Tuple[int, int, int]]   # (lo, hi, next state)

MAX_CODE_POINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)
ANY: Intervals = [(0, SURROGATES[0] - 1), (SURROGATES[1] + 1, MAX_CODE_POINT)]
# What a JSON string can hold without \\u escapes: \\b \\t \\n \\f \\r, then from the space on.
JSON_STRING: Intervals = [(8, 10), (12, 13), (0x20, SURROGATES[0] - 1), (SURROGATES[1] + 1, MAX_CODE_POINT)]
MAX_REPEAT = 1_000

DIGIT: Intervals = [(0x30, 0x39)]
WORD: Intervals = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
SPACE: Intervals = [(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                    (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF)]
DOT: Intervals = [(0, 9), (11, 12), (14, 0x2027), (0x202A, SURROGATES[0] - 1), (SURROGATES[1] + 1, MAX_CODE_POINT)]


def normalise(iv: Sequence[Tuple[int, int]]) -> Intervals:
    out: Intervals = []
    for lo, hi in sorted(iv):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def intersect(a: Intervals, b: Intervals) -> Intervals:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def complement(a: Intervals) -> Intervals:
    out, start = [], 0
    for lo, hi in normalise(a):
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= MAX_CODE_POINT:
        out.append((start, MAX_CODE_POINT))
    return intersect(out, ANY)


def class_set(items: Sequence[Tuple[int, int]], negate: bool) -> Intervals:
    """A character class's code points ([...] or [^...]; regexes and grammars), characters only."""
    items = normalise(items)
    return complement(items) if negate else intersect(items, ANY)


class RegexParser:
    """Recursive descent over the pattern's code points into (kind, ...) tuples:
    ("set", intervals), ("cat", [nodes]), ("alt", [nodes]), ("rep", node, min, max or None)."""

    def __init__(self, pattern: str, where: str):
        self.p, self.i, self.where = pattern, 0, where

    def fail(self, message: str):
        raise LlamasError(f"[regex] {self.where}: {message} (at offset {self.i} of {self.p[:60]!r})")

    def peek(self) -> Optional[str]:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        c = self.p[self.i]
        self.i += 1
        return c

    def parse(self):
        if self.peek() == "^":
            self.i += 1
        node = self.alternation()
        if self.peek() == "$" and self.i == len(self.p) - 1:
            self.i += 1
        if self.i != len(self.p):
            self.fail("'^' and '$' only at the start and end" if self.peek() in "^$" else f"unexpected {self.peek()!r}")
        return node

    def alternation(self):
        alts = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            alts.append(self.sequence())
        return alts[0] if len(alts) == 1 else ("alt", alts)

    def sequence(self):
        items = []
        while self.peek() is not None and self.peek() not in "|)":
            if self.peek() == "$" and self.i == len(self.p) - 1:
                break
            items.append(self.quantified(self.atom()))
        return ("cat", items)

    def number(self) -> Optional[int]:
        start = self.i
        while self.peek() is not None and self.peek().isdigit():
            self.i += 1
        return int(self.p[start:self.i]) if self.i > start else None

    def bounds(self) -> Optional[Tuple[int, Optional[int]]]:
        """{n}, {n,} or {n,m} at the cursor (consumed), or None (a '{' that is itself)."""
        save = self.i
        self.i += 1
        lo = self.number()
        hi = lo
        if lo is not None and self.peek() == ",":
            self.i += 1
            hi = self.number()
        if lo is None or self.peek() != "}":
            self.i = save  # ECMAScript (without the u flag) reads a stray '{' as itself
            return None
        self.i += 1
        return lo, hi

    def quantified(self, node):
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            node = ("rep", node, 1 if c == "+" else 0, None if c != "?" else 1)
        elif c == "{" and (b := self.bounds()) is not None:
            lo, hi = b
            if hi is not None and hi < lo:
                self.fail(f"{{{lo},{hi}}}: the maximum is below the minimum")
            if max(lo, hi or 0) > MAX_REPEAT:
                self.fail(f"a repeat count above {MAX_REPEAT}")
            node = ("rep", node, lo, hi)
        else:
            return node
        if self.peek() == "?":  # lazy: the same matches
            self.i += 1
        c = self.peek()
        if c in ("*", "+", "?") or (c == "{" and self.bounds() is not None):
            self.fail("nothing to repeat (a quantifier after a quantifier)")
        return node

    def atom(self):
        c = self.take()
        if c == "(":
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?<", self.i) and self.p[self.i + 2:self.i + 3] not in ("=", "!"):
                end = self.p.find(">", self.i)
                if end < 0:
                    self.fail("an unterminated group name")
                self.i = end + 1
            elif self.peek() == "?":
                self.fail("lookaround and other (?...) groups are not supported")
            node = self.alternation()
            if self.peek() != ")":
                self.fail("a '(' without its ')'")
            self.i += 1
            return node
        if c == "[":
            return ("set", self.char_class())
        if c == ".":
            return ("set", DOT)
        if c == "\\":
            return ("set", self.escape(in_class=False))
        if c in "*+?":
            self.i -= 1
            self.fail(f"nothing to repeat before {c!r}")
        if c in "^$":
            self.i -= 1
            self.fail("'^' and '$' only at the start and end")
        if c == ")":
            self.i -= 1
            self.fail("a ')' without its '('")
        return ("set", [(ord(c), ord(c))])

    def escape(self, in_class: bool) -> Intervals:
        if self.peek() is None:
            self.fail("a pattern ending in '\\'")
        c = self.take()
        classes = {"d": DIGIT, "w": WORD, "s": SPACE}
        if c in classes:
            return intersect(classes[c], ANY)
        if c.lower() in classes:
            return complement(classes[c.lower()])
        simple = {"t": 9, "n": 10, "r": 13, "f": 12, "v": 11, "0": 0}
        if c in simple:
            return [(simple[c], simple[c])]
        if c == "b" and in_class:
            return [(8, 8)]
        if c in "bB":
            self.fail("word boundaries are not supported")
        if c.isdigit() or c == "k":
            self.fail("backreferences are not supported")
        if c in "xu":
            if c == "u" and self.peek() == "{":
                end = self.p.find("}", self.i)
                digits = self.p[self.i + 1:end] if end > 0 else ""
                self.i = end + 1 if end > 0 else self.i
            else:
                n = 2 if c == "x" else 4
                digits = self.p[self.i:self.i + n]
                self.i += len(digits)
                if len(digits) != n:
                    digits = ""
            try:
                cp = int(digits, 16)
            except ValueError:
                self.fail(f"'\\{c}' needs hexadecimal digits")
            if cp > MAX_CODE_POINT or SURROGATES[0] <= cp <= SURROGATES[1]:
                self.fail(f"'\\{c}' names U+{cp:04X}, not a character")
            return [(cp, cp)]
        if c.isalnum():
            self.fail(f"'\\{c}' is not a supported escape")
        return [(ord(c), ord(c))]  # escaped punctuation: itself

    def char_class(self) -> Intervals:
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        items: Intervals = []
        first = True
        while True:
            if self.peek() is None:
                self.fail("a '[' without its ']'")
            if self.peek() == "]" and not first:
                self.i += 1
                break
            first = False
            lo_set = self.class_atom()
            if self.peek() == "-" and self.p[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                hi_set = self.class_atom()
                if len(lo_set) != 1 or len(hi_set) != 1 or lo_set[0][0] != lo_set[0][1] or hi_set[0][0] != hi_set[0][1]:
                    self.fail("a range between classes")
                if hi_set[0][0] < lo_set[0][0]:
                    self.fail("a range out of order")
                items.append((lo_set[0][0], hi_set[0][0]))
            else:
                items.extend(lo_set)
        return class_set(items, negate)

    def class_atom(self) -> Intervals:
        c = self.take()
        if c == "\\":
            return self.escape(in_class=True)
        return [(ord(c), ord(c))]
