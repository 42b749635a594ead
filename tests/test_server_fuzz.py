"""Random requests against a running server (fixed seeds): every answer is a 200 or a 4xx with an
OpenAI-style error body, never a 5xx, a hang or a dead server. The hand-written bad inputs are in
test_server.py; this walks the combinations (a lone surrogate in a model name, a top_p of 1e-320,
an unknown key that is not valid Unicode, ... each once answered 500)."""
import json
import random

import httpx
import pytest

import llamas
from llamas.server import create_app
from test_server import TINY, ThreadServer, assert_still_serving

# Values of every JSON type and edge: wrong types, out-of-range and subnormal numbers, lone
# surrogates, empty and huge strings, nested junk.
VALUES = [None, True, False, 0, 1, -1, 2, 64, 10 ** 6, 10 ** 30, -10 ** 30, 2 ** 63, 2 ** 64, 0.5, -0.5, 1e308,
          1e-320, -0.0, "", "x", "When", "\ud800", "a\udfff", "\x00", [], [1], [[1]], ["a", "b"], [0, 511], [512],
          [-1], [1.5], {}, {"1": 100}, {"5": -100}, {"x": 1}, {"\ud800": 1}, ["\n"], [""], ["\ud800"], "a" * 5000,
          [1] * 200, {"include_usage": True}, {"include_usage": "\ud800"}, {"type": "text"}, {"type": "\ud800"},
          # structured output: schemas, patterns, grammars, tools, good and broken
          {"type": "object", "properties": {"a": {"type": "integer"}}}, {"type": "string", "pattern": "(a"},
          {"$ref": "#/nope"}, {"json": {"type": "string", "maxLength": 3}}, {"regex": "[a-c]+"}, {"grammar": 5},
          "[a-c]{2}", "(?=x)", "a{99999}", 'root ::= "a" | "b"', "root ::= root", "root ::= [",
          {"type": "json_schema", "json_schema": {"schema": {"enum": [1, 2]}}}, {"type": "json_object"},
          [{"type": "function", "function": {"name": "f"}}], [{"type": "function", "function": {"name": "\ud800"}}],
          "required", "auto", {"type": "function", "function": {"name": "f"}}]
COMPLETION_KEYS = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stream", "stop", "seed",
                   "logprobs", "echo", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
                   "stream_options", "model", "suffix", "best_of", "user", "guided_json", "guided_regex",
                   "guided_grammar", "guided_choice", "structured_outputs", "response_format", "skip_special_tokens",
                   "truncate_prompt_tokens"]
CHAT_KEYS = ["messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream", "stop", "seed",
             "logprobs", "top_logprobs", "logit_bias", "stream_options", "model", "response_format", "tools",
             "tool_choice", "user", "parallel_tool_calls", "guided_regex", "guided_grammar", "structured_outputs",
             "guided_decoding_backend", "add_generation_prompt", "continue_final_message", "chat_template_kwargs",
             "skip_special_tokens", "truncate_prompt_tokens"]
MESSAGES = [[{"role": "user", "content": "hi"}], [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
            [{"role": "x", "content": "hi"}], [{"role": "user"}], [{"content": "x"}], [{"role": "\ud800", "content": "x"}],
            [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], [{"role": "user", "content": 5}], [], "hi",
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Once"}],
            [{"role": "assistant", "content": "\ud800"}]]
RAW_BODIES = [b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"prompt": "a", "max_tokens": 2, "prompt": 5}', b"1e999",
              b'{"prompt":"\\ud800"}', b'{"prompt": "x", "\\udfff": 1}']


def random_request(rng: random.Random):
    """(path, JSON body or raw bytes)."""
    kind = rng.random()
    if kind < 0.45:
        body = {"prompt": "When", "max_tokens": 3}
        for k in rng.sample(COMPLETION_KEYS, rng.randint(1, 4)):
            body[k] = rng.choice(VALUES)
        if rng.random() < 0.1:
            body[rng.choice(["\ud800", "x" * 300, "", "prompt "])] = rng.choice(VALUES)
        return "/v1/completions", body
    if kind < 0.85:
        body = {"messages": rng.choice(MESSAGES[:2] + MESSAGES[-2:-1]), "max_tokens": 3}
        for k in rng.sample(CHAT_KEYS, rng.randint(1, 4)):
            body[k] = rng.choice(VALUES + MESSAGES)
        return "/v1/chat/completions", body
    if kind < 0.93:
        return rng.choice(["/tokenize", "/detokenize"]), {rng.choice(["prompt", "tokens", "x"]): rng.choice(VALUES)}
    return rng.choice(["/v1/completions", "/v1/chat/completions", "/tokenize"]), rng.choice(RAW_BODIES)


@pytest.fixture(scope="module")
def http():
    # Speculation on: every request it can verify (sampled or greedy, with penalties, biases, stops,
    # n > 1) also runs the drafting, verifying and truncating path. Streams come 3 tokens an event
    # (stream_interval), so the listener that groups them meets every kind of stream too.
    with ThreadServer(create_app(llamas.load(TINY), max_batch=16, max_tokens=16, speculative_ngram=4,
                                 stream_interval=3)) as s:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            yield c


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_requests_never_get_a_server_error(http, seed):
    rng = random.Random(seed)
    statuses = {}
    for _ in range(400):
        path, body = random_request(rng)
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        if rng.random() < 0.1:
            headers["x-request-id"] = rng.choice([b"r-1", b"x" * 129, b"a b", "é".encode()])
        r = http.post(path, content=content, headers=headers)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (path, body, r.status_code, r.text[:300])
        if r.status_code != 200:
            err = r.json()["error"]
            assert isinstance(err["message"], str) and err["message"], (path, body, r.text[:300])
        elif isinstance(body, dict) and body.get("stream") is True:
            assert r.text.endswith("data: [DONE]\n\n"), (path, body, r.text[-300:])
    assert statuses.get(200, 0) >= 5 and statuses.get(400, 0) >= 100, statuses  # both kinds were exercised
    assert_still_serving(http)


def test_random_structured_requests(http):
    """Tools, tool_choice and the structured-output fields drawn together (the walk above rarely
    pairs them): never a 5xx, and a 200's tool calls carry JSON arguments."""
    rng = random.Random(7)
    tools = [None, [], [{"type": "function", "function": {"name": "f"}}],
             [{"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {
                 "x": {"type": "integer", "maximum": 9}}, "required": ["x"]}}}, {"type": "function", "function": {
                     "name": "h", "parameters": {"type": "string", "pattern": "[ab]+"}}}]]
    choices = [None, "none", "auto", "required", {"type": "function", "function": {"name": "g"}}, "f", 3]
    extras = [{}, {"guided_regex": "[a-c]{2}"}, {"response_format": {"type": "json_object"}},
              {"structured_outputs": {"grammar": 'root ::= "x"+'}}, {"parallel_tool_calls": False}, {"stream": True},
              {"n": 2}, {"logprobs": True}]
    for _ in range(150):
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": rng.choice([4, 16]), "seed": 1}
        for key, pool in (("tools", tools), ("tool_choice", choices)):
            value = rng.choice(pool)
            if value is not None:
                body[key] = value
        body.update(rng.choice(extras))
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code < 500, (body, r.text[:300])
        if r.status_code == 200 and not body.get("stream"):
            for choice in r.json()["choices"]:
                for call in choice["message"].get("tool_calls") or []:
                    json.loads(call["function"]["arguments"])
    assert_still_serving(http)
