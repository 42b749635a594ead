"""`stream_interval` (`llamas serve --stream-interval N`, vLLM's and TensorRT-LLM's flag): a streamed
choice sends its first text at once, then one event per N tokens, and its last event carries
everything still held (a stop, the length limit, a cancellation). The text, logprobs and usage are
those of the per-token stream."""
import subprocess
import sys

import httpx
import openai
import pytest

import llamas
from llamas.server import create_app
from llamas.server_generation import _Coalescer, merge_chunks
from llamas.scheduler import Chunk, TokenLogprob
from test_server import PROMPT, TINY, ThreadServer, assert_still_serving, free_port


@pytest.fixture(scope="module")
def model():
    return llamas.load(TINY)


@pytest.fixture(scope="module")
def served(model):
    with ThreadServer(create_app(model, stream_interval=4)) as s:
        with httpx.Client(base_url=s.url, timeout=60) as http:
            yield openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0), http


# ---- the listener, with a fake dispatcher --------------------------------------------------------
def _coalesce(chunks, interval):
    sent = []
    listener = _Coalescer(lambda loop, inbox, item: sent.append(item), None, None, 5, interval)
    for c in chunks:
        listener(c)
    assert all(idx == 5 for idx, _ in sent)
    return [c for _, c in sent]


def test_the_first_text_goes_at_once_then_one_event_per_n_tokens_and_the_rest_at_the_end():
    chunks = [Chunk(f"t{i}", [i]) for i in range(10)] + [Chunk("end", [10], None, "length")]
    sent = _coalesce(chunks, 4)
    assert [c.token_ids for c in sent] == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert [c.text for c in sent] == ["t0", "t1t2t3t4", "t5t6t7t8", "t9end"]
    assert [c.finish_reason for c in sent] == [None, None, None, "length"]
    assert _coalesce(chunks, 1) == chunks  # (the server does not install it for N = 1: the same events)


def test_chunks_without_text_are_held_with_the_first_text():
    # Tokens whose text is held back (an incomplete UTF-8 character, a possible stop string) do not
    # count as the first text: the event with the first text goes out as soon as it exists.
    chunks = [Chunk("", [0]), Chunk("", [1]), Chunk("\u00e9", [2]), Chunk("a", [3]), Chunk("b", [4])]
    sent = _coalesce(chunks, 3)
    assert [(c.text, c.token_ids) for c in sent] == [("", [0]), ("", [1]), ("\u00e9", [2])]


def test_a_cancellation_or_error_flushes_what_is_held():
    for end in (Chunk("", [], None, "cancelled"), Chunk("", [], None, "error", error="boom")):
        sent = _coalesce([Chunk("a", [0]), Chunk("b", [1]), Chunk("c", [2]), end], 8)
        assert [(c.text, c.token_ids, c.finish_reason) for c in sent] == [("a", [0], None),
                                                                           ("bc", [1, 2], end.finish_reason)]
        assert sent[-1].error == end.error


def test_merged_chunks_keep_logprobs_in_order_and_the_first_prompt_scores():
    lp = [TokenLogprob(i, -float(i), [(i, -float(i))]) for i in range(3)]
    prompt = [None, TokenLogprob(9, -0.5, [])]
    merged = merge_chunks([Chunk("a", [0], lp[:1], None, None, prompt), Chunk("b", [1, 2], lp[1:])])
    assert (merged.text, merged.token_ids, merged.logprobs, merged.prompt_logprobs) == ("ab", [0, 1, 2], lp, prompt)
    assert merge_chunks([Chunk("a", [0]), Chunk("b", [1])]).logprobs is None


# ---- through the server --------------------------------------------------------------------------
def _content_events(stream):
    return [c for c in stream if c.choices]


def test_streamed_completions_come_in_groups_and_equal_the_whole_answer(served, model):
    client, http = served
    r = client.completions.create(model="gpt2-tiny", prompt=PROMPT, max_tokens=23, temperature=0, logprobs=2)
    whole = r.choices[0]
    assert whole.text == model.generate(PROMPT, max_new_tokens=23)
    events = _content_events(client.completions.create(model="gpt2-tiny", prompt=PROMPT, max_tokens=23, temperature=0,
                                                       logprobs=2, stream=True,
                                                       stream_options={"include_usage": True}))
    sizes = [len(e.choices[0].logprobs.tokens) for e in events]
    assert events[0].choices[0].text and sum(sizes) == 23
    assert sizes[0] == 1  # the first token has text here: it goes out alone, at once
    assert sizes[1:-1] == [4] * (len(sizes) - 2) and 1 <= sizes[-1] <= 4, sizes
    assert "".join(e.choices[0].text for e in events) == whole.text
    assert [e.choices[0].finish_reason for e in events] == [None] * (len(events) - 1) + ["length"]
    assert sum((e.choices[0].logprobs.token_logprobs for e in events), []) == whole.logprobs.token_logprobs
    assert sum((e.choices[0].logprobs.text_offset for e in events), []) == whole.logprobs.text_offset
    assert_still_serving(http)


def test_streamed_chat_stops_and_n_choices_lose_nothing(served, model):
    client, _ = served
    msgs = [{"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model="gpt2-tiny", messages=msgs, max_tokens=17, temperature=0)
    events = _content_events(client.chat.completions.create(model="gpt2-tiny", messages=msgs, max_tokens=17,
                                                            temperature=0, stream=True))
    assert "".join(e.choices[0].delta.content or "" for e in events) == whole.choices[0].message.content
    assert len(events) <= 2 + (17 + 3) // 4  # the role event, the first text, then 4 tokens an event
    # A stop string: the tokens held before it are sent, nothing of it leaks.
    full = model.generate(PROMPT, max_new_tokens=30)
    stop = full[len(full) * 2 // 3:][:2]
    cut = full[:full.find(stop)]
    pieces = [e.choices[0].text for e in _content_events(client.completions.create(
        model="gpt2-tiny", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop], stream=True))]
    assert "".join(pieces) == cut and not any(stop in p for p in pieces)
    # n sampled choices, each grouped on its own.
    kw = dict(model="gpt2-tiny", prompt=PROMPT, max_tokens=10, temperature=1.0, seed=3, n=3)
    want = [c.text for c in client.completions.create(**kw).choices]
    got = {}
    for e in client.completions.create(stream=True, **kw):
        got[e.choices[0].index] = got.get(e.choices[0].index, "") + e.choices[0].text
    assert [got[i] for i in range(3)] == want


def test_a_bad_stream_interval_is_refused(model):
    for bad in (0, -1, 1.5, True, "4"):
        with pytest.raises(llamas.LlamasError, match="stream_interval"):
            create_app(model, stream_interval=bad)
    r = subprocess.run([sys.executable, "-m", "llamas", "serve", "--model", TINY, "--port", str(free_port()),
                        "--stream-interval", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--stream-interval" in r.stderr and "Traceback" not in r.stderr
    assert "--stream-interval" in subprocess.run([sys.executable, "-m", "llamas", "serve", "--help"],
                                                 capture_output=True, text=True, timeout=60).stdout
