"""Structured output in request bodies: response_format (json_object, json_schema), vLLM's
guided_json, guided_regex, guided_grammar and guided_choice; at most one of them per request."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

from ._C import LlamasError
from .grammar import compile_grammar
from .json_schema import compile_guided_regex, compile_json_schema
from .request import MAX_CHOICE_BYTES, MAX_CHOICES
from .server_protocol import bad, check_text, check_unknown, typename


def get_choice(v, param: str = "guided_choice") -> Optional[List[str]]:
    """guided_choice (vLLM): the output is exactly one of these strings."""
    if v is None:
        return None
    if not isinstance(v, list) or not v:
        raise bad(f"'{param}' must be a non-empty array of strings, got {typename(v)}.", param,
                  "invalid_type" if not isinstance(v, list) else "invalid_value")
    for c in v:
        if not isinstance(c, str):
            raise bad(f"'{param}' must contain strings, got {typename(c)}.", param, "invalid_type")
        check_text(c, param)
        if not c:
            raise bad(f"'{param}' strings must not be empty.", param, "invalid_value")
    if len(v) > MAX_CHOICES:
        raise bad(f"'{param}' has {len(v)} strings; at most {MAX_CHOICES}.", param, "invalid_value")
    if max(len(c.encode()) for c in v) > MAX_CHOICE_BYTES:
        raise bad(f"a '{param}' string has more than {MAX_CHOICE_BYTES} UTF-8 bytes.", param, "invalid_value")
    return v


def compile_field(schema, param: str, compile=compile_json_schema):
    """A JSON Schema (regex, grammar) compiled for structured output; its faults as a 400 naming
    `param`."""
    try:
        return compile(schema)
    except LlamasError as e:
        message = str(e).replace("[json_schema] ", "").replace("[regex] ", "").replace("[grammar] ", "")
        raise bad(f"'{param}': {message}", param, "invalid_value") from None


def get_response_format(body: dict) -> Tuple[bool, Any]:
    """(JSON mode, compiled JSON Schema or None): {"type": "json_object"} is JSON mode,
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}} an
    instance of that schema, {"type": "text"} (or none) free text."""
    rf = body.get("response_format")
    if rf is None:
        return False, None
    if not isinstance(rf, dict):
        raise bad(f"'response_format' must be an object, got {typename(rf)}.", "response_format", "invalid_type")
    kind = rf.get("type")
    if kind == "json_schema":
        check_unknown(rf, {"type", "json_schema"})
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise bad(f"'response_format.json_schema' must be an object, got {typename(spec)}.", "response_format",
                      "invalid_type")
        check_unknown(spec, {"name", "description", "schema", "strict"})
        for key in ("name", "description"):
            if spec.get(key) is not None:
                check_text(spec[key], f"response_format.json_schema.{key}")
        if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
            raise bad("'response_format.json_schema.strict' must be a boolean.", "response_format", "invalid_type")
        if "schema" not in spec:
            raise bad("'response_format.json_schema.schema' is required.", "response_format",
                      "missing_required_parameter")
        return False, compile_field(spec["schema"], "response_format")
    if kind not in ("text", "json_object") or len(rf) != 1:
        raise bad("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                  "{\"type\": \"json_schema\", \"json_schema\": {...}}.", "response_format", "invalid_value")
    return kind == "json_object", None


def get_json(v, param: str = "guided_json", compact: bool = False):
    """guided_json (vLLM): a JSON Schema (an object, or its JSON text), compiled; None when absent."""
    if v is None:
        return None
    if not isinstance(v, (dict, str, bool)):
        raise bad(f"'{param}' must be a JSON Schema (an object or its JSON text), got {typename(v)}.", param,
                  "invalid_type")
    if isinstance(v, str):
        check_text(v, param)
    return compile_field(v, param, lambda schema: compile_json_schema(schema, compact=compact))


def get_text_spec(v, param: str, compile):
    """guided_regex / guided_grammar: the pattern or grammar's text, compiled; None when absent."""
    if v is None:
        return None
    check_text(v, param)
    return compile_field(v, param, compile)


STRUCTURED_OUTPUTS = {"json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace",
                      "disable_additional_properties", "disable_fallback", "whitespace_pattern", "structural_tag"}


def _structured_outputs(body: dict) -> List[Tuple[str, str, Any]]:
    """vLLM's `structured_outputs` object (what its guided_* fields became in v0.12):
    [(name for messages, sampling key, compiled value)] of what it asks for."""
    so = body.get("structured_outputs")
    if so is None:
        return []
    if not isinstance(so, dict):
        raise bad(f"'structured_outputs' must be an object, got {typename(so)}.", "structured_outputs", "invalid_type")
    check_unknown(so, STRUCTURED_OUTPUTS)
    for key in ("disable_any_whitespace", "disable_additional_properties", "disable_fallback", "json_object"):
        if so.get(key) is not None and not isinstance(so[key], bool):
            raise bad(f"'structured_outputs.{key}' must be a boolean.", f"structured_outputs.{key}", "invalid_type")
    for key in ("whitespace_pattern", "structural_tag"):
        if so.get(key) is not None:  # (whitespace is one space or a newline and indentation; see the README)
            raise bad(f"'structured_outputs.{key}' is not supported.", f"structured_outputs.{key}", "unsupported_value")
    compact = bool(so.get("disable_any_whitespace"))
    asked = [("'structured_outputs.json'", "json_schema",
              get_json(so.get("json"), "structured_outputs.json", compact)),
             ("'structured_outputs.regex'", "regex",
              get_text_spec(so.get("regex"), "structured_outputs.regex", compile_guided_regex)),
             ("'structured_outputs.grammar'", "grammar",
              get_text_spec(so.get("grammar"), "structured_outputs.grammar", compile_grammar)),
             ("'structured_outputs.choice'", "choices", get_choice(so.get("choice"), "structured_outputs.choice")),
             ("'structured_outputs.json_object'", "json_object", so.get("json_object") or None)]
    return [a for a in asked if a[2] is not None]


def get_structured_output(body: dict, sampling: dict) -> Optional[str]:
    """Fills sampling's json_object, json_schema, regex, grammar and choices from the body; returns
    the one asked for, as the message names it, or None. At most one may be asked for, by any of
    response_format, vLLM's guided_* fields and its structured_outputs."""
    if body.get("guided_decoding_backend") is not None:  # vLLM's choice of library: one here, so ignored
        check_text(body["guided_decoding_backend"], "guided_decoding_backend")
    json_object, schema = get_response_format(body)
    asked = [("'response_format' json_object", "json_object", json_object or None),
             ("'response_format' json_schema", "json_schema", schema),
             ("'guided_json'", "json_schema", get_json(body.get("guided_json"))),
             ("'guided_regex'", "regex", get_text_spec(body.get("guided_regex"), "guided_regex", compile_guided_regex)),
             ("'guided_grammar'", "grammar", get_text_spec(body.get("guided_grammar"), "guided_grammar",
                                                            compile_grammar)),
             ("'guided_choice'", "choices", get_choice(body.get("guided_choice")))]
    asked = [a for a in asked if a[2] is not None] + _structured_outputs(body)
    if len(asked) > 1:
        raise bad(f"{asked[0][0]} cannot be combined with {asked[1][0]}.", asked[1][0].split("'")[1], "invalid_value")
    sampling.update(json_object=False, json_schema=None, regex=None, grammar=None, choices=None)
    if not asked:
        return None
    name, key, value = asked[0]
    sampling[key] = value
    return name
