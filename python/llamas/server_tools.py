"""Tool calls on /v1/chat/completions (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`),
through structured output: with tool_choice "required" the reply is held to a JSON array of calls,
each an object with one property, the function's name, whose value is its arguments (so the
recogniser knows from the name's bytes which `parameters` schema follows: objects with a "name"
and an "arguments" property would be one reading per function until the name is written); one
call unless parallel_tool_calls. With a named function the reply is held to that function's
`parameters` schema. The server then answers with `tool_calls`.
tool_choice "none" generates text (the tools still reach the chat template). "auto", where the
model itself decides whether to call a tool, needs a model trained to say so and a parser for its
way of saying it; it is refused, as vLLM does without --enable-auto-tool-choice."""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, List, Optional

from .json_schema import compile_json_schema
from .server_guided import compile_field
from .server_protocol import bad, check_text, check_unknown, get_bool, typename

MAX_TOOLS = 128
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")  # OpenAI's rule for function names
EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}  # no arguments: {}


@dataclass
class ToolPlan:
    tools: List[dict]            # as given, for the chat template
    mode: str                    # "none", "required" or "named"
    name: Optional[str] = None   # the named function
    schema: Any = None           # the compiled schema the reply is held to (None for "none")

    def calls(self, text: str) -> Optional[List[dict]]:
        """The reply as OpenAI tool_calls, or None when it is not whole (cut by max_tokens or a stop)."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        calls = [(self.name, value)] if self.mode == "named" else [next(iter(c.items())) for c in value]
        return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                 "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
                for name, arguments in calls]

    def finish_reason(self, reason: str) -> str:
        # OpenAI: "tool_calls" when the model chose to call, "stop" when a named function was forced
        return "tool_calls" if reason == "stop" and self.mode == "required" else reason


def _function(tool: Any, where: str) -> dict:
    if not isinstance(tool, dict):
        raise bad(f"'{where}' must be an object, got {typename(tool)}.", where, "invalid_type")
    check_unknown(tool, {"type", "function"})
    if tool.get("type") != "function":
        raise bad(f"'{where}.type' must be \"function\".", f"{where}.type", "invalid_value")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise bad(f"'{where}.function' must be an object, got {typename(fn)}.", f"{where}.function", "invalid_type")
    check_unknown(fn, {"name", "description", "parameters", "strict"})
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise bad(f"'{where}.function.name' must be 1-64 letters, digits, '_' or '-', got {json.dumps(name)[:70]}.",
                  f"{where}.function.name", "invalid_value")
    if fn.get("description") is not None:
        check_text(fn["description"], f"{where}.function.description")
    if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
        raise bad(f"'{where}.function.strict' must be a boolean.", f"{where}.function.strict", "invalid_type")
    return fn


# Keywords whose values are data, not schemas: a "$ref" inside them is not a reference.
_DATA_KEYWORDS = ("const", "enum", "default", "examples")
# Keywords whose values map names to schemas (a property may be called "$ref").
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _rebase_refs(node: Any, root: str) -> Any:
    """A copy of a tool's parameter schema whose local references ("#/$defs/A", "#") point into
    the wrapper schema it is placed in at JSON pointer `root`: tool_choice "required" holds the
    reply to an array of calls, each tool's schema under /items/properties/<name>."""
    if isinstance(node, list):
        return [_rebase_refs(x, root) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = "#" + root + value[1:]
        elif key in _DATA_KEYWORDS:
            out[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _rebase_refs(sub, root) for name, sub in value.items()}
        else:
            out[key] = _rebase_refs(value, root)
    return out


def _object_schema(schema: Any, where: str) -> Any:
    """A function's parameters schema, held to what its arguments are: a JSON object. {} and true
    (any value) become any object; a schema of another type is refused."""
    if schema is True:
        return {"type": "object"}
    if not isinstance(schema, dict):
        return schema  # (the compiler names what is wrong with it)
    t = schema.get("type")
    if t is None:
        if any(k in schema for k in ("$ref", "anyOf", "oneOf", "allOf", "enum", "const")):
            return schema
        return {**schema, "type": "object"}
    if t != "object" and not (isinstance(t, list) and "object" in t):
        raise bad(f"'{where}' must describe a JSON object (a function's arguments), got type {json.dumps(t)[:60]}.",
                  where, "invalid_value")
    return schema


def _compile(schema: Any, param: str):
    # compact: no whitespace between tokens; the server reads the call, nobody else does
    return compile_field(schema, param, lambda s: compile_json_schema(s, compact=True))


def parse_tools(body: dict, constrained: bool) -> Optional[ToolPlan]:
    """The request's tools and tool_choice; None when it has neither. `constrained`: the request
    already asks for structured output (response_format, guided_*), which a tool call replaces."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = get_bool(body, "parallel_tool_calls", True)
    if tools is None:
        if choice not in (None, "none"):
            raise bad("'tool_choice' needs 'tools'.", "tool_choice", "invalid_value")
        return None
    if not isinstance(tools, list) or not tools:
        raise bad(f"'tools' must be a non-empty array, got {typename(tools)}.", "tools", "invalid_type")
    if len(tools) > MAX_TOOLS:
        raise bad(f"'tools' has {len(tools)} functions; at most {MAX_TOOLS}.", "tools", "invalid_value")
    functions = [_function(t, f"tools[{i}]") for i, t in enumerate(tools)]
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise bad("'tools' names a function twice.", "tools", "invalid_value")
    parameters, where = {}, {}
    for i, f in enumerate(functions):
        where[f["name"]] = f"tools[{i}].function.parameters"
        parameters[f["name"]] = _object_schema(f.get("parameters", EMPTY_PARAMETERS), where[f["name"]])
    if choice is None or choice == "auto":
        raise bad("'tool_choice' \"auto\" (the default with tools) needs a model that decides for itself whether to "
                  "call a tool; this server takes \"required\", a named function ({\"type\": \"function\", "
                  "\"function\": {\"name\": ...}}) or \"none\".", "tool_choice", "unsupported_value")
    if choice == "none":
        return ToolPlan(tools, "none")
    if constrained:
        raise bad("'tool_choice' cannot be combined with 'response_format' or guided decoding.", "tool_choice",
                  "invalid_value")
    # Only the schemas a call is held to are compiled: a keyword this server does not support in
    # some other tool (agents pass whole toolsets every turn) does not fail a request that cannot call it.
    if choice == "required":
        if len(names) > 64:
            raise bad(f"tool_choice \"required\" takes at most 64 tools, got {len(names)}.", "tools", "invalid_value")
        for name, schema in parameters.items():
            _compile(schema, where[name])  # each one's faults, named
        # (names are letters, digits, '_' and '-': nothing to escape in a JSON pointer)
        rebased = {name: _rebase_refs(schema, f"/items/properties/{name}") for name, schema in parameters.items()}
        call = {"type": "object", "properties": rebased, "minProperties": 1, "maxProperties": 1,
                "additionalProperties": False}
        schema = {"type": "array", "minItems": 1, "items": call}
        if not parallel:
            schema["maxItems"] = 1
        return ToolPlan(tools, "required", schema=_compile(schema, "tools"))
    if not isinstance(choice, dict):
        raise bad("'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": "
                  f"{{\"name\": ...}}}}, got {json.dumps(choice)[:70]}.", "tool_choice", "invalid_value")
    check_unknown(choice, {"type", "function"})
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if choice.get("type") != "function" or name not in parameters:
        raise bad(f"'tool_choice' names no function of 'tools' ({', '.join(names)[:200]}).", "tool_choice",
                  "invalid_value")
    return ToolPlan(tools, "named", name=name, schema=_compile(parameters[name], where[name]))


def parse_tool_calls(calls: Any, where: str) -> List[dict]:
    """An assistant message's earlier tool_calls (for the chat template), checked."""
    if not isinstance(calls, list):
        raise bad(f"'{where}' must be an array, got {typename(calls)}.", where, "invalid_type")
    out = []
    for j, c in enumerate(calls):
        w = f"{where}[{j}]"
        if not isinstance(c, dict) or c.get("type") != "function" or not isinstance(c.get("function"), dict):
            raise bad(f"'{w}' must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}.",
                      w, "invalid_value")
        check_unknown(c, {"id", "type", "function"})
        check_unknown(c["function"], {"name", "arguments"})
        out.append({"id": check_text(c.get("id", ""), f"{w}.id"), "type": "function",
                    "function": {"name": check_text(c["function"].get("name"), f"{w}.function.name"),
                                 "arguments": check_text(c["function"].get("arguments", "{}"),
                                                         f"{w}.function.arguments")}})
    return out


# ---- answering (server_generation.py): p is the request's GenParams, fmt its ChunkFormat ---------
def calling(p) -> bool:
    """The request's reply is held to a tool call (tool_choice "required" or a named function)."""
    return p.tools is not None and p.tools.schema is not None


# The request field each kind is named by in errors (a tool call's schema rides in json_schema).
STRUCTURED_FIELD = {"json_object": "response_format", "json_schema": "response_format", "tool_call": "response_format",
                    "regex": "guided_regex", "grammar": "guided_grammar", "choice": "guided_choice"}


def structured_kind(p) -> Optional[str]:
    """The kind of structured output a request asks for (metrics, log line), or None."""
    s = p.sampling
    if calling(p):
        return "tool_call"
    return "json_object" if s.get("json_object") else "json_schema" if s.get("json_schema") is not None else \
        "regex" if s.get("regex") is not None else "grammar" if s.get("grammar") is not None else \
        "choice" if s.get("choices") else None


def tool_calls(p, text: str, reason: str):
    """A reply held to a tool call, as OpenAI's tool_calls; None for any other reply, and for one
    cut short (max_tokens, a stop string), whose text is then the content."""
    if not calling(p) or reason != "stop":
        return None
    return p.tools.calls(text)


def tool_events(p, fmt, idx: int, text: str, reason: str, usage) -> List[str]:
    """A streamed tool call's events: its reply is held back until it is whole (a half-written JSON
    call is not a call yet), then sent as one tool_calls delta and the finish chunk."""
    calls = tool_calls(p, text, reason)
    if calls is None:
        return [fmt.text(idx, text, reason, usage)]
    delta = {"tool_calls": [dict(index=k, **call) for k, call in enumerate(calls)]}
    return [fmt.frame([{"index": idx, "delta": delta, "logprobs": None, "finish_reason": None}]),
            fmt.frame([{"index": idx, "delta": {}, "logprobs": None, "finish_reason": p.tools.finish_reason(reason)}],
                      usage)]
