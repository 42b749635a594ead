"""Structured output in request bodies: response_format (json_object, json_schema), vLLM's
guided_json, guided_regex, guided_grammar and guided_choice; at most one of them per request."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

from ._C import LlamasError
from .grammar import compile_grammar
from .json_schema import compile_guided_regex, compile_json_schema
from .request import MAX_CHOICE_BYTES, MAX_CHOICES
from .server_protocol import bad, check_text, check_unknown, typename


def get_guided_choice(body: dict) -> Optional[List[str]]:
    """vLLM's guided_choice: the output is exactly one of these strings."""
    v = body.get("guided_choice")
    if v is None:
        return None
    if not isinstance(v, list) or not v:
        raise bad(f"'guided_choice' must be a non-empty array of strings, got {typename(v)}.", "guided_choice",
                  "invalid_type" if not isinstance(v, list) else "invalid_value")
    for c in v:
        if not isinstance(c, str):
            raise bad(f"'guided_choice' must contain strings, got {typename(c)}.", "guided_choice", "invalid_type")
        check_text(c, "guided_choice")
        if not c:
            raise bad("'guided_choice' strings must not be empty.", "guided_choice", "invalid_value")
    if len(v) > MAX_CHOICES:
        raise bad(f"'guided_choice' has {len(v)} strings; at most {MAX_CHOICES}.", "guided_choice", "invalid_value")
    if max(len(c.encode()) for c in v) > MAX_CHOICE_BYTES:
        raise bad(f"a 'guided_choice' string has more than {MAX_CHOICE_BYTES} UTF-8 bytes.", "guided_choice",
                  "invalid_value")
    return v


def _schema(schema, param: str, compile=compile_json_schema):
    """A JSON Schema (or regex) compiled for structured output; its faults as a 400 naming `param`."""
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
        return False, _schema(spec["schema"], "response_format")
    if kind not in ("text", "json_object") or len(rf) != 1:
        raise bad("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                  "{\"type\": \"json_schema\", \"json_schema\": {...}}.", "response_format", "invalid_value")
    return kind == "json_object", None


def get_guided_json(body: dict):
    """vLLM's guided_json: a JSON Schema (an object, or its JSON text), compiled; None when absent."""
    v = body.get("guided_json")
    if v is None:
        return None
    if not isinstance(v, (dict, str, bool)):
        raise bad(f"'guided_json' must be a JSON Schema (an object or its JSON text), got {typename(v)}.",
                  "guided_json", "invalid_type")
    if isinstance(v, str):
        check_text(v, "guided_json")
    return _schema(v, "guided_json")


def get_structured_output(body: dict, sampling: dict) -> Optional[str]:
    """Fills sampling's json_object, json_schema, regex and choices from the body; returns the one
    asked for, as the message names it, or None."""
    sampling["choices"] = get_guided_choice(body)
    sampling["json_object"], schema = get_response_format(body)
    guided_json = get_guided_json(body)
    sampling["json_schema"] = schema if schema is not None else guided_json
    regex = body.get("guided_regex")
    if regex is not None:
        check_text(regex, "guided_regex")
        regex = _schema(regex, "guided_regex", compile_guided_regex)
    sampling["regex"] = regex
    grammar = body.get("guided_grammar")
    if grammar is not None:
        check_text(grammar, "guided_grammar")
        grammar = _schema(grammar, "guided_grammar", compile_grammar)
    sampling["grammar"] = grammar
    asked = [name for name, on in (("'response_format' json_object", sampling["json_object"]),
                                   ("'response_format' json_schema", schema is not None),
                                   ("'guided_json'", guided_json is not None),
                                   ("'guided_regex'", regex is not None),
                                   ("'guided_grammar'", grammar is not None),
                                   ("'guided_choice'", sampling["choices"])) if on]
    if len(asked) > 1:
        raise bad(f"{asked[0]} cannot be combined with {asked[1]}.", asked[1].split("'")[1], "invalid_value")
    return asked[0] if asked else None
