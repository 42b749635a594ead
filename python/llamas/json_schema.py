"""JSON Schema for structured output (OpenAI's response_format {"type": "json_schema"}, vLLM's
guided_json): a schema is checked, its $refs resolved, and compiled into the node table of the
native recogniser (csrc/runtime/json_schema.h), which then masks every token that would leave
the schema's instances.

Supported: type (one or a list), enum, const, properties, required, additionalProperties,
minProperties, maxProperties, items,
minItems, maxItems, minLength, maxLength, pattern (the string is a whole match; llamas.regex_parse
has the syntax), minimum, maximum, exclusiveMinimum, exclusiveMaximum, anyOf, oneOf (generated as
anyOf), allOf of one schema, $ref into the same document ($defs, definitions, any JSON pointer;
recursion allowed), true / false schemas; format date-time, date, time, uuid, ipv4 and email as
their syntax (schema_compiler.FORMAT_PATTERNS). Other annotations (title, description, default,
examples, other formats, ...) are ignored. Anything else (multipleOf, not, if/then/else,
patternProperties, uniqueItems, prefixItems, ...) is refused with the keyword's name and where it
is, rather than producing output the schema might reject.

How the output is written (all valid instances): properties in the schema's order, optional ones
skippable, never ones the schema does not list; integers as plain digits (at most 18), numbers
with bounds without an exponent and at most 18 digits; strings without \\u escapes; enum and
const values in compact JSON; whitespace between tokens only as one space, or a newline and at
most 20 spaces or tabs. Nesting is limited to 24 open values."""
from __future__ import annotations

import json
from typing import Any

from . import _C
from ._C import LlamasError
from .regex_dfa import compile_regex
from .schema_compiler import SchemaCompiler, cached

def compile_guided_regex(pattern: Any) -> "_C.JsonSchema":
    """vLLM's guided_regex: the whole output is text matching this regular expression (the syntax of
    llamas.regex_dfa), compiled for the same recogniser. Raises LlamasError naming what it cannot
    follow."""
    if isinstance(pattern, _C.JsonSchema):
        return pattern
    if not isinstance(pattern, str):
        raise LlamasError(f"[regex] the pattern must be a string, got {type(pattern).__name__}")

    def build():
        dfa = compile_regex(pattern)
        out = _C.JsonSchema()
        out.add_node("regex", dfa=out.add_dfa(dfa.accepting, dfa.edges, dfa.dist))
        out.root = 0
        out.validate()
        return out
    return cached("regex:" + pattern, build)


def compile_json_schema(schema: Any, compact: bool = False) -> "_C.JsonSchema":
    """The native form of a JSON Schema (a dict, a bool, or its JSON text). Raises LlamasError naming
    the keyword and the place in the schema it cannot follow. The last 64 schemas are cached (a
    server sees the same one request after request)."""
    if isinstance(schema, _C.JsonSchema):
        return schema
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise LlamasError(f"[json_schema] not valid JSON: {e}") from None
    try:
        key = json.dumps(schema, sort_keys=True, allow_nan=False)
        json.dumps(schema, ensure_ascii=False).encode("utf-8")  # its strings become output bytes
    except UnicodeEncodeError as e:
        bad = e.object[e.start:e.end].encode("unicode_escape").decode()
        raise LlamasError(f"[json_schema] the schema holds a lone surrogate ({bad}), which is not valid UTF-8 "
                          "text") from None
    except (TypeError, ValueError) as e:
        raise LlamasError(f"[json_schema] the schema is not JSON data: {e}") from None
    except RecursionError:
        raise LlamasError("[json_schema] the schema nests too deeply") from None

    def build():
        compiler = SchemaCompiler(schema)
        try:
            compiled = compiler.finish(compiler.compile(schema, "#"))
        except RecursionError:
            raise LlamasError("[json_schema] the schema nests too deeply") from None
        compiled.compact = compact
        return compiled
    return cached(("compact:" if compact else "schema:") + key, build)
