"""Grammars for structured output (llama.cpp's GBNF: vLLM's guided_grammar, `grammar=`, `llamas
generate --grammar`): the text is parsed, checked and compiled into the rule / sequence /
character-set nodes the native recogniser follows (csrc/runtime/json_schema_grammar.cpp).

Syntax: rules `name ::= alternatives`, the output matching `root`; alternatives separated by `|`;
in a sequence, string literals "..." (escapes \\n \\r \\t \\\\ \\" \\xHH \\uHHHH \\UHHHHHHHH),
character classes [a-z0-9_] and [^...], `.` (any character), rule names, groups ( ... ), and
the repetitions * + ? {m} {m,} {m,n}; `#` starts a comment. Rule names are letters, digits, '-'
and '_'. A rule that starts with itself (directly or through rules that can match nothing) is
refused: the recogniser expands rules top-down, as llama.cpp's does. Rules that can match no text
at all are dropped; a grammar whose root cannot is refused."""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

from . import _C
from ._C import LlamasError
from .regex_parse import ANY, Intervals, class_set
from .schema_compiler import cached, reachable

# A JSON object in GBNF (after llama.cpp's grammars/json.gbnf): an example to start from, and the
# grammar the tests and bench/structured_output.py hold output to.
JSON_GRAMMAR = r'''
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= "-"? ([0-9] | [1-9] [0-9]{1,5}) ("." [0-9]+)? ws
ws ::= | " " | "\n" [ \t]{0,8}
'''

MAX_NODES = 20_000
MAX_REPEAT = 1_000
MAX_GRAMMAR_CHARS = 100_000


def _fail(message: str) -> None:
    raise LlamasError(f"[grammar] {message}")


class _Parser:
    """GBNF text into {rule name: [alternative: [item]]}; an item is ("chars", intervals),
    ("text", str), ("ref", name), ("group", alternatives) or ("rep", item, lo, hi or None)."""

    def __init__(self, text: str):
        self.s, self.i = text, 0

    def where(self) -> str:
        line = self.s.count("\n", 0, self.i) + 1
        col = self.i - (self.s.rfind("\n", 0, self.i) + 1) + 1
        return f"line {line}, column {col}"

    def fail(self, message: str) -> None:
        _fail(f"{message} at {self.where()}")

    def space(self) -> None:
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == "#":
                end = self.s.find("\n", self.i)
                self.i = len(self.s) if end < 0 else end
            elif c in " \t\r\n":
                self.i += 1
            else:
                return

    def name(self) -> Optional[str]:
        start = self.i
        while self.i < len(self.s) and (self.s[self.i].isalnum() or self.s[self.i] in "-_") and self.s[self.i].isascii():
            self.i += 1
        return self.s[start:self.i] or None

    def at_rule_start(self) -> bool:
        save = self.i
        name = self.name()
        self.space()
        found = name is not None and self.s.startswith("::=", self.i)
        self.i = save
        return found

    def parse(self) -> "OrderedDict[str, list]":
        rules: "OrderedDict[str, list]" = OrderedDict()
        self.space()
        while self.i < len(self.s):
            name = self.name()
            if name is None:
                self.fail(f"expected a rule name, found {self.s[self.i]!r}")
            self.space()
            if not self.s.startswith("::=", self.i):
                self.fail(f"expected '::=' after the rule name {name!r}")
            self.i += 3
            if name in rules:
                self.fail(f"the rule {name!r} is defined twice")
            rules[name] = self.alternatives(top=True)
            self.space()
        return rules

    def alternatives(self, top: bool) -> list:
        alts = [self.sequence(top)]
        while self.i < len(self.s) and self.s[self.i] == "|":
            self.i += 1
            alts.append(self.sequence(top))
        return alts

    def sequence(self, top: bool) -> list:
        items = []
        while True:
            self.space()
            if self.i >= len(self.s) or self.s[self.i] in "|)" or (top and self.at_rule_start()):
                return items
            items.append(self.quantified(self.atom()))

    def number(self) -> Optional[int]:
        start = self.i
        while self.i < len(self.s) and self.s[self.i].isdigit():
            self.i += 1
        return int(self.s[start:self.i]) if self.i > start else None

    def quantified(self, item):
        c = self.s[self.i] if self.i < len(self.s) else ""
        if c in ("*", "+", "?"):
            self.i += 1
            return ("rep", item, 1 if c == "+" else 0, 1 if c == "?" else None)
        if c != "{":
            return item
        self.i += 1
        self.space()
        lo = self.number()
        self.space()
        hi = lo
        if self.i < len(self.s) and self.s[self.i] == ",":
            self.i += 1
            self.space()
            hi = self.number()
            self.space()
        if lo is None or self.i >= len(self.s) or self.s[self.i] != "}":
            self.fail("a repetition is {m}, {m,} or {m,n}")
        self.i += 1
        if hi is not None and hi < lo:
            self.fail(f"{{{lo},{hi}}}: the maximum is below the minimum")
        if max(lo, hi or 0) > MAX_REPEAT:
            self.fail(f"a repetition count above {MAX_REPEAT}")
        return ("rep", item, lo, hi)

    def escape(self) -> int:
        if self.i >= len(self.s):
            self.fail("a '\\' at the end")
        c = self.s[self.i]
        self.i += 1
        simple = {"n": 10, "r": 13, "t": 9, "\\": 92, '"': 34, "[": 91, "]": 93, "-": 45, "^": 94, "/": 47}
        if c in simple:
            return simple[c]
        width = {"x": 2, "u": 4, "U": 8}.get(c)
        if width is None:
            self.fail(f"'\\{c}' is not an escape")
        digits = self.s[self.i:self.i + width]
        self.i += width
        try:
            cp = int(digits, 16)
        except ValueError:
            cp = -1
        if len(digits) != width or not 0 <= cp <= 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
            self.fail(f"'\\{c}{digits}' is not a character")
        return cp

    def char(self) -> int:
        if self.i >= len(self.s):
            self.fail("unexpected end of the grammar")
        c = self.s[self.i]
        self.i += 1
        return self.escape() if c == "\\" else ord(c)

    def atom(self):
        c = self.s[self.i]
        if c == '"':
            self.i += 1
            text = []
            while True:
                if self.i >= len(self.s) or self.s[self.i] == "\n":
                    self.fail("an unterminated string literal")
                if self.s[self.i] == '"':
                    self.i += 1
                    return ("text", "".join(map(chr, text)))
                text.append(self.char())
        if c == "[":
            self.i += 1
            negate = self.i < len(self.s) and self.s[self.i] == "^"
            self.i += negate
            items: Intervals = []
            while True:
                if self.i >= len(self.s):
                    self.fail("an unterminated character class")
                if self.s[self.i] == "]":
                    self.i += 1
                    break
                lo = self.char()
                hi = lo
                if self.s.startswith("-", self.i) and not self.s.startswith("-]", self.i):
                    self.i += 1
                    hi = self.char()
                    if hi < lo:
                        self.fail("a character range out of order")
                items.append((lo, hi))
            return ("chars", class_set(items, negate))
        if c == ".":
            self.i += 1
            return ("chars", ANY)
        if c == "(":
            self.i += 1
            alts = self.alternatives(top=False)
            self.space()
            if self.i >= len(self.s) or self.s[self.i] != ")":
                self.fail("a '(' without its ')'")
            self.i += 1
            return ("group", alts)
        name = self.name()
        if name is None:
            self.fail(f"unexpected {c!r}")
        return ("ref", name)


class _Builder:
    """The node table: rules (kind "rule", children: alternatives), sequences ("sequence",
    children: elements) and character sets ("charset", intervals)."""

    def __init__(self, rules: "OrderedDict[str, list]"):
        self.rules = rules
        self.kind: List[str] = []
        self.children: List[List[int]] = []
        self.sets: List[Optional[Intervals]] = []
        self.names: List[str] = []
        self.rule_nodes: Dict[str, int] = {}
        self.set_nodes: Dict[tuple, int] = {}
        self.pending: List[str] = []

    def node(self, kind: str, children=None, chars=None, name: str = "") -> int:
        if len(self.kind) >= MAX_NODES:
            _fail(f"the grammar compiles to more than {MAX_NODES} nodes")
        self.kind.append(kind)
        self.children.append(children or [])
        self.sets.append(chars)
        self.names.append(name)
        return len(self.kind) - 1

    def rule(self, name: str) -> int:
        """The rule's node; its alternatives are built by build() (a worklist, so that a long chain
        of rules that name the next does not nest Python calls)."""
        if name not in self.rule_nodes:
            if name not in self.rules:
                _fail(f"the rule {name!r} is used but not defined")
            self.rule_nodes[name] = self.node("rule", name=name)
            self.pending.append(name)
        return self.rule_nodes[name]

    def build(self, root: str) -> int:
        node = self.rule(root)
        while self.pending:
            name = self.pending.pop()
            self.children[self.rule_nodes[name]] = [self.sequence(alt, name) for alt in self.rules[name]]
        return node

    def anon(self, alts: List[List[int]], name: str) -> int:
        r = self.node("rule", name=name)
        self.children[r] = [self.node("sequence", list(a), name=name) for a in alts]
        return r

    def sequence(self, items: list, name: str) -> int:
        return self.node("sequence", self.sequence_elements(items, name), name=name)

    def charset(self, chars: Intervals) -> int:
        key = tuple(chars)
        if key not in self.set_nodes:
            self.set_nodes[key] = self.node("charset", chars=list(chars))
        return self.set_nodes[key]

    def item(self, item, name: str) -> List[int]:
        kind = item[0]
        if kind == "chars":
            return [self.charset(item[1])]
        if kind == "text":
            return [self.charset([(ord(c), ord(c))]) for c in item[1]]
        if kind == "ref":
            return [self.rule(item[1])]
        if kind == "group":
            return [self.anon([self.sequence_elements(a, name) for a in item[1]], name)]
        _, inner, lo, hi = item
        one = self.item(inner, name)
        x = one[0] if len(one) == 1 else self.anon([one], name)
        if hi is None:  # x{lo,}: lo copies, then S ::= x S | (nothing)
            star = self.node("rule", name=name)
            self.children[star] = [self.node("sequence", [x, star], name=name), self.node("sequence", [], name=name)]
            return [x] * lo + [star]
        tail: Optional[int] = None  # x{0,k} as Q_k ::= x Q_(k-1) | (nothing)
        for _ in range(hi - lo):
            tail = self.anon([[x] + ([tail] if tail is not None else []), []], name)
        return [x] * lo + ([tail] if tail is not None else [])

    def sequence_elements(self, items: list, name: str) -> List[int]:
        elements: List[int] = []
        for item in items:
            elements.extend(self.item(item, name))
        return elements


def _closure(b: _Builder, holds: List[bool]) -> List[bool]:
    """Least fixed point from the character sets' values in `holds`: a rule holds when one of its
    alternatives does, a sequence when all its elements do (productive: derives some text;
    nullable: derives the empty one)."""
    changed = True
    while changed:
        changed = False
        for i, kind in enumerate(b.kind):
            if holds[i] or kind == "charset":
                continue
            kids = b.children[i]
            if any(holds[c] for c in kids) if kind == "rule" else all(holds[c] for c in kids):
                holds[i] = changed = True
    return holds


def _analyse(b: _Builder, root: int) -> None:
    """Drops what matches no text, refuses left recursion (in place)."""
    n = len(b.kind)
    productive = _closure(b, [b.kind[i] == "charset" and bool(b.sets[i]) for i in range(n)])
    if not productive[root]:
        _fail("the root rule matches no text")
    for i in range(n):
        if b.kind[i] == "rule":
            b.children[i] = [c for c in b.children[i] if productive[c]]
    nullable = _closure(b, [False] * n)
    # rule -> the rules that can come first in one of its alternatives
    first: Dict[int, List[int]] = {}
    for i in range(n):
        if b.kind[i] != "rule" or not productive[i]:
            continue
        first[i] = []
        for alt in b.children[i]:
            for e in b.children[alt]:
                if b.kind[e] == "rule":
                    first[i].append(e)
                if not nullable[e]:
                    break
    state: Dict[int, int] = {}  # 1: on the path, 2: done
    for start in first:
        if state.get(start):
            continue
        stack: List[Tuple[int, int]] = [(start, 0)]
        path = [start]
        state[start] = 1
        while stack:
            r, k = stack.pop()
            if k < len(first[r]):
                stack.append((r, k + 1))
                nxt = first[r][k]
                if state.get(nxt) == 1:
                    cycle = path[path.index(nxt):] + [nxt]
                    _fail("left recursion (a rule that can start with itself): " +
                          " -> ".join(b.names[c] for c in cycle))
                if not state.get(nxt):
                    state[nxt] = 1
                    path.append(nxt)
                    stack.append((nxt, 0))
            else:
                state[r] = 2
                path.pop()


def _emit(b: _Builder, root: int) -> "_C.JsonSchema":
    order, index = reachable(root, lambda i: b.children[i])
    out = _C.JsonSchema()
    for i in order:
        if b.kind[i] == "charset":
            dfa = out.add_dfa([False, True], [[(lo, hi, 1) for lo, hi in b.sets[i]], []], [1, 0])
            out.add_node("charset", dfa=dfa)
        else:
            out.add_node(b.kind[i], [index[c] for c in b.children[i]])
    out.root = 0
    out.validate()
    return out


def compile_grammar(text) -> "_C.JsonSchema":
    """A GBNF grammar (its text) compiled for structured output; LlamasError names what is wrong
    and where. The last 64 compiled are kept (schema_compiler.cached)."""
    if isinstance(text, _C.JsonSchema):
        return text
    if not isinstance(text, str):
        raise LlamasError(f"[grammar] the grammar must be a string, got {type(text).__name__}")
    if len(text) > MAX_GRAMMAR_CHARS:
        _fail(f"the grammar has {len(text)} characters; at most {MAX_GRAMMAR_CHARS}")

    def build():
        try:
            rules = _Parser(text).parse()
            if "root" not in rules:
                _fail("a grammar needs a rule named 'root' (what the whole output matches)")
            builder = _Builder(rules)
            root = builder.build("root")
        except RecursionError:  # groups inside groups hundreds deep
            _fail("the grammar nests too deeply (groups inside groups)")
        _analyse(builder, root)
        return _emit(builder, root)
    return cached("grammar:" + text, build)
