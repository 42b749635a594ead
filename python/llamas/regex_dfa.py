"""Regular expressions for structured output (vLLM's guided_regex, JSON Schema's `pattern`),
compiled to a DFA over Unicode code points that the native recogniser follows character by
character (csrc/runtime/json_schema.cpp).

The syntax is ECMAScript's (what JSON Schema specifies), less what a finite automaton cannot do:
literals and escapes (\\t \\n \\r \\f \\v \\0 \\xHH \\uHHHH \\u{H...}, escaped punctuation), `.`,
classes `[a-z]` `[^...]` with \\d \\w \\s and their negations, groups `(...)` `(?:...)`
`(?<name>...)`, alternation `|`, quantifiers `* + ? {n} {n,} {n,m}` (lazy forms too: the set of
matches is the same). `^` at the start and `$` at the end are accepted; the output is always a
whole match. Refused: backreferences, lookaround, word boundaries, anchors elsewhere.

`alphabet` limits the code points the output may use: inside a JSON string, control characters
other than \\b \\f \\n \\r \\t cannot be written (no \\u escapes), so a pattern that needs one has no
match there. States from which no match can be completed are pruned, so every prefix the DFA
accepts can be completed; each state also carries the fewest characters still needed.
"""
from __future__ import annotations

from typing import Dict, FrozenSet, List, Tuple

from ._C import LlamasError
from .regex_parse import ANY, JSON_STRING, Intervals, Intervals3, RegexParser, intersect

__all__ = ["ANY", "JSON_STRING", "Dfa", "compile_regex"]
MAX_NFA_STATES = 10_000
MAX_DFA_STATES = 2_000
MAX_WORK = 2_000_000         # interval comparisons in the subset construction

class _Nfa:
    def __init__(self):
        self.eps: List[List[int]] = []
        self.edges: List[List[Tuple[int, int, int]]] = []

    def state(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise LlamasError(f"[regex] the pattern needs more than {MAX_NFA_STATES} automaton states")
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, node) -> Tuple[int, int]:
        kind = node[0]
        if kind == "set":
            s, e = self.state(), self.state()
            self.edges[s].extend((lo, hi, e) for lo, hi in node[1])
            return s, e
        if kind == "cat":
            s = e = self.state()
            for part in node[1]:
                ps, pe = self.build(part)
                self.eps[e].append(ps)
                e = pe
            return s, e
        if kind == "alt":
            s, e = self.state(), self.state()
            for part in node[1]:
                ps, pe = self.build(part)
                self.eps[s].append(ps)
                self.eps[pe].append(e)
            return s, e
        _, inner, lo, hi = node
        s = e = self.state()
        for _ in range(lo):
            ps, pe = self.build(inner)
            self.eps[e].append(ps)
            e = pe
        if hi is None:  # then any number more
            ps, pe = self.build(inner)
            self.eps[e].append(ps)
            self.eps[pe].append(ps)
            end = self.state()
            self.eps[e].append(end)
            self.eps[pe].append(end)
            return s, end
        end = self.state()
        for _ in range(hi - lo):  # each optional copy may end the repeat
            self.eps[e].append(end)
            ps, pe = self.build(inner)
            self.eps[e].append(ps)
            e = pe
        self.eps[e].append(end)
        return s, end

    def closure(self, states) -> FrozenSet[int]:
        seen, stack = set(states), list(states)
        while stack:
            for t in self.eps[stack.pop()]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return frozenset(seen)


class Dfa:
    """states[i] = (accepting, [(lo, hi, next)], fewest characters to a match)."""

    def __init__(self, accepting: List[bool], edges: List[Intervals3], dist: List[int]):
        self.accepting, self.edges, self.dist = accepting, edges, dist

    def matches(self, text: str) -> bool:
        s = 0
        for ch in text:
            s = next((t for lo, hi, t in self.edges[s] if lo <= ord(ch) <= hi), -1)
            if s < 0:
                return False
        return self.accepting[s]



def compile_regex(pattern: str, alphabet: Intervals = ANY, where: str = "the pattern") -> Dfa:
    """The DFA of the pattern's whole matches over `alphabet`, live states only; state 0 starts."""
    if not isinstance(pattern, str):
        raise LlamasError(f"[regex] {where} must be a string, got {type(pattern).__name__}")
    ast = RegexParser(pattern, where).parse()
    nfa = _Nfa()
    start, end = nfa.build(ast)
    first = nfa.closure([start])
    index: Dict[FrozenSet[int], int] = {first: 0}
    order = [first]
    edges: List[Intervals3] = []
    work = 0
    for states in order:  # grows as new subsets are found
        raw = [(lo, hi, t) for s in states for lo, hi, t in nfa.edges[s]]
        cuts = sorted({lo for lo, _, _ in raw} | {hi + 1 for _, hi, _ in raw})
        work += len(raw) * len(cuts) + len(states)
        if work > MAX_WORK:  # a request's pattern must not hold the server for long (~0.2 s at most)
            raise LlamasError(f"[regex] {where} is too complex to compile into an automaton")
        out: Intervals3 = []
        for a, b in zip(cuts, cuts[1:]):
            targets = [t for lo, hi, t in raw if lo <= a and b - 1 <= hi]
            if not targets:
                continue
            for lo, hi in intersect([(a, b - 1)], alphabet):
                target = nfa.closure(targets)
                if target not in index:
                    if len(order) >= MAX_DFA_STATES:
                        raise LlamasError(f"[regex] {where} needs more than {MAX_DFA_STATES} automaton states")
                    index[target] = len(order)
                    order.append(target)
                t = index[target]
                if out and out[-1][2] == t and out[-1][1] + 1 == lo:
                    out[-1] = (out[-1][0], hi, t)
                else:
                    out.append((lo, hi, t))
        edges.append(out)
    accepting = [end in states for states in order]
    # fewest characters from each state to a match (breadth-first from the accepting states back)
    n = len(order)
    back: List[List[int]] = [[] for _ in range(n)]
    for s, out in enumerate(edges):
        for _, _, t in out:
            back[t].append(s)
    dist = [-1] * n
    frontier = [s for s in range(n) if accepting[s]]
    for s in frontier:
        dist[s] = 0
    while frontier:
        nxt = []
        for t in frontier:
            for s in back[t]:
                if dist[s] < 0:
                    dist[s] = dist[t] + 1
                    nxt.append(s)
        frontier = nxt
    if dist[0] < 0:
        raise LlamasError(f"[regex] {where} has no match that can be written here")
    live = [s for s in range(n) if dist[s] >= 0]  # state 0 stays first
    renumber = {s: i for i, s in enumerate(live)}
    return Dfa([accepting[s] for s in live],
               [[(lo, hi, renumber[t]) for lo, hi, t in edges[s] if t in renumber] for s in live],
               [dist[s] for s in live])
