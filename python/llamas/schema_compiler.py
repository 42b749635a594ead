"""The JSON Schema compiler behind llamas.json_schema: keywords checked, $ref resolved, the node
table of the native recogniser built (csrc/runtime/json_schema.h), then aliases removed, anyOf
flattened, what admits no value pruned and each node's least nesting depth computed."""
from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from decimal import Decimal
from fractions import Fraction
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import unquote

from . import _C
from ._C import LlamasError
from .regex_dfa import JSON_STRING, compile_regex

MAX_NODES = 10_000
MAX_ENUM = 4096              # values of one enum / const set
MAX_LITERAL_BYTES = 4096     # one enum value's JSON text
MAX_PROPERTIES = 64          # of one object (the recogniser's candidate mask)
MAX_INTEGER = 10 ** 18 - 1   # integers are written with at most 18 digits
MAX_DEPTH = 24               # values open at once (the recogniser's stack)

ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly", "format", "$anchor", "discriminator", "contentMediaType",
               "contentEncoding", "$defs", "definitions"}
TYPE_KEYWORDS = {
    "string": {"minLength", "maxLength", "pattern"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "array": {"items", "minItems", "maxItems", "uniqueItems"},
    "object": {"properties", "required", "additionalProperties", "minProperties", "maxProperties"},
    "boolean": set(), "null": set(),
}
KNOWN = ANNOTATIONS | {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"} | \
    set().union(*TYPE_KEYWORDS.values())


def _fail(path: str, message: str) -> None:
    raise LlamasError(f"[json_schema] at {path}: {message}")


def _literal(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _is_type(value: Any, t: str) -> bool:
    if t == "null":
        return value is None
    if t == "boolean":
        return isinstance(value, bool)
    if t == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or \
            (isinstance(value, float) and value.is_integer())
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t == "string":
        return isinstance(value, str)
    if t == "array":
        return isinstance(value, list)
    return isinstance(value, dict)


def _count(schema: dict, key: str, path: str) -> Optional[int]:
    v = schema.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        _fail(path, f"'{key}' must be a non-negative integer, got {v!r:.40}")
    return v


def _number(schema: dict, key: str, path: str):
    v = schema.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                          or (isinstance(v, float) and not math.isfinite(v))):
        _fail(path, f"'{key}' must be a finite number, got {v!r:.40}")
    if isinstance(v, int) and abs(v) > 10 ** 18:  # past every 18-digit number: no closer than 10^18
        v = 10 ** 18 if v > 0 else -10 ** 18
    return v


# `format` is an annotation in JSON Schema 2020-12, but an output that keeps to it is what a caller
# asking for "date-time" wants: these formats are written as the syntax their RFCs give (a date's
# day is 01-31 whatever the month; an email is a common subset of RFC 5321's).
_OCTET = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_TIME = r"([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,6})?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)"
_DATE = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
FORMAT_PATTERNS = {
    "date-time": _DATE + "T" + _TIME,
    "date": _DATE,
    "time": _TIME,
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "ipv4": rf"({_OCTET}\.){{3}}{_OCTET}",
    "email": r"[A-Za-z0-9._%+-]{1,40}@[A-Za-z0-9-]{1,30}(\.[A-Za-z0-9-]{1,30}){0,2}\.[A-Za-z]{2,10}",
}
_format_dfas: Dict[str, Any] = {}


def _decimal(x):
    """A bound for the recogniser: None, an int, or a float as (m, e), its shortest decimal m 10^e."""
    if x is None or isinstance(x, int):
        return x
    sign, digits, exponent = Decimal(repr(x)).as_tuple()
    m = int("".join(map(str, digits)))
    return (-m if sign else m, exponent)


def writable_number(lo, lo_open: bool, hi, hi_open: bool) -> bool:
    """Whether some number in the bounds (None: open-ended) can be written as the recogniser
    writes a bounded number: at most 18 digits in all, the integer part's (at least one, "0."
    included) and the fraction's, no exponent. So k / 10^f for |k| < 10^18 and f <= 17; checked
    exactly (1e-300 lies between 0 and 1e-17, and no such number is in [1e-300, 2e-300]), as the
    recogniser checks them: a float as its shortest decimal (see _decimal)."""
    for f in range(18):
        scale = 10 ** f
        kmin, kmax = -MAX_INTEGER, MAX_INTEGER
        if lo is not None:
            x = Fraction(repr(lo) if isinstance(lo, float) else lo) * scale
            kmin = max(kmin, math.floor(x) + 1 if lo_open and x.denominator == 1 else math.ceil(x))
        if hi is not None:
            x = Fraction(repr(hi) if isinstance(hi, float) else hi) * scale
            kmax = min(kmax, math.ceil(x) - 1 if hi_open and x.denominator == 1 else math.floor(x))
        if kmin <= kmax:
            return True
    return False


def _format_dfa(name: str):
    """(Built on first use: the six take ~0.15 s, which `import llamas` should not pay.)"""
    if name not in _format_dfas:
        _format_dfas[name] = compile_regex(FORMAT_PATTERNS[name], JSON_STRING, f"format {name!r}")
    return _format_dfas[name]



def reachable(root: int, children) -> Tuple[List[int], Dict[int, int]]:
    """The nodes reachable from root, depth first (root first), and each one's index in that order:
    the native table holds only these, renumbered from 0."""
    order: List[int] = []
    index: Dict[int, int] = {}
    stack = [root]
    while stack:
        i = stack.pop()
        if i in index:
            continue
        index[i] = len(order)
        order.append(i)
        stack.extend(reversed(children(i)))
    return order, index


_cache: "OrderedDict[str, _C.JsonSchema]" = OrderedDict()
_CACHE_SIZE = 64
_cache_lock = threading.Lock()  # the server compiles in worker threads


def cached(key: str, build) -> "_C.JsonSchema":
    """The compiled schema, regex or grammar for key, built by build() the first time; the last
    64 are kept (a server sees the same one request after request)."""
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    compiled = build()  # (outside the lock: two threads may compile one schema, the second is kept)
    with _cache_lock:
        _cache[key] = compiled
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return compiled


class SchemaCompiler:
    def __init__(self, document: Any):
        self.document = document
        self.nodes: List[Dict[str, Any]] = []
        self.refs: Dict[str, int] = {}
        self._any: Optional[int] = None
        self._string: Optional[int] = None
        self.unwritable: List[str] = []  # where bounds left no number 18 digits can write

    def new(self, kind: str, **fields) -> int:
        if len(self.nodes) >= MAX_NODES:
            raise LlamasError(f"[json_schema] the schema compiles to more than {MAX_NODES} nodes")
        node = dict(kind=kind, children=[], literals=[], required=[], min_count=0, max_count=None, lo=None, hi=None,
                    lo_exclusive=False, hi_exclusive=False, dfa=None)
        node.update(fields)
        self.nodes.append(node)
        return len(self.nodes) - 1

    def any(self) -> int:
        """Any JSON value."""
        if self._any is None:
            self._any = self.new("anyOf")
            scalars = self.new("enum", literals=[b"false", b"null", b"true"])
            array = self.new("array", children=[self._any])
            obj = self.new("map", children=[self._any, self.free_string()])
            self.nodes[self._any]["children"] = [scalars, self.new("number"), self.free_string(), array, obj]
        return self._any

    def free_string(self) -> int:
        if self._string is None:
            self._string = self.new("string")
        return self._string

    def ref(self, ref: Any, path: str) -> int:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            _fail(path, f"'$ref' must point into this schema ('#' or '#/...'), got {ref!r:.80}")
        if ref not in self.refs:
            self.refs[ref] = alias = self.new("alias")  # filled below; recursion lands here
            target = self.document
            for part in ref[2:].split("/") if ref != "#" else []:
                # a URI fragment: percent-decoded first ("#/$defs/a%20b"), then JSON pointer's escapes
                part = unquote(part).replace("~1", "/").replace("~0", "~")
                if isinstance(target, dict) and part in target:
                    target = target[part]
                elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                    target = target[int(part)]
                else:
                    _fail(path, f"'$ref' {ref!r:.80} points to nothing")
            self.nodes[alias]["children"] = [self.compile(target, ref)]
        return self.refs[ref]

    def compile(self, schema: Any, path: str) -> int:
        if schema is True:
            return self.any()
        if schema is False:
            return self.new("never")
        if not isinstance(schema, dict):
            _fail(path, f"a schema must be an object or a boolean, got {type(schema).__name__}")
        for key in schema:
            if key not in KNOWN:
                _fail(path, f"'{key}' is not supported")
        constraining = [k for k in schema if k not in ANNOTATIONS]
        if "$ref" in schema:
            if len(constraining) > 1:
                _fail(path, "keywords beside '$ref' are not supported")
            return self.ref(schema["$ref"], path)
        if "allOf" in schema:
            alls = schema["allOf"]
            if not isinstance(alls, list) or len(alls) != 1 or len(constraining) > 1:
                _fail(path, "'allOf' is supported with exactly one schema and nothing beside it")
            return self.compile(alls[0], f"{path}/allOf/0")
        for key in ("anyOf", "oneOf"):
            if key in schema:
                alts = schema[key]
                if not isinstance(alts, list) or not alts:
                    _fail(path, f"'{key}' must be a non-empty array of schemas")
                if len(constraining) > 1:
                    _fail(path, f"keywords beside '{key}' are not supported")
                return self.new("anyOf", children=[self.compile(a, f"{path}/{key}/{i}") for i, a in enumerate(alts)])
        types = schema.get("type")
        if types is None:
            # No type: the types whose keywords appear (a schema of only annotations is any value).
            types = [t for t in ("object", "array", "string", "number") if TYPE_KEYWORDS[t] & set(schema)]
            if not types and "enum" not in schema and "const" not in schema:
                return self.any()
        elif isinstance(types, str):
            types = [types]
        if not isinstance(types, list) or not all(isinstance(t, str) and t in TYPE_KEYWORDS for t in types):
            _fail(path, f"'type' must be one of {sorted(TYPE_KEYWORDS)} or a list of them, got {types!r:.80}")
        if "enum" in schema or "const" in schema:
            return self.enum(schema, types, path)
        nodes = [self.typed(schema, t, path) for t in dict.fromkeys(types)]
        return nodes[0] if len(nodes) == 1 else self.new("anyOf", children=nodes)

    def enum(self, schema: dict, types: List[str], path: str) -> int:
        if "const" in schema:
            values = [schema["const"]]
        else:
            values = schema["enum"]
            if not isinstance(values, list):
                _fail(path, "'enum' must be an array")
        if types:
            values = [v for v in values if any(_is_type(v, t) for t in types)]
        literals = sorted({_literal(v) for v in values})
        if len(literals) > MAX_ENUM:
            _fail(path, f"'enum' has {len(literals)} values; at most {MAX_ENUM}")
        for lit in literals:
            if len(lit) > MAX_LITERAL_BYTES:
                _fail(path, f"an 'enum' value's JSON is {len(lit)} bytes; at most {MAX_LITERAL_BYTES}")
        return self.new("enum", literals=literals) if literals else self.new("never")

    def typed(self, schema: dict, t: str, path: str) -> int:
        if t == "null":
            return self.new("enum", literals=[b"null"])
        if t == "boolean":
            return self.new("enum", literals=[b"false", b"true"])
        if t == "string":
            lo, hi = _count(schema, "minLength", path) or 0, _count(schema, "maxLength", path)
            if hi is not None and lo > hi:
                return self.new("never")
            if "pattern" in schema:
                # The output is a whole match of the pattern (JSON Schema's is a search, so a whole
                # match is one too), written with what a JSON string can hold without \u escapes.
                dfa = compile_regex(schema["pattern"], JSON_STRING, f"at {path}: 'pattern'")
                if lo > dfa.dist[0]:
                    _fail(path, f"'minLength' beside 'pattern' is supported up to the pattern's shortest match "
                                f"({dfa.dist[0]} characters), got {lo}")
            elif schema.get("format") in FORMAT_PATTERNS and lo <= _format_dfa(schema["format"]).dist[0]:
                dfa = _format_dfa(schema["format"])  # (a longer minLength: the format is left to the model)
            else:
                return self.new("string", min_count=lo, max_count=hi)
            if hi is not None and dfa.dist[0] > hi:
                return self.new("never")
            return self.new("string", max_count=hi, dfa=dfa)
        if t in ("integer", "number"):
            return self.number(schema, t, path)
        if t == "array":
            return self.array(schema, path)
        return self.object(schema, path)

    def number(self, schema: dict, t: str, path: str) -> int:
        lo, hi = _number(schema, "minimum", path), _number(schema, "maximum", path)
        lo_x, hi_x = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        lo_open = hi_open = False
        # draft 4 spells them as booleans beside minimum / maximum; later drafts as numbers
        if isinstance(lo_x, bool):
            lo_open = lo_x and lo is not None
        elif lo_x is not None:
            lo_x = _number(schema, "exclusiveMinimum", path)
            if lo is None or lo_x >= lo:
                lo, lo_open = lo_x, True
        if isinstance(hi_x, bool):
            hi_open = hi_x and hi is not None
        elif hi_x is not None:
            hi_x = _number(schema, "exclusiveMaximum", path)
            if hi is None or hi_x <= hi:
                hi, hi_open = hi_x, True
        if t == "integer":
            # inclusive integer bounds, inside what 18 digits can write
            ilo = -MAX_INTEGER if lo is None else max(-MAX_INTEGER, math.floor(lo) + 1 if lo_open else math.ceil(lo))
            ihi = MAX_INTEGER if hi is None else min(MAX_INTEGER, math.ceil(hi) - 1 if hi_open else math.floor(hi))
            if ilo > ihi:
                if (lo is not None and lo > MAX_INTEGER) or (hi is not None and hi < -MAX_INTEGER):
                    self.unwritable.append(path)
                return self.new("never")
            return self.new("integer", lo=None if lo is None and ilo == -MAX_INTEGER else int(ilo),
                            hi=None if hi is None and ihi == MAX_INTEGER else int(ihi))
        if lo is not None and hi is not None and (lo > hi or (lo == hi and (lo_open or hi_open))):
            return self.new("never")
        if not writable_number(lo, lo_open, hi, hi_open):  # (1e20, or [1e-300, 2e-300]: not in 18 digits)
            self.unwritable.append(path)
            return self.new("never")
        # The recogniser compares the bounds exactly, as the schema wrote them: an int as it is,
        # a float as its shortest decimal (0.1 is 1e-1, not the double nearest it).
        return self.new("number", lo=_decimal(lo), hi=_decimal(hi), lo_exclusive=lo_open, hi_exclusive=hi_open)

    def array(self, schema: dict, path: str) -> int:
        if schema.get("uniqueItems") not in (None, False):
            _fail(path, "'uniqueItems' is not supported")
        lo, hi = _count(schema, "minItems", path) or 0, _count(schema, "maxItems", path)
        if hi is not None and lo > hi:
            return self.new("never")
        items = schema.get("items", True)
        if isinstance(items, list):
            _fail(path, "'items' as an array (tuple validation) is not supported")
        return self.new("array", children=[self.compile(items, f"{path}/items")], min_count=lo, max_count=hi)

    def object(self, schema: dict, path: str) -> int:
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            _fail(path, "'properties' must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            _fail(path, "'required' must be an array of strings")
        extra = schema.get("additionalProperties", True)
        lo, hi = _count(schema, "minProperties", path) or 0, _count(schema, "maxProperties", path)
        if lo > 255:
            _fail(path, f"'minProperties' above 255 is not supported, got {lo}")
        if hi is not None and lo > hi:
            return self.new("never")
        if not props and not required and extra is not False:
            # a free-form object: any keys, values of additionalProperties' schema. Its keys are free
            # strings, which could repeat, and a repeated key counts once: past 1, minProperties
            # could be written and still not be met.
            if lo > 1:
                _fail(path, f"'minProperties' above 1 needs 'properties' (free-form keys could repeat), got {lo}")
            return self.new("map", children=[self.compile(extra, f"{path}/additionalProperties"), self.free_string()],
                            min_count=lo, max_count=hi)
        names = list(props) + [r for r in dict.fromkeys(required) if r not in props]
        if len(names) > MAX_PROPERTIES:
            _fail(path, f"an object with {len(names)} properties; at most {MAX_PROPERTIES}")
        children = []
        for name in names:
            if name in props:
                children.append(self.compile(props[name], f"{path}/properties/{name}"))
            elif extra is False:
                return self.new("never")  # a required property that may not appear
            else:
                children.append(self.compile(extra, f"{path}/additionalProperties"))
        return self.new("object", children=children, literals=[json.dumps(n, ensure_ascii=False)[1:-1].encode()
                                                               for n in names],
                        required=[n in required for n in names], min_count=lo, max_count=hi)

    def finish(self, root: int) -> "_C.JsonSchema":
        """The native table (schema_tables.finish_nodes)."""
        from .schema_tables import finish_nodes
        try:
            return finish_nodes(self.nodes, root)
        except LlamasError as e:
            if "admits no value" not in str(e) or not self.unwritable:
                raise
            raise LlamasError(f"[json_schema] the schema admits no value that constrained output can write: the "
                              f"bounds at {', '.join(self.unwritable[:3])} hold no number of at most 18 digits "
                              "(bounded numbers are written without an exponent)") from None
