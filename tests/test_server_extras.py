"""Server extras: `best_of` on /v1/completions (best_of candidates per prompt, the n with the
highest mean log-probability per token returned, every candidate's tokens counted in usage),
vLLM's `stream_options.continuous_usage_stats` (every streamed chunk carries its choice's usage), and
vLLM's chat extras (add_generation_prompt, continue_final_message, chat_template_kwargs)."""
import json
import os

import pytest

import llamas

HERE = os.path.dirname(__file__)
TINY = os.path.join(HERE, "fixtures", "gpt2-tiny")
PROMPTS = ["When shall we three meet again", "Fair is foul"]


@pytest.fixture(scope="module")
def model():
    return llamas.load(TINY)


@pytest.fixture(scope="module")
def http(model):
    pytest.importorskip("uvicorn")
    from test_server import served_client
    with served_client(model, max_batch=16) as c:
        yield c


def candidates(model, prompt, count, seed, max_tokens):
    """Each candidate as the server samples it (choice j: seed + j), with its mean logprob."""
    engine = llamas.Engine(model)
    try:
        out = []
        for j in range(count):
            r = engine.submit(prompt, max_new_tokens=max_tokens, temperature=1.0, seed=seed + j,
                              logprobs=0).result()
            lps = [t.logprob for t in r.logprobs]
            out.append((sum(lps) / len(lps) if lps else float("-inf"), j, r))
        return out
    finally:
        engine.shutdown()


@pytest.mark.parametrize("n, best_of", [(1, 3), (2, 5), (3, 3)])
def test_best_of_returns_the_n_most_likely_candidates(http, model, n, best_of):
    body = {"prompt": PROMPTS, "n": n, "best_of": best_of, "max_tokens": 10, "temperature": 1.0, "seed": 11}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == list(range(len(PROMPTS) * n))
    total = 0
    for pi, prompt in enumerate(PROMPTS):
        cands = candidates(model, prompt, best_of, 11, 10)
        total += sum(c[2].completion_tokens for c in cands)
        # best_of = n is plain n: the choices in their own order
        ranked = sorted(cands, key=lambda c: (-c[0], c[1]))[:n] if best_of > n else cands
        got = out["choices"][pi * n:(pi + 1) * n]
        assert [c["text"] for c in got] == [c[2].text for c in ranked]
        assert [c["finish_reason"] for c in got] == [c[2].finish_reason for c in ranked]
        assert all(c["logprobs"] is None for c in got)  # not asked for
        if best_of > n:  # the ranking really chose: not simply the first n candidates
            assert len({c[2].text for c in cands}) > 1
    assert out["usage"]["completion_tokens"] == total  # every candidate's tokens


def test_best_of_with_logprobs_reports_the_chosen_candidates(http, model):
    body = {"prompt": PROMPTS[0], "best_of": 4, "max_tokens": 8, "temperature": 1.0, "seed": 3, "logprobs": 2}
    out = http.post("/v1/completions", json=body).json()
    best = max(candidates(model, PROMPTS[0], 4, 3, 8), key=lambda c: (c[0], -c[1]))
    c = out["choices"][0]
    assert c["text"] == best[2].text
    assert c["logprobs"]["token_logprobs"] == pytest.approx([t.logprob for t in best[2].logprobs], abs=1e-6)
    lp = c["logprobs"]
    # the top 2 and the sampled token (OpenAI's "logprobs + 1"), which is there with its own logprob
    assert all(len(top) in (2, 3) for top in lp["top_logprobs"])
    assert all(top[tok] == v for tok, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]))


def token_text(tokens) -> str:
    """The text logprobs' tokens spell: a token holding part of a character is "bytes:\\xNN..." (OpenAI's)."""
    raw = b"".join(bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode() for t in tokens)
    return raw.decode("utf-8", "replace")


def test_best_of_with_echo_starts_each_choice_with_its_prompt(http):
    # Two prompts, best_of 3 candidates each, n 2 returned: choice i echoes prompt i // n.
    body = {"prompt": PROMPTS, "n": 2, "best_of": 3, "echo": True, "max_tokens": 4, "temperature": 1.0, "seed": 5}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in r.json()["choices"]]
    assert len(texts) == 4 and all(t.startswith(PROMPTS[i // 2]) for i, t in enumerate(texts)), texts
    r = http.post("/v1/completions", json={**body, "logprobs": 1})
    assert r.status_code == 200, r.text
    for i, c in enumerate(r.json()["choices"]):
        assert c["text"].startswith(PROMPTS[i // 2])
        assert token_text(c["logprobs"]["tokens"]) == c["text"] and c["logprobs"]["token_logprobs"][0] is None


@pytest.mark.parametrize("extra, message", [
    ({"n": 3, "best_of": 2}, "'best_of' (2) must be at least 'n' (3)"),
    ({"best_of": 2, "stream": True}, "cannot be streamed"),
    ({"best_of": 0}, "'best_of' must be at least 1"),
    ({"best_of": 1000}, "'best_of' must be at most"),
    ({"best_of": "2"}, "'best_of' must be an integer"),
])
def test_bad_best_of_is_refused(http, extra, message):
    r = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"] and r.json()["error"]["param"] == "best_of"
    # best_of equal to n streams as usual
    r = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4, "best_of": 1, "stream": True})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")


def _events(http, path, body):
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("extra", [{}, {"n": 2}, {"logprobs": 1}, {"echo": True}])
def test_continuous_usage_counts_each_choice_as_it_streams(http, model, path, extra):
    if path.endswith("chat/completions"):
        if "echo" in extra:
            return
        base = {"messages": [{"role": "user", "content": PROMPTS[0]}]}
        extra = {"logprobs": True, "top_logprobs": 1} if "logprobs" in extra else extra
    else:
        base = {"prompt": PROMPTS[0]}
    body = {**base, **extra, "max_tokens": 9, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = _events(http, path, body)
    *chunks, last = events
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 9 * body.get("n", 1)
    prompt_tokens = last["usage"]["prompt_tokens"]  # one prompt, counted once for all its choices
    seen = {}
    for e in chunks:
        (choice,) = e["choices"]
        u = e["usage"]
        assert u["prompt_tokens"] == prompt_tokens and u["total_tokens"] == prompt_tokens + u["completion_tokens"]
        if choice["index"] not in seen and u["completion_tokens"] == 0:
            seen[choice["index"]] = 0  # the chat role chunk, or the echoed prompt
            continue
        assert u["completion_tokens"] > seen.get(choice["index"], 0)  # each chunk brings tokens
        seen[choice["index"]] = u["completion_tokens"]
    assert seen == {i: 9 for i in range(body.get("n", 1))}
    # the text is the same as without the stats, and without include_usage there are none
    plain = _events(http, path, {**body, "stream_options": {"include_usage": True}})
    text = lambda evs: "".join(c.get("text") or c.get("delta", {}).get("content") or ""  # noqa: E731
                               for e in evs for c in e["choices"])
    assert text(plain) == text(events)
    assert all(e["usage"] is None for e in plain[:-1])
    none = _events(http, path, {**body, "stream_options": {"continuous_usage_stats": True}})
    assert all("usage" not in e for e in none) and text(none) == text(events)


# ---- llamas serve --chat-template ---------------------------------------------------------------
TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}"


def test_cli_chat_template_reads_a_file_or_the_template_itself(tmp_path):
    from llamas._C import LlamasError
    from llamas.cli_serve import _chat_template
    f = tmp_path / "chat.jinja"
    f.write_text(TEMPLATE)
    assert _chat_template(str(f)) == TEMPLATE
    assert _chat_template(TEMPLATE) == TEMPLATE
    assert _chat_template(None) is None
    with pytest.raises(LlamasError, match="neither a file nor a jinja2 template"):
        _chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(LlamasError, match="not a valid jinja2 template"):
        _chat_template("{% for m in messages %}")
    (tmp_path / "bad.jinja").write_bytes(b"\xff{{ x }}")
    with pytest.raises(LlamasError, match="cannot read --chat-template"):
        _chat_template(str(tmp_path / "bad.jinja"))


def test_serve_with_chat_template(tmp_path):
    import subprocess
    import sys

    import httpx
    from test_server import free_port, wait_healthy
    f = tmp_path / "chat.jinja"
    f.write_text(TEMPLATE)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llamas", "serve", "--model", TINY, "--port", str(port),
                             "--chat-template", str(f)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        r = httpx.post(url + "/tokenize", json={"messages": messages})
        assert r.status_code == 200
        rendered = "<system>Be brief.\n<user>Hi\n<bot>"
        assert r.json()["tokens"] == llamas.load(TINY).tokenizer.encode(rendered)
        assert httpx.get(url + "/tokenizer_info").json()["chat_template"] == TEMPLATE
    finally:
        proc.terminate()
        proc.wait(30)
    # a broken template stops `llamas serve` before it loads anything
    r = subprocess.run([sys.executable, "-m", "llamas", "serve", "--model", TINY, "--port", str(free_port()),
                        "--chat-template", "{% if %}"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "not a valid jinja2 template" in r.stderr and "Traceback" not in r.stderr


# ---- vLLM's chat extras: add_generation_prompt, continue_final_message, chat_template_kwargs -------
THINKING = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% if enable_thinking %}<think>{% endif %}{% endif %}")
CHAT = [{"role": "user", "content": "Tell me of kings"}, {"role": "assistant", "content": "Once there was "}]


@pytest.fixture(scope="module")
def templated(model):
    pytest.importorskip("uvicorn")
    from test_server import served_client
    with served_client(model, max_batch=4, chat_template=THINKING) as c:
        yield c


def tokens_of(http, **body):
    r = http.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_chat_render_options_shape_the_prompt(templated, model):
    enc = model.tokenizer.encode
    user = CHAT[:1]
    assert tokens_of(templated, messages=user) == enc("<user>Tell me of kings</user>\n<assistant>")
    assert tokens_of(templated, messages=user, add_generation_prompt=False) == enc("<user>Tell me of kings</user>\n")
    assert tokens_of(templated, messages=user, chat_template_kwargs={"enable_thinking": True}) == \
        enc("<user>Tell me of kings</user>\n<assistant><think>")
    # continue_final_message ends inside the assistant's message: its closing tag is cut (and the
    # message's trailing space, as transformers' apply_chat_template does)
    assert tokens_of(templated, messages=CHAT, continue_final_message=True) == \
        enc("<user>Tell me of kings</user>\n<assistant>Once there was")
    # the completion continues exactly that prompt
    body = {"messages": CHAT, "continue_final_message": True, "max_tokens": 6, "temperature": 0}
    r = templated.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    prompt = enc("<user>Tell me of kings</user>\n<assistant>Once there was")
    assert r.json()["usage"]["prompt_tokens"] == len(prompt)
    assert r.json()["choices"][0]["message"]["content"] == model.tokenizer.decode(model.generate(prompt, max_new_tokens=6))


def test_plain_template_continues_the_final_message(http, model):
    r = http.post("/tokenize", json={"messages": CHAT, "continue_final_message": True})
    assert r.json()["tokens"] == model.tokenizer.encode("user: Tell me of kings\nassistant: Once there was ")
    r = http.post("/tokenize", json={"messages": CHAT[:1], "add_generation_prompt": False})
    assert r.json()["tokens"] == model.tokenizer.encode("user: Tell me of kings\n")


@pytest.mark.parametrize("extra, message", [
    ({"continue_final_message": True, "add_generation_prompt": True}, "cannot both be true"),
    ({"continue_final_message": True, "messages": CHAT[:1]}, "last message to be the assistant's"),
    ({"continue_final_message": True, "messages": [CHAT[0], {"role": "assistant", "content": "  "}]},
     "with text to continue"),
    ({"continue_final_message": "yes"}, "must be a boolean"),
    ({"chat_template_kwargs": ["enable_thinking"]}, "must be an object"),
    ({"chat_template_kwargs": {"messages": []}}, "cannot set 'messages': the server sets it"),
    ({"chat_template_kwargs": {"bad name": 1}}, "not a template variable name"),
])
def test_bad_chat_render_options_are_refused(templated, extra, message):
    body = {"messages": CHAT, "max_tokens": 2, **extra}
    for path in ("/v1/chat/completions", "/tokenize"):
        b = dict(body) if path != "/tokenize" else {k: v for k, v in body.items() if k != "max_tokens"}
        r = templated.post(path, json=b)
        assert r.status_code == 400 and message in r.json()["error"]["message"], (path, r.text)
    assert templated.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2}).status_code == 200


def test_continue_final_message_refuses_a_template_that_rewrites_the_message(model):
    pytest.importorskip("uvicorn")
    from test_server import served_client
    shouting = "{% for m in messages %}{{ m.content | upper }}\n{% endfor %}"
    with served_client(model, chat_template=shouting) as c:
        r = c.post("/v1/chat/completions", json={"messages": CHAT, "continue_final_message": True})
        assert r.status_code == 400 and "does not write the last message's text" in r.json()["error"]["message"]


# ---- X-Request-Id and /version -------------------------------------------------------------------
def test_client_request_id_names_the_response(http):
    body = {"prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0}
    r = http.post("/v1/completions", json=body, headers={"X-Request-Id": "trace-42"})
    assert r.status_code == 200 and r.json()["id"] == "cmpl-trace-42" and r.headers["x-request-id"] == "trace-42"
    with http.stream("POST", "/v1/chat/completions", headers={"X-Request-Id": "trace-43"},
                     json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}) as s:
        assert s.headers["x-request-id"] == "trace-43"
        ids = {json.loads(line[6:])["id"] for line in s.iter_lines() if line.startswith("data: {")}
    assert ids == {"chatcmpl-trace-43"}
    # without one the server makes an id, and still says it in the header
    r = http.post("/v1/completions", json=body)
    assert r.json()["id"] == "cmpl-" + r.headers["x-request-id"]
    # other endpoints echo a client's id
    assert http.get("/v1/models", headers={"X-Request-Id": "m-1"}).headers["x-request-id"] == "m-1"


@pytest.mark.parametrize("value", ["x" * 129, "has space", "tab\tin"])
def test_bad_request_id_is_refused(http, value):
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"X-Request-Id": value})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Id"
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_version_is_open(model):
    pytest.importorskip("uvicorn")
    from test_server import served_client
    with served_client(model, api_key="secret") as c:
        assert c.get("/version").json() == {"version": llamas.__version__}
        assert c.get("/v1/models").status_code == 401


# ---- vLLM's truncate_prompt_tokens ------------------------------------------------------------------
def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(http, model):
    ids = model.tokenizer.encode(" ".join(PROMPTS * 4))
    body = {"prompt": ids, "max_tokens": 5, "temperature": 0, "truncate_prompt_tokens": 7}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 7
    assert r.json()["choices"][0]["text"] == model.tokenizer.decode(model.generate(ids[-7:], max_new_tokens=5))
    # a prompt past the context fits once truncated; chat too
    ctx = model.config.n_positions
    long = (ids * (ctx // len(ids) + 2))[:ctx + 10]
    assert http.post("/v1/completions", json={"prompt": long, "max_tokens": 2}).status_code == 400
    r = http.post("/v1/completions", json={"prompt": long, "max_tokens": 2, "truncate_prompt_tokens": ctx - 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == ctx - 2
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                                                 "truncate_prompt_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize("value, message", [(0, "at least 1"), (-2, "at least -1"), ("5", "must be an integer")])
def test_bad_truncate_prompt_tokens_is_refused(http, value, message):
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "truncate_prompt_tokens": value})
    assert r.status_code == 400 and message in r.json()["error"]["message"]


EOT = "<|endoftext|>"


def test_logprobs_of_tokens_that_split_a_character(http, model):
    # "é" is two byte-level tokens here: each reports its own byte (chat `bytes`), a "bytes:" token
    # string, and the completions' text_offset counts characters of the text, not tokens.
    text = "café!"
    ids = model.tokenizer.encode(text)
    pieces = model.tokenizer.piece_bytes()
    assert any(p.decode("utf-8", "replace") != p.decode("utf-8", "ignore") for p in (pieces[i] for i in ids))
    chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 16,
                                                     "logprobs": True, "top_logprobs": 2, "guided_choice": [text],
                                                     "temperature": 0}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    if content[-1]["token"] == EOT:  # the end-of-text that ended it: sampled and counted, not in the text
        content = content[:-1]
    assert bytes(b for e in content for b in e["bytes"]).decode() == text == chat["choices"][0]["message"]["content"]
    assert any(e["token"].startswith("bytes:") for e in content)
    for stream in (False, True):
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 16, "logprobs": 1, "guided_choice": [text],
                                               "temperature": 0, "stream": stream})
        if stream:
            events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            lp = {k: sum((e["choices"][0]["logprobs"][k] for e in events if e["choices"][0]["logprobs"]), [])
                  for k in ("tokens", "text_offset", "top_logprobs", "token_logprobs")}
            got = "".join(e["choices"][0]["text"] for e in events)
        else:
            lp, got = r.json()["choices"][0]["logprobs"], r.json()["choices"][0]["text"]
        assert got == text and lp["tokens"][-1] == EOT and token_text(lp["tokens"][:-1]) == text
        raw = b""
        for tok, offset in zip(lp["tokens"], lp["text_offset"]):  # where each token's character starts
            assert offset == len(raw.decode("utf-8", "ignore")) and offset <= len(text)
            raw += bytes.fromhex(tok[6:].replace("\\x", "")) if tok.startswith("bytes:") else tok.encode()
        assert all(top[tok] == v for tok, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]))
