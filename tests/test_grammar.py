"""GBNF grammars in structured output (guided_grammar, grammar=, --grammar): the compiler's refusals,
the native recogniser against a plain recursive matcher over the same rules, random walks that
must end in sentences of the grammar, and generation held to it in Model.generate, Engine, the
CLI and the server."""
import functools
import json
import os
import random
import re

import pytest

import llamas
from conftest import run_llamas, submit_grid, walk_recogniser
from llamas._C import LlamasError
from llamas.grammar import JSON_GRAMMAR, _Parser, compile_grammar

HERE = os.path.dirname(__file__)
TINY = os.path.join(HERE, "fixtures", "gpt2-tiny")

LIST = r'''
root ::= answer ("," ws answer){0,2} "."
answer ::= "yes" | "no" | num
num ::= "-"? [1-9] [0-9]*   # a number
ws ::= [ \t]?
'''
NESTED = r'''
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor ("*" factor)*
factor ::= [0-9]+ | "(" expr ")" | "caf\u00e9" | [\u4e00-\u4e09]
'''
GRAMMARS = {"list": LIST, "jsonish": JSON_GRAMMAR, "nested": NESTED}


def reference(grammar: str):
    """A recursive matcher over the parsed rules: matches(text) for the whole text from 'root'."""
    rules = _Parser(grammar).parse()

    def matcher(text):
        @functools.lru_cache(maxsize=None)
        def rule(name, pos):
            return frozenset(e for alt in rules[name] for e in seq(tuple(map(freeze, alt)), pos))

        def seq(items, pos):
            ends = {pos}
            for it in items:
                ends = {e2 for e in ends for e2 in item(it, e)}
            return ends

        def item(it, pos):
            kind = it[0]
            if kind == "chars":
                return {pos + 1} if pos < len(text) and any(lo <= ord(text[pos]) <= hi for lo, hi in it[1]) else set()
            if kind == "text":
                return {pos + len(it[1])} if text.startswith(it[1], pos) else set()
            if kind == "ref":
                return rule(it[1], pos)
            if kind == "group":
                return {e for alt in it[1] for e in seq(alt, pos)}
            _, inner, lo, hi = it
            ends, reached = {pos}, set()
            for count in range(0, (hi if hi is not None else len(text) + 1) + 1):
                if count >= lo:
                    reached |= ends
                ends = {e2 for e in ends for e2 in item(inner, e)} - ({pos} if hi is None else set())
                if not ends:
                    break
            return reached
        return len(text) in rule("root", 0)

    return matcher


def freeze(item):
    kind = item[0]
    if kind == "chars":
        return ("chars", tuple(item[1]))
    if kind == "group":
        return ("group", tuple(tuple(freeze(i) for i in alt) for alt in item[1]))
    if kind == "rep":
        return ("rep", freeze(item[1]), item[2], item[3])
    return item


def walk(compiled, rng, limit=80):
    return walk_recogniser(compiled, rng, limit, stop=0.2, closing=b'.)}]"', max_len=2000)


@pytest.mark.parametrize("name", list(GRAMMARS))
def test_the_recogniser_agrees_with_a_recursive_matcher(name):
    grammar = GRAMMARS[name]
    compiled, matches = compile_grammar(grammar), reference(grammar)
    rng = random.Random(9)
    alphabet = {"list": "yesno-0129,. \t", "jsonish": '{}[]",:0123.-truefalsn \n\\ab', "nested": "0129+-*()caf\u00e9\u4e00"}
    for _ in range(1500):
        text = "".join(rng.choice(alphabet[name]) for _ in range(rng.randint(0, 12)))
        assert compiled.match(text.encode())[1] is matches(text), text
    for _ in range(12):
        text = walk(compiled, rng).decode("utf-8")
        assert matches(text), text


def test_hand_checked_sentences():
    s = compile_grammar(LIST)
    for text, whole in (("yes.", True), ("no, yes.", True), ("12,-3, no.", True), ("yes", False), ("-", False)):
        assert s.match(text.encode()) == (True, whole), text
    for text in ("0.", "yes, no, 1, 2.", "no ,yes.", "yes.."):
        assert s.match(text.encode())[1] is False, text
    j = compile_grammar(JSON_GRAMMAR)
    assert j.match(b'{"a": [1, 2.5, "x\\n"], "b": {"c": null}}') == (True, True)
    assert json.loads('{"a": [1, 2.5, "x\\n"], "b": {"c": null}}')


@pytest.mark.parametrize("grammar, message", [
    ('root ::= root "a" | "b"', "left recursion (a rule that can start with itself): root -> root"),
    ('root ::= "x"? root | "y"', "left recursion"),
    ('root ::= a\na ::= b | "c"\nb ::= a "d"', "a -> b -> a"),
    ('root ::= a\na ::= b\nb ::= a', "the root rule matches no text"),
    ('x ::= "a"', "needs a rule named 'root'"),
    ("root ::= missing", "'missing' is used but not defined"),
    ("root ::= [a", "an unterminated character class at line 1"),
    ('root ::= "a" | ("b"', "a '(' without its ')'"),
    ('root ::= "\\q"', "'\\q' is not an escape"),
    ('root ::= "a"\nroot ::= "b"', "defined twice at line 2"),
    ('root ::= "abc', "an unterminated string literal"),
    ('root ::= "a"{5,2}', "below the minimum"),
    ('root ::= "a"{1001}', "above 1000"),
    ("root ::= [^\\x00-\\U0010FFFF]", "matches no text"),
    ("root ::= \"\\uD800\"", "is not a character"),
    ("", "needs a rule named 'root'"),
    (5, "must be a string"),
])
def test_grammars_it_cannot_follow_are_refused(grammar, message):
    with pytest.raises(LlamasError, match=re.escape(message)):
        compile_grammar(grammar)


@pytest.fixture(scope="module", params=["tiny", "bundled"])
def model(request):
    return llamas.load(TINY) if request.param == "tiny" else llamas.load()


def test_generated_text_is_a_sentence(model):
    matches = reference(LIST)
    results = submit_grid(model, "Q:", range(5), (0.0, 1.3), (2, 40), grammar=LIST)
    reasons = set()
    for r in results:
        reasons.add(r.finish_reason)
        if r.finish_reason == "stop":
            assert matches(r.text), r.text
        else:
            assert compile_grammar(LIST).match(r.text.encode())[0], r.text
    assert reasons == {"stop", "length"}
    g = dict(max_new_tokens=40, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    assert model.generate("Q:", grammar=LIST, **g) == results[1].text
    with pytest.raises(LlamasError, match="cannot be combined"):
        model.generate("Q:", grammar=LIST, regex="a")


def test_cli_grammar_flag(tmp_path):
    path = tmp_path / "list.gbnf"
    path.write_text(LIST)
    for source in (str(path), LIST):
        r = run_llamas("generate", "--model", TINY, "Q:", "--grammar", source, "--seed", "2", "--max-new-tokens", "40")
        assert r.returncode == 0, r.stderr
        assert compile_grammar(LIST).match(r.stdout[:-1].encode())[0], r.stdout
    r = run_llamas("generate", "--model", TINY, "Q:", "--grammar", 'root ::= root "a" | "b"')
    assert r.returncode != 0 and "left recursion" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_server_guided_grammar(http, path):
    base = {"prompt": "Q:"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Q"}]}
    matches = reference(LIST)
    out = http.post(path, json={**base, "guided_grammar": LIST, "max_tokens": 40, "seed": 1, "n": 3}).json()
    for c in out["choices"]:
        text = c["text"] if "text" in c else c["message"]["content"]
        assert c["finish_reason"] != "stop" or matches(text), text
    for extra, message in (({"guided_grammar": 'root ::= root "a" | "b"'}, "'guided_grammar': left recursion"),
                           ({"guided_grammar": ["root"]}, "'guided_grammar' must be a string"),
                           ({"guided_grammar": LIST, "guided_regex": "a"}, "cannot be combined")):
        r = http.post(path, json={**base, "max_tokens": 4, **extra})
        assert r.status_code == 400 and message in r.json()["error"]["message"], (extra, r.text)
