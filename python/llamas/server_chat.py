"""Chat for the OpenAI-compatible server: the chat request's fields and messages, and the chat
template (the model's jinja2 `chat_template`, or a plain "role: content" layout when it has none)."""
from __future__ import annotations

import json
import os
from typing import List, Optional

from .server_protocol import (COMMON_FIELDS, GenParams, bad, check_text, check_unknown, get_bool, get_int, get_str,
                              parse_common, typename)
from .server_tools import calling, parse_tool_calls, parse_tools

MAX_MESSAGES = 4096
MAX_CHAT_TOP_LOGPROBS = 20
ROLES = ("system", "developer", "user", "assistant", "tool")
# How the messages become the prompt (vLLM's chat extras), for chat completions and /tokenize.
RENDER_FIELDS = {"add_generation_prompt", "continue_final_message", "chat_template_kwargs"}
# OpenAI's fields that ask nothing this server can do differently: accepted and ignored (as vLLM
# does), so clients that send them (LangChain's reasoning_effort, the Agents SDK's verbosity,
# prompt caching keys) work. Fields that ask for what is not here (audio, web search, the
# deprecated functions) are refused by name instead of ignored.
IGNORED_CHAT_FIELDS = {"reasoning_effort", "verbosity", "prompt_cache_key", "prompt_cache_retention",
                       "safety_identifier", "prediction"}
UNSUPPORTED_CHAT_FIELDS = {"audio": "audio output", "web_search_options": "web search",
                           "functions": "'functions' (deprecated: send 'tools')",
                           "function_call": "'function_call' (deprecated: send 'tool_choice')"}
CHAT_FIELDS = COMMON_FIELDS | RENDER_FIELDS | IGNORED_CHAT_FIELDS | set(UNSUPPORTED_CHAT_FIELDS) | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
    "parallel_tool_calls", "store", "metadata", "service_tier", "modalities"}
# Keys of a message that come back from the client library's own types (message.model_dump() of a
# response adds annotations, audio and function_call, null): nothing to render from them.
_IGNORED_MESSAGE_KEYS = {"annotations", "audio", "refusal"}
# Names the template sees from the server: chat_template_kwargs may not replace them.
_TEMPLATE_NAMES = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "raise_exception")


PLAIN_TEMPLATE_DOC = 'each message as "role: content\\n", then "assistant:"'


class ChatTemplate:
    """The model's `chat_template` (tokenizer_config.json) rendered with jinja2 in a sandbox, or
    the plain template: one "role: content" line per message, then "assistant:"."""

    def __init__(self, source: Optional[str] = None, bos_token: str = "", eos_token: str = ""):
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = None
        if source is not None:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = raise_exception
            env.filters.setdefault("tojson", lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent))
            self._template = env.from_string(source)

    @property
    def is_plain(self) -> bool:
        return self._template is None

    def render(self, messages: List[dict], add_generation_prompt: bool = True, tools: Optional[list] = None,
               continue_final_message: bool = False, template_kwargs: Optional[dict] = None) -> str:
        """The prompt for these messages. add_generation_prompt: end with the assistant's turn
        opening; continue_final_message: end inside the last (assistant) message instead, so the
        model continues its text (a prefilled answer); template_kwargs: extra variables for a
        jinja2 template (the plain template has none)."""
        if self._template is None:
            # tools as a first line of JSON; an assistant's earlier calls as JSON after its content
            text = ""
            if tools:
                text = f"tools: {json.dumps([t['function'] for t in tools], ensure_ascii=False, separators=(',', ':'))}\n"
            for m in messages:
                calls = [c["function"] for c in m.get("tool_calls", ())]
                text += f"{m['role']}: {m['content']}{json.dumps(calls, ensure_ascii=False) if calls else ''}\n"
            if continue_final_message:
                return text[:-1]  # the last message's line, open
            return text + "assistant:" if add_generation_prompt else text
        from jinja2 import TemplateError
        messages = [_with_parsed_arguments(m) for m in messages]
        try:
            text = self._template.render(**(template_kwargs or {}), messages=messages,
                                         add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
                                         eos_token=self.eos_token, tools=tools)
        except TemplateError as e:
            raise bad(f"the chat template rejected the messages: {e}", "messages", "invalid_value") from None
        except Exception as e:  # a template bug must not become a 500 loop
            raise bad(f"the chat template failed: {type(e).__name__}: {e}", "messages", "invalid_value") from None
        if continue_final_message:
            # Cut after the last message's text (as transformers' apply_chat_template does), dropping
            # the end-of-turn marks the template wrote after it.
            final = messages[-1]["content"].strip()
            at = text.rfind(final)
            if at < 0:
                raise bad("continue_final_message: the chat template does not write the last message's text "
                          "as given, so the prompt cannot end inside it.", "continue_final_message",
                          "invalid_value")
            text = text[:at + len(final)]
        return text

    @classmethod
    def for_model_path(cls, path: Optional[str]) -> "ChatTemplate":
        if not path:
            return cls()
        cfg_path = os.path.join(path, "tokenizer_config.json")
        if not os.path.exists(cfg_path):
            return cls()
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)

        def token(name):
            t = cfg.get(name)
            if isinstance(t, dict):
                t = t.get("content")
            return t if isinstance(t, str) else ""

        tpl = cfg.get("chat_template")
        if isinstance(tpl, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default") or next(iter(named.values()), None)
        if tpl is not None and not isinstance(tpl, str):
            tpl = None
        return cls(tpl, token("bos_token"), token("eos_token"))


# ---- the chat request --------------------------------------------------------------------------
def _with_parsed_arguments(message: dict) -> dict:
    """A message for a jinja2 template: earlier tool calls' arguments as objects, not the JSON text
    the API carries (Hugging Face's convention, and vLLM's: templates write `arguments | tojson`,
    which double-encoded the text). Arguments that are not a JSON object stay text."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    parsed = []
    for call in calls:
        args = call["function"].get("arguments")
        try:
            value = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            value = args
        if isinstance(value, dict):
            call = dict(call, function=dict(call["function"], arguments=value))
        parsed.append(call)
    return dict(message, tool_calls=parsed)


def parse_messages(messages, param: str = "messages") -> List[dict]:
    if not isinstance(messages, list):
        raise bad(f"'{param}' must be an array of messages, got {typename(messages)}.", param, "invalid_type")
    if not messages:
        raise bad(f"'{param}' must contain at least one message.", param, "invalid_value")
    if len(messages) > MAX_MESSAGES:
        raise bad(f"'{param}' has {len(messages)} messages; at most {MAX_MESSAGES}.", param, "invalid_value")
    out = []
    for i, m in enumerate(messages):
        where = f"{param}[{i}]"
        if not isinstance(m, dict):
            raise bad(f"'{where}' must be an object, got {typename(m)}.", where, "invalid_type")
        check_unknown(m, {"role", "content", "name", "tool_calls", "tool_call_id", "function_call"}
                      | _IGNORED_MESSAGE_KEYS, where)
        if m.get("function_call") is not None:
            raise bad(f"'{where}.function_call' is the deprecated form of a tool call: send it in 'tool_calls'.",
                      f"{where}.function_call", "invalid_value")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"'{where}.role' must be one of {', '.join(ROLES)}, got {json.dumps(role)[:40]}.",
                      f"{where}.role", "invalid_value")
        content = m.get("content")
        if content is None:
            if role != "assistant":
                raise bad(f"'{where}.content' is required.", f"{where}.content", "missing_required_parameter")
            content = ""
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                pw = f"{where}.content[{j}]"
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise bad(f"'{pw}' must be a text part {{\"type\": \"text\", \"text\": ...}}; "
                              "only text is supported.", pw, "invalid_value")
                # (other keys of a text part, such as cache_control, are hints to other servers)
                parts.append(check_text(part.get("text"), f"{pw}.text"))
            content = "".join(parts)
        else:
            check_text(content, f"{where}.content")
        msg = {"role": role, "content": content}
        if m.get("name") is not None:
            msg["name"] = check_text(m["name"], f"{where}.name")
        if m.get("tool_calls") is not None:
            if role != "assistant":
                raise bad(f"'{where}.tool_calls' is only for assistant messages.", f"{where}.tool_calls",
                          "invalid_value")
            msg["tool_calls"] = parse_tool_calls(m["tool_calls"], f"{where}.tool_calls")
        if m.get("tool_call_id") is not None:
            msg["tool_call_id"] = check_text(m["tool_call_id"], f"{where}.tool_call_id")
        out.append(msg)
    return out


def parse_render_options(body: dict, messages: List[dict]) -> dict:
    """ChatTemplate.render's keyword arguments from vLLM's chat extras: `add_generation_prompt` (default true), `continue_final_message`
    (default false; the last message must be the assistant's, with text, and the two cannot both
    be true) and `chat_template_kwargs` (extra template variables, e.g. {"enable_thinking": false})."""
    cont = get_bool(body, "continue_final_message", False)
    gen = get_bool(body, "add_generation_prompt", not cont)
    if cont and gen:
        raise bad("'continue_final_message' and 'add_generation_prompt' cannot both be true: the prompt ends either "
                  "inside the last message or after it.", "continue_final_message", "invalid_value")
    if cont:
        last = messages[-1]
        if last["role"] != "assistant" or not last["content"].strip():
            raise bad("'continue_final_message' needs the last message to be the assistant's, with text to continue.",
                      "continue_final_message", "invalid_value")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise bad(f"'chat_template_kwargs' must be an object, got {typename(kwargs)}.", "chat_template_kwargs",
                      "invalid_type")
        for name in kwargs:
            if name in _TEMPLATE_NAMES or not name.isidentifier():
                raise bad(f"'chat_template_kwargs' cannot set {name!r}"
                          + (": the server sets it." if name in _TEMPLATE_NAMES else ": not a template variable name."),
                          "chat_template_kwargs", "invalid_value")
    return {"add_generation_prompt": gen, "continue_final_message": cont, "template_kwargs": kwargs}


def parse_chat(body: dict, vocab: int, defaults: Optional[dict] = None) -> tuple:
    """(GenParams, messages, render options) of a chat completion request."""
    check_unknown(body, CHAT_FIELDS)
    for name, what in UNSUPPORTED_CHAT_FIELDS.items():
        if body.get(name) is not None:
            raise bad(f"This server does not support {what}.", name, "unsupported_parameter")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise bad(f"'modalities' can only be [\"text\"] here, got {json.dumps(modalities)[:80]}.", "modalities",
                  "unsupported_parameter")
    if "messages" not in body:
        raise bad("'messages' is required.", "messages", "missing_required_parameter")
    messages = parse_messages(body["messages"])
    render = parse_render_options(body, messages)
    p = GenParams(prompts=[])
    parse_common(body, vocab, p, defaults)
    mt = get_int(body, "max_tokens", None, 1, 2 ** 31)
    mct = get_int(body, "max_completion_tokens", None, 1, 2 ** 31)
    p.max_tokens = mct if mct is not None else mt  # (both: the newer field, as OpenAI and vLLM)
    if get_bool(body, "logprobs", False):
        p.logprobs = get_int(body, "top_logprobs", 0, 0, MAX_CHAT_TOP_LOGPROBS)
    elif body.get("top_logprobs") is not None:
        get_int(body, "top_logprobs", 0, 0, MAX_CHAT_TOP_LOGPROBS)
        raise bad("'top_logprobs' needs 'logprobs': true.", "top_logprobs", "invalid_value")
    p.tools = parse_tools(body, p.constrained is not None)
    if calling(p):
        for name, value in (("min_tokens", p.min_tokens), ("ignore_eos", p.ignore_eos),
                            ("logprobs", p.logprobs is not None)):
            if value:
                raise bad(f"'{name}' cannot be combined with a tool call ('tool_choice').", name, "invalid_value")
        p.sampling["json_schema"] = p.tools.schema
    get_bool(body, "store", False)
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        raise bad("'metadata' must be an object.", "metadata", "invalid_type")
    get_str(body, "service_tier")
    for name in IGNORED_CHAT_FIELDS - {"prediction"}:  # (strings; prediction is an object)
        get_str(body, name)
    return p, messages, render
