"""Request validation for the OpenAI-compatible server.

Every field of a request is checked here; anything wrong raises `APIError`, which the server turns
into OpenAI-style error JSON: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .scheduler import as_float32

MAX_N = 128                 # choices per prompt (OpenAI's limit)
MAX_PROMPTS = 64            # prompts in one /v1/completions batch
MAX_STOP = 16               # stop strings
MAX_STOP_CHARS = 256        # characters in one stop string
MAX_STOP_TOKEN_IDS = 64     # stop_token_ids
MAX_LOGIT_BIAS = 1024       # entries in logit_bias
MAX_COMPLETION_LOGPROBS = 5     # legacy completions: top-n alternatives


_ERROR_TYPES = {
    400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
    405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
    415: "invalid_request_error", 429: "rate_limit_error",
    500: "server_error", 503: "service_unavailable",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param, code)


# ---- JSON body --------------------------------------------------------------------------------
def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"The request body is not valid UTF-8 (invalid byte at offset {e.start}).",
                  code="invalid_utf8") from None
    if not text.strip():
        raise bad("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        if "int_max_str_digits" in str(e):  # (Python's advice to raise its limit is not the client's)
            raise bad("The request body has an integer of more than 4300 digits.", code="invalid_json") from None
        raise bad(f"The request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad(f"The request body must be a JSON object, got {typename(data)}.", code="invalid_json")
    return data


# ---- field checks -----------------------------------------------------------------------------
def typename(v) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(v), type(v).__name__)


def check_unknown(body: dict, allowed, where: str = "") -> None:
    for key in body:
        if key not in allowed:
            param = f"{where}.{key}" if where else key
            raise bad(f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")


def check_text(value, param: str) -> str:
    """A str that is valid Unicode (JSON can smuggle in lone surrogates)."""
    if not isinstance(value, str):
        raise bad(f"'{param}' must be a string, got {typename(value)}.", param, "invalid_type")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"'{param}' is not valid UTF-8 (it contains a lone surrogate).", param, "invalid_utf8") from None
    return value


def get_int(body: dict, name: str, default, lo: int, hi: int) -> Optional[int]:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{name}' must be an integer, got {typename(v)} {json.dumps(v)[:40]}.", name, "invalid_type")
    if v < lo:
        raise bad(f"'{name}' must be at least {lo}, got {v}.", name, "invalid_value")
    if v > hi:
        raise bad(f"'{name}' must be at most {hi}, got {v}.", name, "invalid_value")
    return v


def get_float(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(f"'{name}' must be a number, got {typename(v)}.", name, "invalid_type")
    v = float(v)
    lb = "(" if lo_open else "["
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        raise bad(f"'{name}' must be in {lb}{lo:g}, {hi:g}], got {v!r}.", name, "invalid_value")
    if lo_open and as_float32(v) == lo:
        raise bad(f"'{name}' must be in {lb}{lo:g}, {hi:g}], got {v:g} ({lo:g} as a float32, as the engine holds it).",
                  name, "invalid_value")
    return v


def get_bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean, got {typename(v)}.", name, "invalid_type")
    return v


def get_str(body: dict, name: str, default: Optional[str] = None) -> Optional[str]:
    v = body.get(name)
    if v is None:
        return default
    return check_text(v, name)


def get_stop(body: dict) -> List[str]:
    v = body.get("stop")
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list):
        raise bad(f"'stop' must be a string or an array of strings, got {typename(v)}.", "stop", "invalid_type")
    if len(items) > MAX_STOP:
        raise bad(f"'stop' has {len(items)} strings; at most {MAX_STOP} are allowed.", "stop", "invalid_value")
    out = []
    for s in items:
        check_text(s, "stop")
        if len(s) > MAX_STOP_CHARS:
            raise bad(f"a stop string has {len(s)} characters; at most {MAX_STOP_CHARS}.", "stop", "invalid_value")
        if s:
            out.append(s)
    return out


def get_logit_bias(body: dict, vocab: int) -> Dict[int, float]:
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad(f"'logit_bias' must be an object {{token id: bias}}, got {typename(v)}.", "logit_bias", "invalid_type")
    if len(v) > MAX_LOGIT_BIAS:
        raise bad(f"'logit_bias' has {len(v)} entries; at most {MAX_LOGIT_BIAS}.", "logit_bias", "invalid_value")
    out = {}
    for key, bias in v.items():
        try:
            token = int(key)
            if str(token) != key.strip():
                raise ValueError
        except ValueError:
            raise bad(f"'logit_bias' keys must be token ids, got {key[:40]!r}.", "logit_bias", "invalid_value") from None
        if not 0 <= token < vocab:
            raise bad(f"'logit_bias' token {token} is outside the vocabulary [0, {vocab}).", "logit_bias", "invalid_value")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias) or abs(bias) > 100:
            raise bad(f"'logit_bias' values must be numbers in [-100, 100], got {json.dumps(bias)[:40]} "
                      f"for token {token}.", "logit_bias", "invalid_value")
        out[token] = float(bias)
    return out


def check_token_ids(ids, vocab: int, param: str) -> List[int]:
    if not isinstance(ids, list):
        raise bad(f"'{param}' must be an array of token ids.", param, "invalid_type")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int):
            raise bad(f"'{param}' must contain integer token ids, got {typename(t)}.", param, "invalid_type")
        if not 0 <= t < vocab:
            raise bad(f"token id {t} in '{param}' is outside the vocabulary [0, {vocab}).", param, "invalid_value")
    return ids


# ---- generation parameters --------------------------------------------------------------------
@dataclass
class GenParams:
    """A validated generation request (both endpoints)."""
    prompts: list                   # str or list[int] each (str tokenised by the server)
    prompt_ids: List[List[int]] = field(default_factory=list)
    n: int = 1
    max_tokens: Optional[int] = None    # None: up to the context (chat) / 16 (completions)
    default_max_tokens: Optional[int] = None
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False      # stream_options.continuous_usage_stats (with include_usage)
    stop: List[str] = field(default_factory=list)
    # vLLM's extra stop controls (see llamas.request.StopRules)
    stop_token_ids: List[int] = field(default_factory=list)
    min_tokens: int = 0
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True    # vLLM's default: special tokens leave no text
    truncate_prompt_tokens: Optional[int] = None  # vLLM's: keep only the prompt's last N tokens (-1: the context)
    sampling: dict = field(default_factory=dict)
    logprobs: Optional[int] = None      # top-n alternatives; None = off
    echo: bool = False
    best_of: int = 1                    # completions: candidates per prompt, the n best returned (>= n)
    tools: Any = None                   # chat: the request's server_tools.ToolPlan, or None
    constrained: Optional[str] = None   # the structured output asked for, as errors name it, or None


COMMON_FIELDS = {
    "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "seed", "stop", "stream", "stream_options", "n",
    "logit_bias", "user", "stop_token_ids", "min_tokens", "ignore_eos", "include_stop_str_in_output",
    "skip_special_tokens", "truncate_prompt_tokens",
    "guided_choice", "guided_json", "guided_regex", "guided_grammar", "structured_outputs",
    "guided_decoding_backend",  # vLLM's choice of library: accepted and ignored (there is one here)
}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "echo", "best_of", "suffix", "response_format"}


# A sampling field a request leaves out: OpenAI's default, unless the served model's
# generation_config.json sets it (create_app(generation_config="auto"), as vLLM's
# --generation-config auto): then the model's, as `llamas generate` and Model.generate use.
OPENAI_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                            "presence_penalty": 0.0, "frequency_penalty": 0.0}


def parse_common(body: dict, vocab: int, p: GenParams, defaults: Optional[dict] = None) -> None:
    d = defaults or OPENAI_SAMPLING_DEFAULTS
    p.n = get_int(body, "n", 1, 1, MAX_N)
    p.stream = get_bool(body, "stream", False)
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise bad("'stream_options' must be an object.", "stream_options", "invalid_type")
        # include_obfuscation (OpenAI's random padding against length side channels): nothing to pad here
        check_unknown(so, {"include_usage", "continuous_usage_stats", "include_obfuscation"}, "stream_options")
        get_bool(so, "include_obfuscation", True)
        if not p.stream:
            raise bad("'stream_options' is only allowed when 'stream' is true.", "stream_options", "invalid_value")
        p.include_usage = get_bool(so, "include_usage", False)
        # vLLM's: every chunk carries its choice's usage so far (with include_usage, as vLLM)
        p.continuous_usage = get_bool(so, "continuous_usage_stats", False) and p.include_usage
    p.stop = get_stop(body)
    ids = body.get("stop_token_ids")
    if ids is not None:
        check_token_ids(ids, vocab, "stop_token_ids")
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise bad(f"'stop_token_ids' has {len(ids)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed.",
                      "stop_token_ids", "invalid_value")
        p.stop_token_ids = list(ids)
    p.min_tokens = get_int(body, "min_tokens", 0, 0, 2 ** 31)
    p.ignore_eos = get_bool(body, "ignore_eos", False)
    p.include_stop_str_in_output = get_bool(body, "include_stop_str_in_output", False)
    p.skip_special_tokens = get_bool(body, "skip_special_tokens", True)
    p.truncate_prompt_tokens = get_int(body, "truncate_prompt_tokens", None, -1, 2 ** 31)
    if p.truncate_prompt_tokens == 0:
        raise bad("'truncate_prompt_tokens' must be at least 1 (or -1: the model's context).", "truncate_prompt_tokens",
                  "invalid_value")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad(f"'seed' must be an integer, got {typename(seed)}.", "seed", "invalid_type")
    if seed is not None and not -2 ** 63 <= seed < 2 ** 63:
        raise bad(f"'seed' must be a 64-bit integer, in [-2^63, 2^63), got {seed}.", "seed", "invalid_value")
    if seed is not None and seed < 0:  # OpenAI's and vLLM's seeds are any int64 (UIs send -1): its bits
        seed += 2 ** 64
    top_k = body.get("top_k")
    if top_k == -1:   # vLLM's spelling of "off"
        top_k = 0
    p.sampling = dict(
        temperature=get_float(body, "temperature", d["temperature"], 0.0, 2.0),
        top_p=get_float(body, "top_p", d["top_p"], 0.0, 1.0, lo_open=True),
        top_k=get_int({"top_k": top_k}, "top_k", min(d["top_k"], vocab), 0, vocab),
        min_p=get_float(body, "min_p", d["min_p"], 0.0, 1.0),
        repetition_penalty=get_float(body, "repetition_penalty", d["repetition_penalty"], 0.0, 10.0, lo_open=True),
        presence_penalty=get_float(body, "presence_penalty", d["presence_penalty"], -2.0, 2.0),
        frequency_penalty=get_float(body, "frequency_penalty", d["frequency_penalty"], -2.0, 2.0),
        seed=seed,
        logit_bias=get_logit_bias(body, vocab),
    )
    from .server_guided import get_structured_output  # (it builds on this module's checks)
    p.constrained = get_structured_output(body, p.sampling)
    for name, value in (("min_tokens", p.min_tokens), ("ignore_eos", p.ignore_eos)):
        if p.constrained and value:
            raise bad(f"'{name}' cannot be combined with {p.constrained} (a closed object or a whole choice allows "
                      "only end-of-text).", name, "invalid_value")
    get_str(body, "user")


def parse_completion(body: dict, vocab: int, has_tokenizer: bool, defaults: Optional[dict] = None) -> GenParams:
    check_unknown(body, COMPLETION_FIELDS)
    if "prompt" not in body:
        raise bad("'prompt' is required.", "prompt", "missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise bad("'prompt' must be a non-empty string, array of strings, array of token ids or array of "
                  "token id arrays.", "prompt", "invalid_type" if not isinstance(prompt, list) else "invalid_value")
    if len(prompts) > MAX_PROMPTS:
        raise bad(f"'prompt' has {len(prompts)} prompts; at most {MAX_PROMPTS} in one request.", "prompt", "invalid_value")
    out = []
    for x in prompts:
        if isinstance(x, str):
            check_text(x, "prompt")
            if not x:
                raise bad("'prompt' must not be empty.", "prompt", "invalid_value")
            if not has_tokenizer:
                raise bad("This model has no tokenizer: send token ids as the prompt.", "prompt", "invalid_value")
        elif isinstance(x, list):
            if not x:
                raise bad("'prompt' must not be empty.", "prompt", "invalid_value")
            check_token_ids(x, vocab, "prompt")
        else:
            raise bad(f"'prompt' items must be strings or token id arrays, got {typename(x)}.", "prompt", "invalid_type")
        out.append(x)
    p = GenParams(prompts=out)
    parse_common(body, vocab, p, defaults)
    p.echo = get_bool(body, "echo", False)
    lp = body.get("logprobs")
    if lp is not None:
        p.logprobs = get_int(body, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS)
    # max_tokens 0 only scores the prompt: with echo and logprobs (the prompt's log-probabilities,
    # as lm-evaluation-harness and OpenAI's legacy completions use them).
    scoring = p.echo and p.logprobs is not None
    if body.get("max_tokens") == 0 and not scoring and not isinstance(body.get("max_tokens"), bool):
        raise bad("'max_tokens' must be at least 1, got 0 (0 is allowed only with 'echo': true and 'logprobs', to "
                  "score the prompt).", "max_tokens", "invalid_value")
    p.max_tokens = get_int(body, "max_tokens", None, 0 if scoring else 1, 2 ** 31)
    p.default_max_tokens = 16
    best_of = get_int(body, "best_of", None, 1, MAX_N)
    if best_of is not None and best_of < p.n:
        raise bad(f"'best_of' ({best_of}) must be at least 'n' ({p.n}).", "best_of", "invalid_value")
    if best_of is not None and best_of > p.n and p.stream:
        raise bad("'best_of' greater than 'n' cannot be streamed (the best choices are known only at the end).",
                  "best_of", "invalid_value")
    p.best_of = p.n if best_of is None else best_of
    if body.get("suffix") is not None:
        check_text(body["suffix"], "suffix")
        if body["suffix"]:
            raise bad("'suffix' is not supported.", "suffix", "unsupported_value")
    return p
