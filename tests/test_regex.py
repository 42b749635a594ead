"""Regular expressions in structured output: the compiler (llamas.regex_dfa) against Python's `re`,
JSON Schema `pattern` inside strings, and vLLM's guided_regex (the whole output a match) in
Model.generate, Engine, the CLI and the server."""
import json
import os
import random
import re

import jsonschema
import pytest

import llamas
from conftest import run_llamas, submit_grid, walk_recogniser
from llamas._C import LlamasError
from llamas.json_schema import compile_guided_regex, compile_json_schema
from llamas.regex_dfa import compile_regex

HERE = os.path.dirname(__file__)
TINY = os.path.join(HERE, "fixtures", "gpt2-tiny")

# (ECMAScript pattern, the same for Python's re)
PATTERNS = [
    (r"\d{3}-\d{4}", None), (r"(ab|a)*c?", None), (r"[A-Z][a-z]+( [A-Z][a-z]+)*", None),
    (r"^\w+@\w+\.(com|org)$", None), (r"[^abc]{2,4}x", None), (r"(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", None),
    (r"a{2,}b{0,3}", None), (r"\s*yes|no\s*", None), (r"(?:x|y)+?z", None), (r"[\d\-.]+", None),
    (r"caf\u00e9|\x41+", "caf\u00e9|\\x41+"), (r".{0,3}", None), (r"[\]\[]+", None),
    (r"(?<year>\d{4})-\d\d", r"(?P<year>\d{4})-\d\d"), (r"\{a,b\}", None), (r"x{,2}", r"x\{,2\}"),
]
ALPHABET = "abcxyzAZ019-.@ \u00e9eE+_[]{},\n\u3000"
# ECMAScript's \s (Python's differs past ASCII: it has no U+FEFF); its \w and \d are ASCII.
ECMA_SPACE = "[\t\n\v\f\r \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"


def python_regex(pattern, python):
    return re.compile((python or pattern).replace(r"\s", ECMA_SPACE), re.ASCII)


@pytest.mark.parametrize("pattern, python", PATTERNS, ids=[p for p, _ in PATTERNS])
def test_the_dfa_matches_what_re_fullmatches(pattern, python):
    dfa, rx, raw = compile_regex(pattern), python_regex(pattern, python), compile_guided_regex(pattern)
    rng = random.Random(3)
    for _ in range(1500):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 9)))
        expected = bool(rx.fullmatch(text))
        assert dfa.matches(text) is expected, text
        assert raw.match(text.encode())[1] is expected, text  # the native recogniser agrees


@pytest.mark.parametrize("pattern, message", [
    ("(a", "a '(' without its ')'"), ("a)", "unexpected ')'"), (r"\1", "backreferences"),
    ("(?=a)", "lookaround"), (r"a\b", "word boundaries"), ("*a", "nothing to repeat"), ("a^b", "only at the start"),
    ("[z-a]", "out of order"), (r"\p{L}", "not a supported escape"), ("[a", "a '[' without its ']'"),
    ("a{5,2}", "below the minimum"), (r"\x4", "hexadecimal"), ("a{1}{2}", "a quantifier after a quantifier"),
    ("a{1001}", "above 1000"), ("(a|b)*a(a|b){12}", "automaton states"),
    (r"(\w+\s?){1,300}x", "too complex"), (r"\ud800", "not a character"),
])
def test_patterns_it_cannot_follow_are_refused(pattern, message):
    with pytest.raises(LlamasError, match=re.escape(message)):
        compile_guided_regex(pattern)


def walk(compiled, rng, limit=60):
    return walk_recogniser(compiled, rng, limit, max_len=1000)


@pytest.mark.parametrize("pattern, python", PATTERNS[:12], ids=[p for p, _ in PATTERNS[:12]])
def test_walks_through_guided_regex_are_whole_matches(pattern, python):
    rng, compiled = random.Random(5), compile_guided_regex(pattern)
    for _ in range(5):
        text = walk(compiled, rng).decode("utf-8")
        assert python_regex(pattern, python).fullmatch(text), text


PATTERNED = {
    "type": "object",
    "properties": {
        "zip": {"type": "string", "pattern": r"^\d{5}(-\d{4})?$"},
        "code": {"type": "string", "pattern": "[A-Z]{2}[0-9]+", "maxLength": 5},
        "quote": {"type": "string", "pattern": 'say "hi"\\\\?\\n?\u00e9*'},
        "any": {"type": "string", "pattern": "a|b|.x"},
    },
    "required": ["zip", "code", "quote"],
}


def test_pattern_strings_with_json_escapes():
    s = compile_json_schema(PATTERNED)
    good = '{"zip":"12345-6789","code":"AB12","quote":"say \\"hi\\"\\\\\\n\u00e9\u00e9"}'
    jsonschema.validate(json.loads(good), PATTERNED)
    assert s.match(good.encode()) == (True, True)
    for bad in ('{"zip":"1234"', '{"zip":"12345-","code"', '{"zip":"12345","code":"AB1234"',
                '{"zip":"12345","code":"A1"', '{"zip":"12345","code":"AB1","quote":"say "',
                '{"zip":"\\u0031'):
        assert s.match(bad.encode()) != (True, True), bad
    # maxLength 5 and [A-Z]{2}[0-9]+: after "ABCD" nothing fits; after "AB123" only the quote
    assert not s.match(b'{"zip":"12345","code":"ABC')[0]
    assert not s.match(b'{"zip":"12345","code":"AB1234')[0]
    rng = random.Random(2)
    for _ in range(6):
        text = walk(s, rng, limit=120)
        jsonschema.validate(json.loads(text.decode("utf-8")), PATTERNED)


# ---- generation ---------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["tiny", "bundled"])
def model(request):
    return llamas.load(TINY) if request.param == "tiny" else llamas.load()


def test_generated_text_matches_the_regex(model):
    pattern = r"(Yes|No), \d{1,3} (apples|pears)\."
    results = submit_grid(model, "Q:", range(5), (0.0, 1.2), (3, 40), regex=pattern)
    schema_results = submit_grid(model, "Q:", range(4), (1.0,), (150,), json_schema=PATTERNED)
    reasons = set()
    for r in results:
        reasons.add(r.finish_reason)
        if r.finish_reason == "stop":
            assert re.fullmatch(pattern, r.text), r.text
        else:
            assert compile_guided_regex(pattern).match(r.text.encode())[0], r.text
    assert reasons == {"stop", "length"}
    for r in schema_results:
        if r.finish_reason == "stop":
            jsonschema.validate(json.loads(r.text), PATTERNED)
    g = dict(max_new_tokens=40, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    assert model.generate("Q:", regex=pattern, **g) == results[1].text  # seed 0, greedy, 40 tokens
    assert "".join(model.generate("Q:", regex=pattern, stream=True, **g)) == results[1].text


def test_bad_regex_arguments():
    m = llamas.load(TINY)
    for kwargs, message in (({"regex": "(a"}, "without its ')'"), ({"regex": 5}, "must be a string"),
                            ({"regex": "a", "json_object": True}, "cannot be combined"),
                            ({"regex": "a", "min_tokens": 1}, "min_tokens cannot be combined with regex")):
        with pytest.raises(LlamasError, match=re.escape(message)):
            m.generate("x", max_new_tokens=4, **kwargs)


def test_cli_regex_flag():
    r = run_llamas("generate", "--model", TINY, "Q:", "--regex", r"[a-c]{3}\d", "--seed", "1", "--temperature", "1")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"[a-c]{3}\d", r.stdout[:-1]), r.stdout
    r = run_llamas("generate", "--model", TINY, "Q:", "--regex", "(?!x)")
    assert r.returncode != 0 and "lookaround" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_server_guided_regex(http, path):
    base = {"prompt": "Q:"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Q"}]}
    pattern = r"\d{2}:\d{2} (am|pm)"
    out = http.post(path, json={**base, "guided_regex": pattern, "max_tokens": 20, "seed": 1, "n": 3,
                                "temperature": 1.0}).json()
    for c in out["choices"]:
        text = c["text"] if "text" in c else c["message"]["content"]
        assert c["finish_reason"] == "stop" and re.fullmatch(pattern, text), text
    for extra, message in (({"guided_regex": "(a"}, "'guided_regex': the pattern: a '(' without its ')'"),
                           ({"guided_regex": 3}, "'guided_regex' must be a string"),
                           ({"guided_regex": "a", "guided_choice": ["a"]}, "cannot be combined"),
                           ({"guided_regex": "a", "ignore_eos": True}, "'ignore_eos' cannot be combined")):
        r = http.post(path, json={**base, "max_tokens": 4, **extra})
        assert r.status_code == 400 and message in r.json()["error"]["message"], (extra, r.text)


def test_formats_are_written_in_their_syntax():
    import datetime
    import ipaddress
    import uuid
    from llamas.schema_compiler import FORMAT_PATTERNS

    def iso(v):  # fromisoformat before Python 3.11 takes only 3 or 6 digits of fraction, and no "Z"
        v = re.sub(r"\.(\d{1,6})", lambda m: "." + m.group(1).ljust(6, "0"), v)
        return v[:-1] + "+00:00" if v.endswith("Z") else v
    parse = {"uuid": uuid.UUID, "ipv4": ipaddress.IPv4Address, "time": lambda v: datetime.time.fromisoformat(iso(v)),
             "date-time": lambda v: datetime.datetime.fromisoformat(iso(v[:8] + "01" + v[10:])),  # (day 31 of 30)
             "date": lambda v: datetime.date.fromisoformat(v[:8] + "01"), "email": lambda v: v.index("@")}
    rng = random.Random(4)
    for fmt, pattern in FORMAT_PATTERNS.items():
        s = compile_json_schema({"type": "string", "format": fmt})
        for _ in range(4):
            value = json.loads(walk(s, rng, limit=100).decode("utf-8"))
            assert re.fullmatch(pattern, value, re.ASCII), (fmt, value)
            parse[fmt](value)
    # a minLength longer than the format allows leaves the format to the model; unknown formats too
    long = compile_json_schema({"type": "string", "format": "uuid", "minLength": 40})
    assert long.match(b'"' + b"x" * 40 + b'"') == (True, True)
    assert compile_json_schema({"type": "string", "format": "hostname"}).match(b'"x y"') == (True, True)
    assert compile_json_schema({"type": "string", "format": "date"}).match(b'"2026-13-01"')[0] is False
