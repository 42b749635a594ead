"""Structured output against a JSON Schema (response_format json_schema, guided_json, json_schema=):
the compiler's refusals, the native recogniser against the `jsonschema` validator (every prefix of
an instance it accepts can be completed, whatever it completes validates), and generation held
to it in Model.generate, Engine, the CLI and the server."""
import json
import os
import random
import re

import jsonschema
import pytest

import llamas
from conftest import run_llamas, submit_grid, walk_recogniser
from llamas._C import LlamasError
from llamas.json_schema import compile_json_schema

HERE = os.path.dirname(__file__)
TINY = os.path.join(HERE, "fixtures", "gpt2-tiny")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": ["string", "null"], "format": "email", "maxLength": 24},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "ok": {"type": "boolean"},
        "score": {"type": "number", "minimum": -1.5, "exclusiveMaximum": 2},
    },
    "required": ["name", "age", "ok", "score"],
    "additionalProperties": False,
}
# Recursion through $defs, anyOf that only a later byte settles, a free-form map, const, nulls.
TREE = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {"value": {"type": "integer", "exclusiveMinimum": -10, "maximum": 99},
                           "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
            "required": ["value"],
        },
    },
    "anyOf": [
        {"$ref": "#/$defs/node"},
        {"type": "object", "properties": {"value": {"type": "string", "maxLength": 4}, "kind": {"const": "leaf"}},
         "required": ["value", "kind"]},
        {"type": "object", "additionalProperties": {"type": "number"}},
    ],
}
SCALARS = [
    {"type": "integer", "minimum": -3, "maximum": 250},
    {"type": "number"},
    {"enum": [1, 12, 123, "x", None, True, {"a": [1]}]},
    {"type": "string", "minLength": 2, "maxLength": 5},
    {"type": "array", "items": {"type": "number", "minimum": 0.25, "maximum": 0.75}, "maxItems": 3},
    True,
]


def accepts(compiled, text: str):
    return compiled.match(text.encode())


# ---- the compiler ---------------------------------------------------------------------------------
@pytest.mark.parametrize("schema, message", [
    ({"type": "string", "pattern": "(a"}, "at #: 'pattern': a '(' without its ')'"),
    ({"type": "string", "pattern": "a\\1"}, "backreferences are not supported"),
    ({"type": "string", "pattern": "\\d{4}", "minLength": 5}, "'minLength' beside 'pattern' is supported up to"),
    ({"type": "string", "pattern": "\\x01+"}, "has no match that can be written here"),
    ({"properties": {"a": {"type": "number", "multipleOf": 3}}}, "at #/properties/a: 'multipleOf' is not supported"),
    ({"type": "array", "items": [{"type": "string"}]}, "tuple validation"),
    ({"type": "array", "uniqueItems": True}, "'uniqueItems' is not supported"),
    ({"not": {"type": "string"}}, "'not' is not supported"),
    ({"type": "strng"}, "'type' must be one of"),
    ({"type": "string", "minLength": -1}, "'minLength' must be a non-negative integer"),
    ({"type": "integer", "maximum": "9"}, "'maximum' must be a finite number"),
    ({"$ref": "#/$defs/missing"}, "points to nothing"),
    ({"$ref": "https://example.com/schema"}, "must point into this schema"),
    ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "'$ref' cycle"),
    ({"$ref": "#", "type": "object"}, "keywords beside '$ref'"),
    ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "'allOf' is supported with exactly one schema"),
    ({"anyOf": []}, "'anyOf' must be a non-empty array"),
    ({"type": "object", "properties": {f"p{i}": True for i in range(65)}}, "at most 64"),
    ({"enum": list(range(5000))}, "at most 4096"),
    ({"type": "object", "properties": {"a": False}, "required": ["a"]}, "admits no value"),
    ({"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}, "admits no value"),
    ({"type": "integer", "minimum": 3, "maximum": 2}, "admits no value"),
    ({"type": "number", "minimum": 2, "exclusiveMaximum": 2}, "admits no value"),
    ({"type": "string", "enum": [1, 2]}, "admits no value"),
    (False, "admits no value"),
    # no number of at most 18 digits (how bounded numbers are written) lies in these bounds
    ({"type": "number", "minimum": 1e-300, "maximum": 2e-300}, "the bounds at # hold no number of at most 18 digits"),
    ({"type": "number", "exclusiveMinimum": 0, "maximum": 1e-20}, "hold no number of at most 18 digits"),
    ({"type": "number", "minimum": -1e-25, "maximum": -1e-26}, "hold no number of at most 18 digits"),
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1e20}}, "required": ["n"]},
     "the bounds at #/properties/n hold no number"),
    ({"type": "number", "minimum": 1e18}, "hold no number of at most 18 digits"),
    ("{not json", "not valid JSON"),
    (3, "a schema must be an object or a boolean"),
])
def test_schemas_it_cannot_follow_are_refused_with_the_place(schema, message):
    with pytest.raises(LlamasError, match=re.escape(message)):
        compile_json_schema(schema)


def test_the_smallest_writable_bounds_are_met():
    # 1e-17 is the finest step 18 digits write ("0." and 17 fraction digits)
    rng = random.Random(3)
    for schema in ({"type": "number", "minimum": 1e-17, "maximum": 3e-17},
                   {"type": "number", "exclusiveMinimum": 0, "maximum": 1e-16},
                   {"type": "number", "minimum": -123456789012, "maximum": -123456789010},
                   # past 2^53, where doubles cannot tell the digits apart (a dot here was a dead end)
                   {"type": "number", "minimum": -9007199254740000, "maximum": -9007199254739990},
                   {"type": "integer", "minimum": 10000000000000001, "maximum": 10000000000000003}):
        for _ in range(4):
            jsonschema.validate(json.loads(random_walk(schema, rng).decode()), schema)


def test_bounds_are_compared_exactly():
    s = compile_json_schema({"type": "integer", "minimum": 10000000000000001, "maximum": 10000000000000003})
    assert [s.match(t)[0] for t in (b"10000000000000000", b"10000000000000001", b"10000000000000003",
                                    b"10000000000000004")] == [False, True, True, False]  # (10^16 + 1 is no double)
    s = compile_json_schema({"type": "number", "exclusiveMaximum": 2, "minimum": 0})
    assert s.match(b"1.99999999999999999") == (True, True) and s.match(b"2")[0] is False
    # as written, not as the double nearest (0.1000000000000000055...)
    s = compile_json_schema({"type": "number", "minimum": 0.1, "exclusiveMaximum": 0.3})
    assert s.match(b"0.1") == (True, True) and s.match(b"0.09999999999999999")[0] is False
    assert s.match(b"0.29999999999999999") == (True, True) and s.match(b"0.3")[0] is False


def test_refs_are_uri_fragments():
    s = compile_json_schema({"$defs": {"a b": {"const": 1}, "c/d": {"const": 2}},
                             "anyOf": [{"$ref": "#/$defs/a%20b"}, {"$ref": "#/$defs/c~1d"}]})
    assert accepts(s, "1") == (True, True) and accepts(s, "2") == (True, True) and accepts(s, "3")[0] is False


def test_what_cannot_be_met_is_dropped_not_refused():
    s = compile_json_schema({"type": "object", "properties": {"a": False, "b": {"type": "integer"}}})
    assert accepts(s, '{"b":1}') == (True, True) and accepts(s, '{"a"')[0] is False
    arr = compile_json_schema({"type": "array", "items": False})
    assert accepts(arr, "[]") == (True, True) and accepts(arr, "[1")[0] is False
    alt = compile_json_schema({"anyOf": [{"type": "string", "minLength": 3, "maxLength": 2}, {"type": "null"}]})
    assert accepts(alt, "null") == (True, True) and accepts(alt, '"')[0] is False


# ---- the recogniser -------------------------------------------------------------------------------
@pytest.mark.parametrize("schema, valid, invalid, unwritten", [
    (PERSON, ['{"name":"Bo","age":7,"ok":true,"score":1.99}',
              '{\n  "name": "Bo",\n  "age": 120,\n  "email": null,\n  "tags": ["red"],\n  "ok": false,\n  "score": -1.5\n}'],
     ['{"age":7}', '{"name":"","age":7,"ok":true,"score":0}', '{"name":"Bo","age":121', '{"name":"Bo","age":-1',
      '{"name":"Bo","age":7,"ok":true,"score":2}', '{"name":"Bo","age":7,"ok":true,"score":-1.6',
      '{"name":"Bo","age":7,"ok":true,"score":1,"x"', '{"name":"Bo","age":1.5', '{"name":"Bo","tags":[]'],
     # valid, but not how structured output writes it: properties out of the schema's order, a
     # leading zero, \u escapes, runs of spaces, \r, exponents beside bounds, integers as 1.0
     ['{"age":7,"name":"Bo"', '{"name":"Bo","age":07', '{"name":"\\u0041"', '{  "name"', '{\r\n"name"',
      '{"name":"Bo","age":7,"ok":true,"score":1e0}', '{"name":"Bo","age":7.0']),
    (TREE, ['{"value":3}', '{"value":-9,"children":[{"value":1},{"value":2,"children":[]}]}',
            '{"value":"abcd","kind":"leaf"}', '{"value":2.5}', '{}', '{"x":-1e5,"y":0}'],
     ['{"value":-10,"children":[]}', '{"value":"abcde"', '{"value":"ab"}', '{"value":1,"children":[{},{},{}]}',
      '{"value":"ab","kind":"tree"'], []),
    (SCALARS[0], ["-3", "0", "250", "99"], ["-4", "251", "2500"], ["-0", "00", "1.0"]),
    (SCALARS[2], ["1", "12", "123", '"x"', "null", "true", '{"a":[1]}'], ["2", "1234", '"y"', "false"],
     ['{"a": [1]}']),
    (SCALARS[4], ["[]", "[0.25,0.5,0.75]", "[0.3]"], ["[0.2]", "[0.8]", "[1]", "[0.5,0.5,0.5,0.5]"], ["[2.5e-1]"]),
])
def test_instances_and_near_misses(schema, valid, invalid, unwritten):
    s = compile_json_schema(schema)
    check = jsonschema.Draft202012Validator(schema)
    for text in valid:
        assert check.is_valid(json.loads(text)), text  # the cases themselves are right
        assert accepts(s, text) == (True, True), text
        for i in range(len(text)):
            ok, complete = accepts(s, text[:i])
            assert ok, (text, text[:i])
            assert not complete or check.is_valid(json.loads(text[:i])), (text, text[:i])  # "2" of "250"
    for text in invalid + unwritten:
        try:
            value = json.loads(text)
        except ValueError:  # a prefix that no instance starts with
            pass
        else:
            assert check.is_valid(value) is (text in unwritten), text
        assert accepts(s, text) != (True, True), text


def random_walk(schema, rng, soft_limit=120):
    """A walk through the schema's recogniser, preferring past soft_limit what ends strings, numbers
    and containers."""
    return walk_recogniser(compile_json_schema(schema), rng, soft_limit, stop=0.3, closing=b'"}]',
                           settle=b'",:0123456789')


@pytest.mark.parametrize("schema", [PERSON, TREE] + SCALARS, ids=lambda s: str(s)[:30])
def test_what_the_recogniser_completes_validates(schema):
    rng = random.Random(7)
    for _ in range(6):
        text = random_walk(schema, rng)
        jsonschema.validate(json.loads(text.decode("utf-8")), schema)


# ---- generation -----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["tiny", "bundled"])
def model(request):
    return llamas.load(TINY) if request.param == "tiny" else llamas.load()


def check_output(text: str, finish_reason: str, schema) -> None:
    if finish_reason == "stop":
        jsonschema.validate(json.loads(text), schema)
    else:
        assert finish_reason == "length" and compile_json_schema(schema).match(text.encode())[0], text


@pytest.mark.parametrize("schema", [PERSON, TREE], ids=["person", "tree"])
def test_generated_text_is_always_an_instance(model, schema):
    results = submit_grid(model, "Answer in JSON:", range(6), (0.0, 1.0), (10, 200), json_schema=schema)
    alone, = submit_grid(model, "Answer in JSON:", [None], [0.0], [200], json_schema=schema)
    reasons = set()
    for r in results:
        check_output(r.text, r.finish_reason, schema)
        reasons.add(r.finish_reason)
    if schema is PERSON:  # (TREE's free-form keys can run on past 200 tokens, or it can end at once: "{}")
        assert reasons == {"stop", "length"}
    assert alone.text == results[1].text  # (seed 0, greedy, 200 tokens) alone or in the batch
    g = dict(max_new_tokens=200, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
             json_schema=json.dumps(schema))  # the schema as JSON text works the same
    assert model.generate("Answer in JSON:", **g) == alone.text
    assert "".join(model.generate("Answer in JSON:", stream=True, **g)) == alone.text


def test_bad_structured_output_arguments():
    m = llamas.load(TINY)
    for kwargs, message in (({"json_schema": {"type": "number", "multipleOf": 2}}, "'multipleOf' is not supported"),
                            ({"json_schema": {"type": "string"}, "json_object": True}, "cannot be combined"),
                            ({"json_schema": {"type": "string"}, "choices": ["a"]}, "cannot be combined"),
                            ({"json_schema": True, "min_tokens": 2}, "min_tokens cannot be combined with json_schema"),
                            ({"json_schema": {1, 2}}, "not JSON data")):
        with pytest.raises(LlamasError, match=message):
            m.generate("x", max_new_tokens=4, **kwargs)


def test_cli_json_schema_flag(tmp_path):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(PERSON))
    for source in (str(path), json.dumps(PERSON)):
        r = run_llamas("generate", "--model", TINY, "{", "--json-schema", source,
                       "--seed", "1", "--max-new-tokens", "100", "--temperature", "0.8")
        assert r.returncode == 0, r.stderr
        assert compile_json_schema(PERSON).match(r.stdout[:-1].encode())[0], r.stdout
    for source, message in ((str(tmp_path / "missing.json"), "cannot read the JSON schema"),
                            ('{"type": "number", "multipleOf": 2}', "'multipleOf' is not supported")):
        r = run_llamas("generate", "--model", TINY, "x", "--json-schema", source)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---- server -------------------------------------------------------------------------------------
def response_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_server_json_schema(http, path):
    base = {"prompt": "JSON:"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "JSON"}]}
    for extra in ({"response_format": response_format(PERSON)}, {"guided_json": PERSON},
                  {"guided_json": json.dumps(PERSON)}):
        for stream in (False, True):
            body = {**base, **extra, "max_tokens": 100, "seed": 5, "n": 2, "temperature": 0.9, "stream": stream}
            if not stream:
                out = http.post(path, json=body).json()
                texts = [c["text"] if "text" in c else c["message"]["content"] for c in out["choices"]]
                for c, t in zip(out["choices"], texts):
                    check_output(t, c["finish_reason"], PERSON)
                continue
            pieces = {}
            with http.stream("POST", path, json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        c = json.loads(line[6:])["choices"][0]
                        piece = c["text"] if "text" in c else c["delta"].get("content", "")
                        pieces[c["index"]] = pieces.get(c["index"], "") + (piece or "")
            assert [pieces[i] for i in range(2)] == texts  # same seed, same text streamed or not


@pytest.mark.parametrize("extra, message", [
    ({"response_format": response_format({"type": "number", "multipleOf": 2})}, "'multipleOf' is not supported"),
    ({"response_format": response_format({"type": "string", "pattern": "(?=x)"})}, "lookaround"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}}},
     "Unrecognized request argument supplied: extra"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}},
     "'response_format.json_schema.strict' must be a boolean"),
    ({"guided_json": 5}, "'guided_json' must be a JSON Schema"),
    ({"response_format": response_format({"type": "number", "minimum": 1e-300, "maximum": 2e-300})},
     "hold no number of at most 18 digits"),
    ({"guided_json": "{oops"}, "not valid JSON"),
    ({"guided_json": {"type": "object"}, "guided_choice": ["a"]}, "cannot be combined"),
    ({"guided_json": {"type": "object"}, "response_format": {"type": "json_object"}}, "cannot be combined"),
    ({"guided_json": {"type": "object"}, "ignore_eos": True}, "'ignore_eos' cannot be combined"),
])
def test_server_refuses_bad_schemas(http, extra, message):
    for path, base in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        r = http.post(path, json={**base, "max_tokens": 4, **extra})
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_server_refuses_a_schema_with_a_lone_surrogate(http):
    body = json.dumps({"prompt": "x", "max_tokens": 4, "guided_json": {"enum": ["\ud800"]}})  # (ASCII: \\ud800)
    r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "lone surrogate (\\ud800)" in r.json()["error"]["message"], r.text


def test_openai_client_structured_output(http):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=str(http.base_url).rstrip("/") + "/v1", api_key="none", max_retries=0)
    out = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=100, seed=2,
                                         messages=[{"role": "user", "content": "Describe a person."}],
                                         response_format=response_format(PERSON))
    check_output(out.choices[0].message.content, out.choices[0].finish_reason, PERSON)


def random_schema(rng, depth=0):
    """A schema from the supported keywords, nested a few levels (for the walks below)."""
    kinds = ["string", "integer", "number", "boolean", "null", "enum", "const", "true"]
    if depth < 3:
        kinds += ["object", "object", "array", "anyOf", "map", "types"]
    kind = rng.choice(kinds)
    if kind == "string" and rng.random() < 0.3:  # (patterns without \s or \w: Python's differ past ASCII)
        pattern = rng.choice(["[a-c]+x?", "(ab|cd){1,2}", "^[0-9]{2}-[0-9]$", "\u00e9+|z", 'q"?\\\\?\n?', "[^a-y]{0,3}"])
        return {"type": "string", "pattern": pattern, **({"maxLength": 4} if rng.random() < 0.5 else {})}
    if kind == "string":
        lo = rng.choice([None, 0, 1, 3])
        hi = rng.choice([None, 3, 8]) if lo is None or lo <= 3 else None
        return {"type": "string", **({"minLength": lo} if lo is not None else {}),
                **({"maxLength": hi} if hi is not None else {})}
    if kind in ("integer", "number"):
        s = {"type": kind}
        lo, hi = rng.choice([None, -5, 0, 0.5, 7]), rng.choice([None, 0.75, 9, 120, 1e6])
        if lo is not None:
            s["exclusiveMinimum" if rng.random() < 0.3 else "minimum"] = lo
        if hi is not None and (lo is None or hi > lo + 1):
            s["exclusiveMaximum" if rng.random() < 0.3 else "maximum"] = hi
        return s
    if kind in ("boolean", "null"):
        return {"type": kind}
    if kind == "enum":
        return {"enum": rng.sample([1, 12, -3.5, "a", "ab", "b\u00e9", None, True, [1, "x"], {"k": None}],
                                   rng.randint(1, 5))}
    if kind == "const":
        return {"const": rng.choice(["x", 0, {"a": [True]}, None])}
    if kind == "true":
        return True
    if kind == "object":
        names = rng.sample(["a", "b", "c\u00e9", "d e", 'q"x', "ab"], rng.randint(0, 4))
        counts = {}
        if rng.random() < 0.3 and names:  # (free-form objects take minProperties up to 1 only)
            counts["minProperties"] = rng.randint(0, 3)
        if rng.random() < 0.3:
            counts["maxProperties"] = rng.randint(0, 3)
        return {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names},
                "required": [n for n in names if rng.random() < 0.5],
                **({"additionalProperties": False} if rng.random() < 0.5 else {}), **counts}
    if kind == "array":
        lo = rng.choice([0, 0, 1, 2])
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": lo,
                **({"maxItems": lo + rng.randint(0, 3)} if rng.random() < 0.6 else {})}
    if kind == "map":
        return {"type": "object", "additionalProperties": random_schema(rng, depth + 1),
                **({"minProperties": 1, "maxProperties": 2} if rng.random() < 0.4 else {})}
    if kind == "types":
        return {"type": rng.sample(["string", "integer", "number", "null", "boolean", "array"], 2)}
    # (oneOf is written as anyOf, as llama.cpp and xgrammar do: an output may match two alternatives)
    return {"anyOf": [random_schema(rng, depth + 1) for _ in range(rng.randint(1, 3))]}


def test_random_schemas_never_dead_end_and_always_validate():
    rng = random.Random(11)
    walked = 0
    for _ in range(60):
        schema = random_schema(rng)
        try:
            compile_json_schema(schema)
        except LlamasError as e:  # only for a schema that admits nothing
            assert "admits no value" in str(e), (schema, e)
            assert not any(jsonschema.Draft202012Validator(schema).is_valid(v) for v in (None, 0, "", [], {}))
            continue
        for _ in range(2):
            text = random_walk(schema, rng)
            value = json.loads(text.decode("utf-8"))
            assert jsonschema.Draft202012Validator(schema).is_valid(value), (schema, text)
            walked += 1
    assert walked >= 80


def test_nesting_is_bounded_without_dead_ends():
    deep = True
    for _ in range(25):
        deep = {"type": "array", "minItems": 1, "items": deep}
    with pytest.raises(LlamasError, match="nest 26 deep at least; at most 24"):
        compile_json_schema(deep)
    # Recursion that may stop: the 24th level can only be the integer, never another array.
    tree = compile_json_schema({"$defs": {"a": {"anyOf": [{"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/a"}},
                                                           {"type": "integer"}]}}, "$ref": "#/$defs/a"})
    assert accepts(tree, "[" * 23)[0] and not accepts(tree, "[" * 24)[0]
    assert accepts(tree, "[" * 23 + "1" + "]" * 23) == (True, True)
    obj = compile_json_schema({"type": "object", "properties": {"x": {"$ref": "#"}}})
    assert accepts(obj, '{"x":' * 23 + "{}" + "}" * 23) == (True, True)
    assert not accepts(obj, '{"x":' * 23 + '{"')[0]  # no room for x's value: only "}" is left


def test_malformed_node_tables_are_refused():
    from llamas import _C
    for build, message in (
            (lambda s: s.add_node("string", children=[5]), "not a node"),
            (lambda s: s.add_node("enum"), "needs 1 to 65535 values"),
            (lambda s: s.add_node("enum", literals=[b"b", b"a"]), "not sorted"),
            (lambda s: s.add_node("object", literals=[b"a"]), "one name, child and required flag"),
            (lambda s: s.add_node("array"), "one items node"),
            (lambda s: s.add_node("string", min_count=3, max_count=2), "has counts"),
            (lambda s: s.add_node("anyOf"), "no alternatives"),
            (lambda s: s.add_node("string", min_depth=30), "levels of nesting")):
        s = _C.JsonSchema()
        build(s)
        with pytest.raises(LlamasError, match=message):
            s.validate()
    with pytest.raises(LlamasError, match="unknown node kind"):
        _C.JsonSchema().add_node("tuple")
    with pytest.raises(LlamasError, match="1 to 65535 nodes"):
        _C.JsonSchema().validate()


def test_property_counts():
    one_of = compile_json_schema({"type": "object", "properties": {"a": True, "b": True, "c": True},
                                  "minProperties": 1, "maxProperties": 1, "additionalProperties": False})
    assert accepts(one_of, '{"b":1}') == (True, True)
    assert not accepts(one_of, "{}")[1] and not accepts(one_of, '{"a":1,')[0]
    # two of three, in order: after "c" alone nothing is left, so "c" cannot come first
    two = compile_json_schema({"type": "object", "properties": {"a": True, "b": True, "c": True},
                               "minProperties": 2})
    assert accepts(two, '{"a":1,"c":2}') == (True, True) and not accepts(two, '{"c"')[0]
    assert not accepts(two, '{"a":1}')[1]
    # optional ones cannot crowd out a required one under maxProperties
    req = compile_json_schema({"type": "object", "properties": {"a": True, "b": True, "c": True},
                               "required": ["c"], "maxProperties": 2})
    assert accepts(req, '{"a":1,"c":2}') == (True, True) and not accepts(req, '{"a":1,"b"')[0]
    m = compile_json_schema({"type": "object", "additionalProperties": {"type": "integer"},
                             "minProperties": 1, "maxProperties": 2})
    assert accepts(m, '{"x":1,"y":2}') == (True, True)
    assert not accepts(m, "{}")[1] and not accepts(m, '{"x":1,"y":2,')[0]
    with pytest.raises(LlamasError, match="admits no value"):
        compile_json_schema({"type": "object", "properties": {"a": True}, "minProperties": 2,
                             "additionalProperties": False})
    with pytest.raises(LlamasError, match="above 255"):
        compile_json_schema({"type": "object", "properties": {"a": True}, "minProperties": 300})
    with pytest.raises(LlamasError, match="free-form keys could repeat"):
        compile_json_schema({"type": "object", "minProperties": 2})


def test_compact_output_has_no_whitespace():
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}}}
    compact, spaced = compile_json_schema(schema, compact=True), compile_json_schema(schema)
    assert compact.match(b'{"a":[1,2]}') == (True, True) and spaced.match(b'{ "a": [1, 2] }') == (True, True)
    for text in (b' {', b'{ ', b'{"a" :', b'{"a": ', b'{"a":[1 ', b'{"a":[1,\n'):
        assert not compact.match(text)[0] and spaced.match(text)[0], text
    assert compact.match(b'{"a":[]}') == (True, True) and compile_json_schema(schema, compact=True) is compact


def test_server_structured_outputs_object(http):
    """vLLM's structured_outputs (its guided_* fields since v0.12): json, regex, grammar, choice,
    json_object; disable_any_whitespace writes compact JSON."""
    base = {"prompt": "x", "max_tokens": 60, "seed": 3, "temperature": 1.0}
    out = http.post("/v1/completions", json={**base, "structured_outputs": {"json": PERSON}}).json()["choices"][0]
    check_output(out["text"], out["finish_reason"], PERSON)
    out = http.post("/v1/completions", json={**base, "structured_outputs": {
        "json": json.dumps(PERSON), "disable_any_whitespace": True}, "guided_decoding_backend": "xgrammar"}).json()
    text = out["choices"][0]["text"]
    assert compile_json_schema(PERSON, compact=True).match(text.encode())[0], text
    out = http.post("/v1/completions", json={**base, "structured_outputs": {"regex": "[a-c]{2}\\d"}}).json()
    assert re.fullmatch("[a-c]{2}\\d", out["choices"][0]["text"])
    out = http.post("/v1/completions", json={**base, "structured_outputs": {"choice": ["up", "down"]}}).json()
    assert out["choices"][0]["text"] in ("up", "down")
    out = http.post("/v1/completions", json={**base, "structured_outputs": {"grammar": 'root ::= "a"+ "b"'}}).json()
    assert re.fullmatch("a+b", out["choices"][0]["text"]) or out["choices"][0]["finish_reason"] == "length"
    out = http.post("/v1/completions", json={**base, "structured_outputs": {"json_object": True}}).json()
    assert out["choices"][0]["finish_reason"] == "length" or isinstance(json.loads(out["choices"][0]["text"]), dict)
    for so, message in (({"json": PERSON, "regex": "a"}, "cannot be combined"),
                        ({"whitespace_pattern": " *"}, "'structured_outputs.whitespace_pattern' is not supported"),
                        ({"regex": "(a"}, "'structured_outputs.regex': the pattern: a '(' without its ')'"),
                        ({"choice": []}, "'structured_outputs.choice' must be a non-empty array"),
                        ({"json_object": "yes"}, "'structured_outputs.json_object' must be a boolean"),
                        ({"regexp": "a"}, "Unrecognized request argument supplied: regexp"),
                        ("json", "'structured_outputs' must be an object")):
        r = http.post("/v1/completions", json={**base, "structured_outputs": so})
        assert r.status_code == 400 and message in r.json()["error"]["message"], (so, r.text)
    r = http.post("/v1/completions", json={**base, "structured_outputs": {"regex": "a"}, "guided_regex": "b"})
    assert r.status_code == 400 and "cannot be combined" in r.json()["error"]["message"]
