"""JSON mode (response_format {"type": "json_object"}): the native byte-level recogniser against
Python's json module, and generation held to it in Model.generate, Engine, the CLI and the server."""
import json
import os
import random

import pytest

import llamas
from conftest import run_llamas, submit_grid
from llamas import _C
from llamas._C import LlamasError

HERE = os.path.dirname(__file__)
TINY = os.path.join(HERE, "fixtures", "gpt2-tiny")


# ---- the recogniser -----------------------------------------------------------------------------
def random_value(rng, depth=0):
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.randint(-10 ** 6, 10 ** 6)
    if kind == 2:
        return rng.choice([0.0, -0.5, 1e-7, 3.25e21, -123.456, 1.5])
    if kind in (3, 4):
        alphabet = 'ab Z09"\\/\n\t\x01\x7f\u00e9\u2028\u20ac\U0001F600\ud7ff\ue000'
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(6)))
    if kind in (5, 6):
        return {"k%d%s" % (i, rng.choice(["", "\u00e9", '"'])): random_value(rng, depth + 1)
                for i in range(rng.randrange(4))}
    return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def random_document(rng) -> bytes:
    obj = {f"key{i}": random_value(rng, 1) for i in range(rng.randrange(4))}
    indent = rng.choice([None, None, 1, 2, "\t"])
    separators = rng.choice([(",", ":"), (", ", ": "), (",", ": ")])
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.3, separators=separators, indent=indent)
    return text.encode()


def test_every_prefix_of_a_json_object_is_valid_and_only_the_whole_is_complete():
    rng = random.Random(0)
    for _ in range(300):
        doc = random_document(rng)
        assert _C.json_prefix(doc) == (True, True), doc
        for i in range(len(doc)):
            assert _C.json_prefix(doc[:i]) == (True, False), (doc, doc[:i])


def test_whatever_the_recogniser_completes_parses_as_an_object():
    rng = random.Random(1)
    completed = 0
    for _ in range(3000):
        doc = bytearray(random_document(rng))
        for _ in range(rng.randint(1, 3)):  # mutate: replace, insert or delete a byte
            i = rng.randrange(len(doc) + 1)
            op = rng.randrange(3)
            b = rng.choice(b'{}[]":,.-+eE019 \n\\tfnu\x00\xc3\xa9\xed\xa0\xff')
            if op == 0 and i < len(doc):
                doc[i] = b
            elif op == 1:
                doc.insert(i, b)
            elif i < len(doc):
                del doc[i]
        ok, complete = _C.json_prefix(bytes(doc))
        if complete:
            completed += 1
            assert isinstance(json.loads(bytes(doc).decode("utf-8")), dict), bytes(doc)
    assert completed > 100


@pytest.mark.parametrize("text, valid", [
    (b"[]", False), (b"1", False), (b'"a"', False), (b"{", True), (b'{"a":01}', False), (b'{"a":1,}', False),
    (b'{"a":"\x01"}', False), (b'{"a":tru', True), (b'{"a":tru}', False), (b'{"a":1}}', False), (b'{"a":1} ', False),
    (b'{"a":"\\x"}', False), (b'{"a":1.}', False), (b'{"a":"\xed\xa0\x80"}', False), (b'{"a":"\xc0\x80"}', False),
    (b'{"a":"\xf4\x90\x80\x80"}', False), (b"{" + b" " * 25 + b"}", False), (b"{" + b" " * 24 + b"}", True),
    (b"\n" * 24 + b"{}", True), (b'{"a":1' + b" " * 25, False),
    (b"{{", False), (b'{"a":' + b"[" * 31, True), (b'{"a":' + b"[" * 32, False),
])
def test_recogniser_edges(text, valid):
    # the top level is an object; whitespace at most 24 bytes in a row; depth at most 32
    assert _C.json_prefix(text)[0] is valid


# ---- generation ---------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["tiny", "bundled"])
def model(request):
    return llamas.load(TINY) if request.param == "tiny" else llamas.load()


def check_output(text: str, finish_reason: str) -> None:
    if finish_reason == "stop":
        assert isinstance(json.loads(text), dict), text
    else:
        assert finish_reason == "length" and _C.json_prefix(text.encode()) == (True, False), text


def test_generated_text_is_always_json(model):
    results = submit_grid(model, "Answer in JSON:", range(8), (0.0, 1.0, 1.8), (12, 120), json_object=True)
    alone, = submit_grid(model, "Answer in JSON:", [None], [0.0], [120], json_object=True)
    reasons = set()
    for r in results:
        check_output(r.text, r.finish_reason)
        reasons.add(r.finish_reason)
    assert reasons == {"stop", "length"}  # both ends were reached
    # alone or in that batch, the same greedy output
    assert alone.text == results[1].text  # (seed 0, temperature 0, 120 tokens)
    g = dict(max_new_tokens=120, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
             json_object=True)  # the engine's defaults, whatever the model's generation_config says
    assert model.generate("Answer in JSON:", **g) == alone.text
    assert "".join(model.generate("Answer in JSON:", stream=True, **g)) == alone.text


def test_json_mode_needs_a_byte_level_tokenizer(monkeypatch):
    m = llamas.load(TINY)
    monkeypatch.setattr(m.tokenizer, "token_bytes", lambda: None)
    with pytest.raises(LlamasError, match="byte-level BPE"):
        m.generate("x", max_new_tokens=4, json_object=True)
    with pytest.raises(LlamasError, match="json_object must be True or False"):
        llamas.load(TINY).generate("x", max_new_tokens=4, json_object="yes")
    with pytest.raises(LlamasError, match="min_tokens cannot be combined with JSON mode"):
        llamas.load(TINY).generate("x", max_new_tokens=4, json_object=True, min_tokens=2)
    with pytest.raises(LlamasError, match="ignore_eos cannot be combined with JSON mode"):
        llamas.load(TINY).generate("x", max_new_tokens=4, json_object=True, ignore_eos=True)


def test_cli_json_flag():
    r = run_llamas("generate", "--model", TINY, "{", "--json", "--seed", "1", "--max-new-tokens", "40")
    assert r.returncode == 0, r.stderr
    text = r.stdout[:-1]
    assert _C.json_prefix(text.encode())[0], text


# ---- server -------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_server_json_mode(http, path):
    base = {"prompt": "JSON:"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "JSON"}]}
    for seed in range(4):
        body = {**base, "response_format": {"type": "json_object"}, "max_tokens": 60, "seed": seed, "n": 2}
        out = http.post(path, json=body).json()
        texts = []
        for c in out["choices"]:
            text = c["text"] if "text" in c else c["message"]["content"]
            check_output(text, c["finish_reason"])
            texts.append(text)
        pieces = {}
        with http.stream("POST", path, json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for c in json.loads(line[6:])["choices"]:
                        piece = c["text"] if "text" in c else c["delta"].get("content", "")
                        pieces[c["index"]] = pieces.get(c["index"], "") + piece
        assert [pieces[i] for i in range(2)] == texts


@pytest.mark.parametrize("value, message", [
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "'response_format.json_schema.schema' is required"),
    ({"type": "json_schema"}, "'response_format.json_schema' must be an object"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "number", "multipleOf": 2}}},
     "'multipleOf' is not supported"),
    ({"type": "xml"}, "must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or"),
    ({"type": "json_object", "extra": 1}, "must be {\"type\": \"text\"}"),
    ("json", "'response_format' must be an object"),
    ({"type": "json_object", "min_tokens": 2}, "'min_tokens' cannot be combined"),
    ({"type": "json_object", "ignore_eos": True}, "'ignore_eos' cannot be combined"),
])
def test_server_refuses_other_response_formats(http, value, message):
    for path, base in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        extra = {k: v for k, v in value.items() if k in ("min_tokens", "ignore_eos")} if isinstance(value, dict) else {}
        if extra:  # the combination, not the format, is refused
            r = http.post(path, json={**base, "max_tokens": 4, "response_format": {"type": "json_object"}, **extra})
            assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
            continue
        r = http.post(path, json={**base, "max_tokens": 4, "response_format": value})
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]["message"] and r.json()["error"]["param"] == "response_format"
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "response_format": {"type": "text"}})
    assert r.status_code == 200


# ---- choices (vLLM's guided_choice) ---------------------------------------------------------------
CHOICES = ["yes", "no", "yesterday", "maybe not", "caf\u00e9 \u2014 \U0001F600"]


def test_the_output_is_exactly_one_choice(model):
    results = submit_grid(model, "Is it so? Answer:", range(10), (0.0, 1.5), (2, 24), choices=CHOICES)
    seen = set()
    for r in results:
        if r.finish_reason == "stop":
            assert r.text in CHOICES, r.text
            seen.add(r.text)
        else:  # cut by max_new_tokens: the start of a choice (an unfinished character shows as U+FFFD)
            assert r.finish_reason == "length" and any(c.startswith(r.text.rstrip("\ufffd")) for c in CHOICES), r.text
    assert len(seen) >= 2  # sampling really chose among them
    assert model.generate("x", max_new_tokens=8, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                          repetition_penalty=1.0, choices=["only"]) == "only"


@pytest.mark.parametrize("kwargs, message", [
    (dict(choices=[]), "choices must be a non-empty list"),
    (dict(choices="yes"), "choices must be a non-empty list"),
    (dict(choices=["a", ""]), "choices must be a non-empty list"),
    (dict(choices=["a", 3]), "choices must be a non-empty list"),
    (dict(choices=[str(i) for i in range(65)]), "at most 64"),
    (dict(choices=["x" * 1025]), "at most 1024"),
    (dict(choices=["\ud800"]), "not valid Unicode"),
    (dict(choices=["a"], json_object=True), "cannot be combined"),
    (dict(choices=["a"], min_tokens=1), "min_tokens cannot be combined with choices"),
    (dict(choices=["a"], ignore_eos=True), "ignore_eos cannot be combined with choices"),
])
def test_bad_choices_are_refused(kwargs, message):
    with pytest.raises(LlamasError, match=message):
        llamas.load(TINY).generate("x", max_new_tokens=4, **kwargs)


def test_cli_choice_flag():
    r = run_llamas("generate", "--model", TINY, "Q:", "--choice", "alpha", "--choice", "beta gamma", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout[:-1] in ("alpha", "beta gamma")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_server_guided_choice(http, path):
    base = {"prompt": "Q:"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Q"}]}
    body = {**base, "guided_choice": CHOICES, "max_tokens": 24, "seed": 3, "n": 4}
    out = http.post(path, json=body).json()
    texts = [c["text"] if "text" in c else c["message"]["content"] for c in out["choices"]]
    assert all(t in CHOICES for t in texts) and all(c["finish_reason"] == "stop" for c in out["choices"])
    for extra, message in (({"guided_choice": []}, "non-empty array"), ({"guided_choice": "yes"}, "non-empty array"),
                           ({"guided_choice": ["a", 1]}, "must contain strings"), ({"guided_choice": [""]}, "not be empty"),
                           ({"guided_choice": ["a"] * 65}, "at most 64"), ({"guided_choice": ["x" * 1025]}, "1024"),
                           ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "cannot be combined"),
                           ({"guided_choice": ["a"], "min_tokens": 1}, "'min_tokens' cannot be combined")):
        r = http.post(path, json={**base, "max_tokens": 4, **extra})
        assert r.status_code == 400 and message in r.json()["error"]["message"], (extra, r.text)
