"""What a request is and what it produces: validated sampling options, the Request the scheduler
runs, and the Chunk / Completion / TokenLogprob / RequestStats it hands back. Shared by
`Model.generate`, `llamas.Engine` and the server (see scheduler.py)."""
from __future__ import annotations

import itertools
import math
import secrets
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

from ._C import LlamasError
from .grammar import compile_grammar
from .json_schema import compile_guided_regex, compile_json_schema


# ---- sampling parameters -------------------------------------------------------------------------
def _check_number(name: str, value, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LlamasError(f"[generate] {name} must be a number, got {value!r}")
    value = float(value)
    bracket = "(" if low_open else "["
    if math.isnan(value) or value < low or value > high or (low_open and value == low):
        raise LlamasError(f"[generate] {name} must be in {bracket}{low}, {high}], got {value}")
    # The engine holds it as a float32: a positive value below float32's smallest (1e-320) would
    # reach it as the excluded bound 0.
    if low_open and as_float32(value) == low:
        raise LlamasError(f"[generate] {name} must be in {bracket}{low}, {high}], got {value} (0 as a float32)")
    return value


def as_float32(value: float) -> float:
    """value rounded to the float32 the native engine holds it as."""
    return struct.unpack("f", struct.pack("f", value))[0]


class SamplingOptions:
    """Validated sampling parameters (shared by Model.generate, the CLI, Engine and the server)."""

    def __init__(self, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                 presence_penalty=0.0, frequency_penalty=0.0, seed=None, logit_bias=None, logprobs=None,
                 json_object=False, choices=None, json_schema=None, regex=None, grammar=None):
        self.temperature = _check_number("temperature", temperature, 0.0, 100.0)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise LlamasError(f"[generate] top_k must be an integer >= 0, got {top_k!r}")
        self.top_k = min(top_k, 2 ** 31 - 1)  # (past the vocabulary it keeps every token: the same)
        self.top_p = _check_number("top_p", top_p, 0.0, 1.0, low_open=True)
        self.min_p = _check_number("min_p", min_p, 0.0, 1.0)
        self.repetition_penalty = _check_number("repetition_penalty", repetition_penalty, 0.0, 100.0, low_open=True)
        self.presence_penalty = _check_number("presence_penalty", presence_penalty, -2.0, 2.0)
        self.frequency_penalty = _check_number("frequency_penalty", frequency_penalty, -2.0, 2.0)
        if seed is None:
            seed = secrets.randbits(63)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
            raise LlamasError(f"[generate] seed must be an integer in [0, 2^64), got {seed!r}")
        self.seed = seed
        bias = {}
        if logit_bias is not None:
            if not isinstance(logit_bias, dict):
                raise LlamasError("[generate] logit_bias must be a dict {token id: bias}")
            for token, value in logit_bias.items():
                if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                    raise LlamasError(f"[generate] logit_bias keys must be token ids >= 0, got {token!r}")
                bias[token] = _check_number(f"logit_bias[{token}]", value, -100.0, 100.0)
        self.logit_bias = bias
        check_top_n(logprobs, "logprobs")
        self.logprobs = logprobs
        if not isinstance(json_object, bool):
            raise LlamasError(f"[generate] json_object must be True or False, got {json_object!r}")
        self.json_object = json_object  # JSON mode: the output is held to one JSON object
        self.choices = check_choices(choices)  # the output is exactly one of these (None: free)
        # an instance of this JSON Schema (compiled; None: free)
        self.json_schema = None if json_schema is None else compile_json_schema(json_schema)
        # text matching this regular expression (vLLM's guided_regex; compiled; None: free)
        self.regex = None if regex is None else compile_guided_regex(regex)
        # text this GBNF grammar derives (vLLM's guided_grammar; compiled; None: free)
        self.grammar = None if grammar is None else compile_grammar(grammar)
        asked = [json_object, self.choices is not None, self.json_schema is not None, self.regex is not None,
                 self.grammar is not None]
        if sum(asked) > 1:
            raise LlamasError("[generate] json_object, choices, json_schema, regex and grammar cannot be combined")

    @property
    def constrained(self) -> Optional[str]:
        """The structured output this asks for, by name, or None."""
        return "JSON mode" if self.json_object else "choices" if self.choices else \
            "json_schema" if self.json_schema is not None else "regex" if self.regex is not None else \
            "grammar" if self.grammar is not None else None

    @property
    def recogniser(self):
        """The compiled schema, regex or grammar the native sampler follows, or None."""
        for compiled in (self.json_schema, self.regex, self.grammar):
            if compiled is not None:
                return compiled
        return None

    def with_seed(self, seed: int) -> "SamplingOptions":
        other = object.__new__(SamplingOptions)
        other.__dict__.update(self.__dict__)
        other.seed = seed & ((1 << 64) - 1)
        return other


MAX_CHOICES = 64            # choices (vLLM's guided_choice)
MAX_CHOICE_BYTES = 1024     # UTF-8 bytes of one choice


def check_choices(choices) -> Optional[List[str]]:
    """None, or a list of 1..MAX_CHOICES distinct non-empty strings of at most MAX_CHOICE_BYTES."""
    if choices is None:
        return None
    if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise LlamasError(f"[generate] choices must be a non-empty list of non-empty strings, got {choices!r:.80}")
    if len(choices) > MAX_CHOICES:
        raise LlamasError(f"[generate] choices has {len(choices)} strings; at most {MAX_CHOICES}")
    for c in choices:
        try:
            size = len(c.encode("utf-8"))
        except UnicodeEncodeError:
            raise LlamasError(f"[generate] a choice is not valid Unicode text: {c!r:.40}") from None
        if size > MAX_CHOICE_BYTES:
            raise LlamasError(f"[generate] a choice has {size} UTF-8 bytes; at most {MAX_CHOICE_BYTES}")
    return list(dict.fromkeys(choices))


def check_top_n(value, name: str, op: str = "generate", optional: bool = True) -> None:
    """A count of most likely tokens to report (logprobs, prompt_logprobs, top_logprobs): an integer
    in [0, 20], or None when optional."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20:
        what = "None or an integer" if optional else "an integer"
        raise LlamasError(f"[{op}] {name} must be {what} in [0, 20], got {value!r}")


def check_prompt_logprobs(prompt_logprobs) -> None:
    check_top_n(prompt_logprobs, "prompt_logprobs")


def check_max_new_tokens(max_new_tokens, scoring: bool = False) -> None:
    """max_new_tokens >= 1, or >= 0 when the prompt is scored (0: only score it)."""
    low = 0 if scoring else 1
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < low:
        what = "a non-negative integer when scoring the prompt" if scoring else "a positive integer"
        raise LlamasError(f"[generate] max_new_tokens must be {what}, got {max_new_tokens!r}")


def normalise_stop(stop) -> List[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise LlamasError("[generate] stop must be a str or a list of str")
    return [s for s in stop if s]


@dataclass(frozen=True)
class StopRules:
    """When a sequence ends before its budget: at a stop string (left out of the text unless
    include_stop_str_in_output), at a stop token id or the end-of-text token (unless ignore_eos;
    neither is in the output), and at none of these before min_tokens tokens: until then the stop
    tokens cannot be drawn and stop strings are not looked for (vLLM's semantics)."""
    strings: Tuple[str, ...] = ()
    token_ids: Tuple[int, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = False  # special tokens (end-of-text...) leave no text (vLLM's default)


def make_stop_rules(stop=None, stop_token_ids=None, min_tokens: int = 0, ignore_eos: bool = False,
                    include_stop_str_in_output: bool = False, vocab_size: Optional[int] = None,
                    max_new_tokens: Optional[int] = None, *, skip_special_tokens: bool = False) -> StopRules:
    """Validated StopRules (LlamasError naming the bad argument)."""
    if stop_token_ids is None:
        stop_token_ids = ()
    if not isinstance(stop_token_ids, (list, tuple)) or any(
            isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in stop_token_ids):
        raise LlamasError(f"[generate] stop_token_ids must be a list of token ids >= 0, got {stop_token_ids!r}")
    if vocab_size is not None:
        bad = [t for t in stop_token_ids if t >= vocab_size]
        if bad:
            raise LlamasError(f"[generate] stop token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise LlamasError(f"[generate] min_tokens must be an integer >= 0, got {min_tokens!r}")
    if max_new_tokens is not None and min_tokens > max_new_tokens:
        raise LlamasError(f"[generate] min_tokens ({min_tokens}) must not exceed max_new_tokens ({max_new_tokens})")
    for name, flag in (("ignore_eos", ignore_eos), ("include_stop_str_in_output", include_stop_str_in_output),
                       ("skip_special_tokens", skip_special_tokens)):
        if not isinstance(flag, bool):
            raise LlamasError(f"[generate] {name} must be True or False, got {flag!r}")
    return StopRules(tuple(normalise_stop(stop)), tuple(dict.fromkeys(stop_token_ids)), min_tokens, ignore_eos,
                     include_stop_str_in_output, skip_special_tokens)


# ---- what a request produces -------------------------------------------------------------------
@dataclass
class TokenLogprob:
    """Log-probability of a generated token under the model's raw distribution, and the `top`
    most likely alternatives at that step as [(token id, logprob)]."""
    token_id: int
    logprob: float
    top: List[Tuple[int, float]] = field(default_factory=list)


@dataclass
class Chunk:
    """What one step added to a request: new safe text, the accepted token ids, their logprobs
    (when asked for) and, on the last chunk, finish_reason: "stop" (end-of-text or a stop
    string), "length", "cancelled" or "error"."""
    text: str
    token_ids: List[int]
    logprobs: Optional[List[TokenLogprob]] = None
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    # A request with prompt_logprobs: the prompt's tokens' log-probabilities, on the request's first
    # chunk (None for the first token, which has no context to be predicted from).
    prompt_logprobs: Optional[List[Optional[TokenLogprob]]] = None


@dataclass
class Completion:
    """The final output of a request."""
    id: str
    text: str
    token_ids: List[int]
    finish_reason: Optional[str]
    prompt_tokens: int
    completion_tokens: int          # tokens sampled, including an end-of-text or stop-completing one
    logprobs: Optional[List[TokenLogprob]]
    error: Optional[str] = None
    prompt_logprobs: Optional[List[Optional[TokenLogprob]]] = None
    cached_tokens: Optional[int] = None   # prompt tokens served by the prefix cache (None: no cache)


@dataclass
class RequestStats:
    """Timings (seconds, time.perf_counter clock) of one request."""
    submitted: float = 0.0
    admitted: Optional[float] = None
    first_token: Optional[float] = None
    finished: Optional[float] = None
    token_times: List[float] = field(default_factory=list)

    @property
    def queue_time(self) -> Optional[float]:
        return None if self.admitted is None else self.admitted - self.submitted

    @property
    def time_to_first_token(self) -> Optional[float]:
        return None if self.first_token is None else self.first_token - self.submitted

    @property
    def e2e_latency(self) -> Optional[float]:
        return None if self.finished is None else self.finished - self.submitted

    @property
    def inter_token_latencies(self) -> List[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


_ids = itertools.count(1)


class Request:
    """One sequence to generate: validated prompt ids, budget, sampling options, and stop strings or
    StopRules. `sink(chunk)` is called from the thread that runs the scheduler.

    prompt_logprobs: None, or n in [0, 20]: score the prompt too (each prompt token's
    log-probability given the tokens before it, and the n most likely tokens there), delivered on
    the request's first chunk. max_new_tokens may then be 0: the prompt is only scored."""

    def __init__(self, prompt_ids: List[int], max_new_tokens: int, options: SamplingOptions,
                 stop: Union[Sequence[str], StopRules] = (), sink: Optional[Callable[[Chunk], None]] = None,
                 request_id: Optional[str] = None, prompt_logprobs: Optional[int] = None):
        self.id = request_id or f"req-{next(_ids)}"
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.options = options
        self.rules = stop if isinstance(stop, StopRules) else StopRules(tuple(stop))
        constrained = options.constrained
        if constrained and (self.rules.min_tokens or self.rules.ignore_eos):
            # a closed object or a whole choice allows only end-of-text, which these would hold
            # back or not stop at
            what = "min_tokens" if self.rules.min_tokens else "ignore_eos"
            raise LlamasError(f"[generate] {what} cannot be combined with {constrained}")
        self.sink = sink
        self.prompt_logprobs = prompt_logprobs
        # Scores gathered while the prompt is fed; handed to the first chunk (then None again).
        self.prompt_scores: Optional[List[Optional[TokenLogprob]]] = None if prompt_logprobs is None else [None]
        self.cached_tokens: Optional[int] = None  # prompt tokens whose KV came from the prefix cache (if on)
        self.cancelled = False
        self.finished = False
        self.finish_reason: Optional[str] = None
        self.completion_tokens = 0
        self.stats = RequestStats(submitted=time.perf_counter())

    @property
    def stop(self) -> List[str]:
        """The stop strings (the rest of the stop rules are in `rules`)."""
        return list(self.rules.strings)
