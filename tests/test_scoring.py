"""Prompt scoring: a prompt's own tokens' log-probabilities (`Model.score`, `Engine.submit(...,
prompt_logprobs=n)`, the native step's targets) and the server's `echo` on completions, which
lm-evaluation-harness's `local-completions` model uses for log-likelihood tasks."""
import gc
import json
import os

import httpx
import numpy as np
import pytest

import llamas
from llamas._C import LlamasError

HERE = os.path.dirname(__file__)
TINY = os.path.join(HERE, "fixtures", "gpt2-tiny")
PROMPT = "When shall we three meet again"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def model():
    return llamas.load(TINY)


@pytest.fixture(scope="module")
def expected():
    return np.load(os.path.join(TINY, "expected.npz"))


def reference_scores(model, ids):
    ls = log_softmax(model.forward(np.array([ids]))[0])
    return [ls[i, ids[i + 1]] for i in range(len(ids) - 1)], ls


# ---- the engine --------------------------------------------------------------------------------
def test_scores_match_transformers_logits(model, expected):
    # The fixture's logits were made by transformers' GPT2LMHeadModel on these ids.
    for ids, logits in zip(expected["input_ids"].tolist(), expected["logits"]):
        ls = log_softmax(logits)
        scores = model.score(ids, top_logprobs=3)
        assert len(scores) == len(ids) and scores[0] is None
        for i, s in enumerate(scores[1:]):
            assert s.token_id == ids[i + 1]
            assert abs(s.logprob - ls[i, ids[i + 1]]) <= 1e-4
            want = np.argsort(-ls[i], kind="stable")[:3]
            assert [t for t, _ in s.top] == want.tolist()
            assert all(abs(v - ls[i, t]) <= 1e-4 for t, v in s.top)


@pytest.mark.parametrize("chunk", [1, 3, 7, 128])
def test_scores_do_not_depend_on_the_prefill_chunk_or_the_batch(model, chunk):
    ids = model.tokenizer.encode(PROMPT + ", in thunder, lightning, or in rain?")
    alone = model.score(ids, top_logprobs=2)
    with llamas.Engine(model, prefill_chunk=chunk) as engine:
        others = [engine.submit(p, max_new_tokens=5) for p in ("Alas", "Now is the winter")]
        h = engine.submit(ids, max_new_tokens=4, prompt_logprobs=2)
        r = h.result(timeout=60)
        for o in others:
            o.result(timeout=60)
    # Every GEMM row is one FMA chain in a fixed order: the same bits in any chunk or batch.
    assert r.prompt_logprobs == alone
    assert r.completion_tokens == 4


def test_scoring_leaves_the_generated_tokens_alone(model):
    with llamas.Engine(model) as engine:
        plain = engine.submit(PROMPT, max_new_tokens=12, logprobs=2).result(timeout=60)
        scored = engine.submit(PROMPT, max_new_tokens=12, logprobs=2, prompt_logprobs=2).result(timeout=60)
    assert scored.token_ids == plain.token_ids and scored.text == plain.text
    assert scored.logprobs == plain.logprobs
    assert plain.prompt_logprobs is None and len(scored.prompt_logprobs) == len(model.tokenizer.encode(PROMPT))


def test_max_new_tokens_zero_only_scores(model):
    gc.collect()
    base = llamas.memory_stats()["kv_cache_blocks_in_use"]
    with llamas.Engine(model) as engine:
        r = engine.submit(PROMPT, max_new_tokens=0, prompt_logprobs=0).result(timeout=60)
        assert (r.text, r.token_ids, r.finish_reason, r.completion_tokens) == ("", [], "length", 0)
        assert r.prompt_logprobs == model.score(PROMPT)
        with pytest.raises(LlamasError, match="max_new_tokens must be a positive integer"):
            engine.submit(PROMPT, max_new_tokens=0)
    gc.collect()
    assert llamas.memory_stats()["kv_cache_blocks_in_use"] == base  # the scored sequence was released


def test_a_whole_context_prompt_can_be_scored(model):
    ctx = model.config.n_positions
    ids = [(7 * i) % model.config.vocab_size for i in range(ctx)]
    scores = model.score(ids)
    ref, _ = reference_scores(model, ids)
    assert len(scores) == ctx
    assert max(abs(s.logprob - r) for s, r in zip(scores[1:], ref)) <= 1e-4
    with pytest.raises(LlamasError, match="context"):
        model.score(ids + [1])


def test_score_batch_equals_each_prompt_alone(model):
    prompts = [PROMPT, "Alas, poor Yorick!", [5, 6, 7]]
    batch = model.score(prompts, top_logprobs=1)
    assert batch == [model.score(p, top_logprobs=1) for p in prompts]
    assert model.score([4]) == [None]


@pytest.mark.parametrize("bad, match", [(-1, "in \\[0, 20\\]"), (21, "in \\[0, 20\\]"), (True, "in \\[0, 20\\]"),
                                        (None, "got None"), (1.5, "in \\[0, 20\\]")])
def test_score_rejects_bad_top_logprobs(model, bad, match):
    with pytest.raises(LlamasError, match=match):
        model.score(PROMPT, top_logprobs=bad)


def test_score_rejects_bad_prompts(model):
    with pytest.raises(LlamasError, match=r"\[score\] empty prompt"):
        model.score("")
    with pytest.raises(LlamasError, match=r"\[score\] empty prompt"):
        model.score([])
    with pytest.raises(LlamasError, match=r"\[score\] token id 512 is out of range"):
        model.score([1, model.config.vocab_size])
    with pytest.raises(LlamasError, match=r"\[score\] a prompt is a str or a list of int token ids"):
        model.score([PROMPT, None])


def test_native_step_rejects_bad_targets(model):
    cfg = model.config.to_native()
    seq = llamas._C.Sequence(cfg)
    with pytest.raises(LlamasError, match="2 targets for 3 tokens"):
        model._native.step([(seq, [1, 2, 3], False, [2, 3], 0)])
    with pytest.raises(LlamasError, match="outside the vocabulary"):
        model._native.step([(seq, [1, 2], False, [2, model.config.vocab_size], 0)])
    with pytest.raises(LlamasError, match="score_top"):
        model._native.step([(seq, [1, 2], False, [2, -1], 21)])
    assert seq.length == 0  # a refused step feeds nothing
    model._native.step([(seq, [1, 2], False, [2, -1], 0)])
    assert seq.length == 2 and [t for t, _, _ in seq.scores] == [2]


# ---- the server ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def srv(model):
    from test_server import ThreadServer
    from llamas.server import create_app
    with ThreadServer(create_app(model, max_batch=16)) as s:
        yield s


def post(srv, body):
    return httpx.post(srv.url + "/v1/completions", json=body, timeout=60)


def test_echo_with_logprobs_returns_the_prompt_and_its_scores(srv, model):
    r = post(srv, {"prompt": PROMPT, "max_tokens": 5, "logprobs": 2, "echo": True, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    plain = post(srv, {"prompt": PROMPT, "max_tokens": 5, "logprobs": 2, "temperature": 0}).json()["choices"][0]
    assert choice["text"] == PROMPT + plain["text"]
    lp = choice["logprobs"]
    ids = model.tokenizer.encode(PROMPT)
    n = len(ids)
    assert lp["tokens"][:n] == [model.tokenizer.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = model.score(PROMPT, top_logprobs=2)
    assert lp["token_logprobs"][1:n] == pytest.approx([s.logprob for s in ref[1:]], abs=1e-6)
    assert lp["tokens"][n:] == plain["logprobs"]["tokens"]
    assert lp["token_logprobs"][n:] == plain["logprobs"]["token_logprobs"]
    # Offsets index the echoed text: the completion's start after the prompt's characters.
    assert lp["text_offset"][0] == 0 and lp["text_offset"][n] == len(PROMPT)
    assert r.json()["usage"]["prompt_tokens"] == n and r.json()["usage"]["completion_tokens"] == 5


def test_lm_eval_harness_loglikelihood_request(srv, model):
    # lm-evaluation-harness local-completions: token-id prompts in a batch, max_tokens 1, logprobs
    # 1, echo; it sums token_logprobs[ctxlen:-1] and checks each against max(top_logprobs).
    context = model.tokenizer.encode("When shall we three")
    conts = [model.tokenizer.encode(" meet again"), model.tokenizer.encode(" dance")]
    body = {"model": srv.state.model_name, "prompt": [context + c for c in conts], "temperature": 0,
            "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    r = post(srv, body)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == 2
    for choice, cont in zip(choices, conts):
        ids = context + cont
        got = choice["logprobs"]["token_logprobs"][len(context):-1]
        ref, ls = reference_scores(model, ids)
        assert got == pytest.approx(ref[len(context) - 1:], abs=1e-4)
        tops = choice["logprobs"]["top_logprobs"][len(context):-1]
        for i, top in enumerate(tops):
            assert max(top.values()) == pytest.approx(ls[len(context) - 1 + i].max(), abs=1e-4)
        assert len(choice["logprobs"]["tokens"]) == len(ids) + 1


def test_max_tokens_zero_scores_the_prompt_only(srv, model):
    ids = model.tokenizer.encode(PROMPT)
    r = post(srv, {"prompt": ids, "max_tokens": 0, "logprobs": 0, "echo": True})
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["text"] == model.tokenizer.decode(ids) and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == len(ids)
    lp = choice["logprobs"]  # logprobs 0: each token's own logprob only (OpenAI's "up to logprobs + 1")
    assert all(top == {tok: v} for tok, v, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:],
                                                        lp["top_logprobs"][1:]))
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


@pytest.mark.parametrize("body, fragment", [
    ({"max_tokens": 0}, "0 is allowed only with 'echo'"),
    ({"max_tokens": 0, "echo": True}, "0 is allowed only with 'echo'"),
    ({"max_tokens": 0, "logprobs": 1}, "0 is allowed only with 'echo'"),
    ({"max_tokens": -1, "echo": True, "logprobs": 1}, "at least 0"),
    ({"echo": "yes"}, "echo"),
])
def test_bad_echo_requests_are_400(srv, body, fragment):
    r = post(srv, {"prompt": PROMPT, **body})
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"]
    assert post(srv, {"prompt": PROMPT, "max_tokens": 2}).status_code == 200


def stream_events(srv, body):
    events = []
    with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


@pytest.mark.parametrize("logprobs", [None, 3])
@pytest.mark.parametrize("n", [1, 2])
def test_streamed_echo_equals_the_whole_response(srv, logprobs, n):
    body = {"prompt": [PROMPT, "Alas"], "max_tokens": 6, "echo": True, "temperature": 0, "n": n}
    if logprobs is not None:
        body["logprobs"] = logprobs
    whole = post(srv, body).json()["choices"]
    events = stream_events(srv, body)
    for choice in whole:
        parts = [c for e in events for c in e["choices"] if c["index"] == choice["index"]]
        assert "".join(c["text"] for c in parts) == choice["text"]
        assert parts[0]["text"] in (PROMPT, "Alas")  # the prompt comes first, whole
        if logprobs is not None:
            merged = {k: [] for k in choice["logprobs"]}
            for c in parts:
                if c["logprobs"]:
                    for k in merged:
                        merged[k].extend(c["logprobs"][k])
            assert merged == choice["logprobs"]


def test_openai_client_echo(srv, model):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
    r = client.completions.create(model=srv.state.model_name, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    assert r.choices[0].text == PROMPT
    assert r.choices[0].logprobs.token_logprobs[0] is None
    assert sum(r.choices[0].logprobs.token_logprobs[1:]) == pytest.approx(
        sum(s.logprob for s in model.score(PROMPT)[1:]), abs=1e-4)


def test_tokenizer_info_serves_lm_eval_harness_remote_tokenizer(srv, model):
    # lm-evaluation-harness (tokenizer_backend auto or remote) reads GET /tokenizer_info, then
    # tokenizes through POST /tokenize and /detokenize; the eos id is encode(eos_token)[0].
    info = httpx.get(srv.url + "/tokenizer_info").json()
    assert "eos_token" in info and info["model_max_length"] == model.config.n_positions
    tokens = httpx.post(srv.url + "/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert tokens["tokens"][0] == model.tokenizer.eos_token_id
    ids = httpx.post(srv.url + "/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()["tokens"]
    assert httpx.post(srv.url + "/detokenize", json={"tokens": ids}).json()["prompt"] == PROMPT
    assert info["chat_template"] is None  # this fixture has none: the plain template is not jinja
