"""vLLM's stop controls: stop_token_ids, min_tokens, ignore_eos and include_stop_str_in_output (and
skip_special_tokens, how an end-of-text drawn with ignore_eos reads), in the sampler, the text
stream, Model.generate / Engine.submit, the CLI and both server endpoints."""
import json
import os
import subprocess
import sys

import pytest

import llamas
from llamas._C import LlamasError
from llamas.streaming import TextStream

HERE = os.path.dirname(__file__)
TINY = os.path.join(HERE, "fixtures", "gpt2-tiny")
PROMPT = "When shall we three meet again"


@pytest.fixture(scope="module")
def model():
    return llamas.load(TINY)


@pytest.fixture(scope="module")
def engine(model):
    e = llamas.Engine(model)
    yield e
    e.shutdown()


def greedy_ids(model, n=24):
    return model.generate(model.tokenizer.encode(PROMPT), max_new_tokens=n, temperature=0.0)


# ---- sampler and scheduler ------------------------------------------------------------------------
def test_a_forced_stop_token_waits_for_min_tokens(engine, model):
    eos = model.tokenizer.eos_token_id
    forced = {eos: 100.0}  # without min_tokens the first draw is end-of-text
    r = engine.submit(PROMPT, max_new_tokens=8, temperature=0.0, logit_bias=forced).result()
    assert (r.token_ids, r.finish_reason, r.completion_tokens) == ([], "stop", 1)
    for n in (1, 4, 8):
        r = engine.submit(PROMPT, max_new_tokens=8, temperature=0.0, logit_bias=forced, min_tokens=n).result()
        assert eos not in r.token_ids and len(r.token_ids) == n
        # n tokens, then the end-of-text token ends it (unless the budget ran out first)
        assert (r.finish_reason, r.completion_tokens) == (("stop", n + 1) if n < 8 else ("length", 8))
    # sampling, too: the held-back token has probability 0, whatever the seed
    for seed in range(5):
        r = engine.submit(PROMPT, max_new_tokens=8, temperature=1.5, logit_bias=forced, min_tokens=3,
                          seed=seed).result()
        assert eos not in r.token_ids[:3] and len(r.token_ids) == 3 and r.finish_reason == "stop"


def test_stop_token_ids_end_a_sequence_like_end_of_text(model):
    ids = greedy_ids(model)
    t = ids[5]
    first = ids.index(t)
    assert model.generate(model.tokenizer.encode(PROMPT), max_new_tokens=24, temperature=0.0,
                          stop_token_ids=[t]) == ids[:first]
    # several ids: the earliest one met
    u = ids[2]
    assert model.generate(model.tokenizer.encode(PROMPT), max_new_tokens=24, temperature=0.0,
                          stop_token_ids=[t, u]) == ids[:min(first, ids.index(u))]


def test_min_tokens_changes_nothing_when_no_stop_comes_early(model):
    ids = greedy_ids(model)
    enc = model.tokenizer.encode(PROMPT)
    assert model.generate(enc, max_new_tokens=24, temperature=0.0, min_tokens=24) == ids
    assert model.generate(PROMPT, max_new_tokens=24, temperature=0.0, min_tokens=10) == \
        model.generate(PROMPT, max_new_tokens=24, temperature=0.0)


def test_ignore_eos_generates_the_whole_budget(engine, model):
    eos = model.tokenizer.eos_token_id
    r = engine.submit(PROMPT, max_new_tokens=6, temperature=0.0, logit_bias={eos: 100.0}, ignore_eos=True).result()
    assert (r.token_ids, r.finish_reason) == ([eos] * 6, "length")
    assert r.text == model.tokenizer.decode([eos] * 6)  # end-of-text is then an ordinary token
    # a stop token id still stops it, and min_tokens holds that one back instead
    r = engine.submit(PROMPT, max_new_tokens=6, temperature=0.0, logit_bias={eos: 100.0}, ignore_eos=True,
                      stop_token_ids=[eos], min_tokens=2).result()
    assert (len(r.token_ids), r.finish_reason, r.completion_tokens) == (2, "stop", 3)
    assert eos not in r.token_ids


def test_skip_special_tokens_leaves_end_of_text_out_of_the_text(engine, model):
    eos = model.tokenizer.eos_token_id
    assert eos in model.tokenizer.special_ids()
    forced = dict(max_new_tokens=6, temperature=0.0, logit_bias={eos: 100.0}, ignore_eos=True)
    kept = engine.submit(PROMPT, **forced).result()
    skipped = engine.submit(PROMPT, **forced, skip_special_tokens=True).result()
    assert skipped.token_ids == kept.token_ids == [eos] * 6 and skipped.completion_tokens == 6
    assert (kept.text, skipped.text) == (model.tokenizer.decode([eos] * 6), "")
    # ordinary tokens read the same either way, streamed or not
    plain = model.generate(PROMPT, max_new_tokens=12, temperature=0.0)
    assert model.generate(PROMPT, max_new_tokens=12, temperature=0.0, skip_special_tokens=True) == plain
    assert "".join(model.generate(PROMPT, max_new_tokens=12, temperature=0.0, stream=True,
                                  skip_special_tokens=True)) == plain
    with pytest.raises(LlamasError, match="skip_special_tokens must be True or False"):
        model.generate(PROMPT, max_new_tokens=4, skip_special_tokens="no")


def test_text_stream_skips_special_tokens_with_and_without_the_bytes_table(model):
    from llamas.tokenizer import Tokenizer
    eos = model.tokenizer.eos_token_id
    ids = model.tokenizer.encode(" a tale of kings") + [eos] + model.tokenizer.encode(" and more") + [eos]
    expected = model.tokenizer.decode(ids, skip_special_tokens=True)
    assert "<|endoftext|>" not in expected and " and more" in expected
    plain = Tokenizer.from_folder(TINY)
    tabled = Tokenizer.from_folder(TINY)
    tabled.piece_bytes()
    for tok in (plain, tabled):
        stream = TextStream(tok, skip_special=True)
        assert (stream._pieces is not None) == (tok is tabled)
        assert "".join(stream.push(i) for i in ids) + stream.finish() == expected


def test_stop_strings_wait_for_min_tokens_and_can_be_kept(model):
    ids = greedy_ids(model)
    text = model.tokenizer.decode(ids)
    assert model.generate(PROMPT, max_new_tokens=24, temperature=0.0) == text

    def expected(stop, min_tokens, include):
        # a match is a stop once it ends past the text of the first min_tokens - 1 tokens
        unchecked = len(model.tokenizer.decode(ids[:min_tokens - 1])) if min_tokens > 1 else 0
        i = text.find(stop)
        while i != -1 and i + len(stop) <= unchecked:
            i = text.find(stop, i + 1)
        return text if i == -1 else text[:i + (len(stop) if include else 0)]

    seen = set()
    for stop in ("hat", ".]", text[:3]):
        for min_tokens in (0, 2, 3, 5, 11, 24):
            for include in (False, True):
                g = dict(max_new_tokens=24, temperature=0.0, stop=stop, min_tokens=min_tokens,
                         include_stop_str_in_output=include)
                want = expected(stop, min_tokens, include)
                assert model.generate(PROMPT, **g) == want, (stop, min_tokens, include)
                assert "".join(model.generate(PROMPT, stream=True, **g)) == want
                seen.add(want)
    assert len(seen) >= 6  # the cases above really cut in different places


class _CharTokenizer:
    """Token i is the character chr(i): decode joins them."""
    decodes_by_concatenation = True

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_text_stream_ignores_stops_wholly_before_the_check_and_keeps_them_on_request():
    def run(text, stop, unchecked, include=False):
        s = TextStream(_CharTokenizer(), [stop], include)
        out = ""
        for i, ch in enumerate(text):
            out += s.push(ord(ch), check_stop=i >= unchecked)
            if s.stopped:
                return out, True
        return out + s.finish(), False

    assert run("ab\ncd\nef", "\n", 0) == ("ab", True)
    assert run("ab\ncd\nef", "\n", 0, include=True) == ("ab\n", True)
    assert run("ab\ncd\nef", "\n", 4) == ("ab\ncd", True)          # the first \n came before the check
    assert run("ab\ncd\nef", "\n", 7) == ("ab\ncd\nef", False)
    assert run("xENDyEND", "END", 2) == ("x", True)                # straddles the first checked token
    assert run("xENDyEND", "END", 4) == ("xENDy", True)
    assert run("xENDyEND", "END", 4, include=True) == ("xENDyEND", True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_tokens=-1), "min_tokens must be an integer >= 0"),
    (dict(min_tokens=2.5), "min_tokens must be an integer"),
    (dict(min_tokens=9), "must not exceed max_new_tokens (8)"),
    (dict(stop_token_ids=[512]), "outside the vocabulary [0, 512)"),
    (dict(stop_token_ids=5), "stop_token_ids must be a list"),
    (dict(stop_token_ids=[True]), "stop_token_ids must be a list"),
    (dict(ignore_eos="yes"), "ignore_eos must be True or False"),
    (dict(include_stop_str_in_output=1), "include_stop_str_in_output must be True or False"),
    (dict(skip_special_tokens=1), "skip_special_tokens must be True or False"),
])
def test_bad_stop_controls_are_refused(model, engine, kwargs, message):
    with pytest.raises(LlamasError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        model.generate(PROMPT, max_new_tokens=8, **kwargs)
    with pytest.raises(LlamasError):
        engine.submit(PROMPT, max_new_tokens=8, **kwargs)


def test_cli_flags(model):
    ids = greedy_ids(model, 12)
    t = ids[3]
    run = lambda *a: subprocess.run([sys.executable, "-m", "llamas", "generate", "--model", TINY, PROMPT,  # noqa: E731
                                     "--temperature", "0", "--max-new-tokens", "12", *a],
                                    capture_output=True, text=True, timeout=120)
    r = run("--stop-token-id", str(t))
    assert r.returncode == 0, r.stderr
    assert r.stdout == model.tokenizer.decode(ids[:ids.index(t)]) + "\n"
    r = run("--stop-token-id", str(t), "--min-tokens", "12", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert r.stdout == model.generate(PROMPT, max_new_tokens=12, temperature=0.0, stop_token_ids=[t],
                                      min_tokens=12) + "\n"
    eos = model.tokenizer.eos_token_id
    r = run("--stop-token-id", str(t), "--min-tokens", "12", "--ignore-eos", "--skip-special-tokens")
    assert r.returncode == 0 and r.stdout == model.generate(
        PROMPT, max_new_tokens=12, temperature=0.0, stop_token_ids=[t], min_tokens=12, skip_special_tokens=True) + "\n"
    assert model.tokenizer.decode([eos]) not in r.stdout
    for bad in (["--min-tokens", "-1"], ["--min-tokens", "13"], ["--stop-token-id", "512"], ["--stop-token-id", "x"]):
        r = run(*bad)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (bad, r.stderr)
        assert "min-tokens" in r.stderr or "min_tokens" in r.stderr or "token" in r.stderr


# ---- server -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def http(model):
    pytest.importorskip("uvicorn")
    from test_server import served_client
    with served_client(model, max_batch=16) as c:
        yield c


def _stream_text(http, path, body):
    pieces, reasons = [], []
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:])["choices"]:
                pieces.append(c["delta"].get("content", "") if "delta" in c else c["text"])
                if c.get("finish_reason"):
                    reasons.append(c["finish_reason"])
    return "".join(pieces), reasons


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_server_stop_controls_match_generate_and_stream(http, model, path):
    eos = model.tokenizer.eos_token_id
    base = ({"prompt": PROMPT} if path == "/v1/completions" else
            {"messages": [{"role": "user", "content": PROMPT}]})
    cases = [
        dict(max_tokens=6, logit_bias={str(eos): 100}, ignore_eos=True),
        dict(max_tokens=6, logit_bias={str(eos): 100}, min_tokens=3),
        dict(max_tokens=12, stop_token_ids=[7, 9, 11], min_tokens=2),
        dict(max_tokens=12, stop=["a", "e"], include_stop_str_in_output=True),
        dict(max_tokens=12, stop=["a", "e"], min_tokens=5),
    ]
    for case in cases:
        body = {**base, **case, "temperature": 0}
        r = http.post(path, json=body)
        assert r.status_code == 200, (case, r.text)
        out = r.json()
        choice = out["choices"][0]
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        assert _stream_text(http, path, body) == (text, [choice["finish_reason"]]), case
        if case.get("ignore_eos"):
            assert (out["usage"]["completion_tokens"], choice["finish_reason"]) == (6, "length")
            # six end-of-text tokens: no text by default (vLLM's skip_special_tokens), their text on request
            assert text == ""
            kept = http.post(path, json={**body, "skip_special_tokens": False}).json()["choices"][0]
            kept_text = kept["text"] if "text" in kept else kept["message"]["content"]
            assert kept_text == model.tokenizer.decode([eos] * 6)
            assert _stream_text(http, path, {**body, "skip_special_tokens": False}) == (kept_text, ["length"])
        if case.get("min_tokens") == 3:
            assert (out["usage"]["completion_tokens"], choice["finish_reason"]) == (4, "stop")
        if path == "/v1/completions":
            kwargs = {k: v for k, v in case.items() if k not in ("max_tokens", "logit_bias", "stop")}
            if "logit_bias" not in case:
                assert text == model.generate(PROMPT, max_new_tokens=case["max_tokens"], temperature=0.0,
                                              stop=case.get("stop"), **kwargs)


@pytest.mark.parametrize("field, value, message", [
    ("min_tokens", -1, "'min_tokens' must be at least 0"),
    ("min_tokens", "2", "'min_tokens' must be an integer"),
    ("min_tokens", 9, "'min_tokens' (9) must not exceed"),
    ("stop_token_ids", [512], "outside the vocabulary"),
    ("stop_token_ids", 3, "'stop_token_ids' must be an array"),
    ("stop_token_ids", list(range(65)), "at most 64"),
    ("ignore_eos", "true", "'ignore_eos' must be a boolean"),
    ("include_stop_str_in_output", 1, "'include_stop_str_in_output' must be a boolean"),
    ("skip_special_tokens", "no", "'skip_special_tokens' must be a boolean"),
])
def test_server_refuses_bad_stop_controls(http, field, value, message):
    for path, base in (("/v1/completions", {"prompt": PROMPT}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        r = http.post(path, json={**base, "max_tokens": 8, field: value})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert message in err["message"] and err["param"] == field, err
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
