"""Speculative decoding by n-gram lookup (speculative_ngram): the drafter, the native verifying step
(Sequence.row_argmax, Sequence.truncate), and that output, greedy or sampled from a seed, is token for
token the same with and without it in Model.generate, llamas.Engine, the server and the CLI, while
drafts are accepted."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import llamas
from llamas._C import LlamasError
from llamas.request import Request, SamplingOptions, make_stop_rules
from llamas.scheduler import Scheduler
from llamas.speculative import (MAX_DRAFT_TOKENS, MAX_STEP_ROWS, PROBE_AFTER, AcceptancePrior, NgramDrafter, Speculation,
                                StepCost, plan_drafts)

HERE = os.path.dirname(__file__)
TINY = os.path.join(HERE, "fixtures", "gpt2-tiny")
ODD = os.path.join(HERE, "fixtures", "gpt2-odd")
# Prompts whose greedy continuations (random-weight fixtures, vocabulary 512) loop, so drafts are made
# and accepted, and one that does not repeat itself.
PROMPTS = ["When shall we three meet again", "a b a b a b a b", "In thunder, lightning, or in rain?"]


@pytest.fixture(scope="module")
def tiny():
    return llamas.load(TINY)


class FreeRows(StepCost):
    """Rows cost nothing: the planner gives a sequence every draft likely enough, whatever this box's
    timings (the tiny fixtures' verifying steps cost ~1.9x a one-row step, so the measured costs
    would often say no drafts, and these tests need drafts made)."""
    def __init__(self, *args):
        super().__init__(0.0)

    def observe(self, rows, seconds):
        super().observe(1, 1.0)


@pytest.fixture(autouse=True)
def free_rows(monkeypatch):
    import llamas.speculative
    monkeypatch.setattr(llamas.speculative, "StepCost", FreeRows)


def run_scheduler(model, prompt_ids, n, k, ignore_eos=True, **options):
    """The ids of one request through a Scheduler (sampling options as given), its finish reason and
    the scheduler's timing."""
    sched = Scheduler(model, max_batch=4, prefill_chunk=1024, max_prefill_tokens=None, speculative_ngram=k)
    out, finish = [], []
    rules = make_stop_rules(None, None, 0, ignore_eos, False, model.config.vocab_size, n)

    def sink(chunk):
        out.extend(chunk.token_ids)
        if chunk.finish_reason is not None:
            finish.append(chunk.finish_reason)
    sched.add(Request(prompt_ids, n, SamplingOptions(**options), rules, sink=sink))
    while sched.step():
        pass
    return out, finish[0], sched.timing


# ---- the drafter ------------------------------------------------------------------------------------
def test_drafts_follow_the_longest_earlier_ngram():
    d = NgramDrafter([1, 2, 3, 9, 9, 2, 3, 7, 8, 5, 1, 2, 3])
    # "1 2 3" occurred at the start, followed by 9 9 2 3 ...; "2 3" alone last by 7 8
    assert d.drafts(4) == [9, 9, 2, 3]
    d.append(4)  # "2 3 4" / "3 4" / "4" never occurred
    assert d.drafts(4) == []
    assert NgramDrafter([5, 6, 7]).drafts(3) == []
    assert NgramDrafter([1, 2, 1, 2]).drafts(0) == []


def test_drafts_continue_a_loop_past_the_end_of_the_text():
    # "x y x y": the last "x y" occurred two tokens back, so the drafts are the loop x y x y ...
    assert NgramDrafter([7, 1, 2, 1, 2]).drafts(5) == [1, 2, 1, 2, 1]
    assert NgramDrafter([3, 3, 3]).drafts(4) == [3, 3, 3, 3]


def test_the_acceptance_rate_follows_the_verifications_and_drifts_back_when_idle():
    prior = AcceptancePrior()
    spec = Speculation([1, 2, 1, 2], 4, prior)
    assert spec.rate == 0.5 and spec.offer(10) == [1, 2, 1, 2] and spec.offer(3) == [1, 2, 1]
    for _ in range(5):
        spec.verified(4, 5)   # all kept
    high = spec.rate
    assert high > 0.8 and prior.rate > 0.5  # the common rate learns from every sequence's drafts
    spec.verified(4, 1)       # none kept: one judged, rejected
    assert spec.rate < high
    for _ in range(8):
        spec.verified(2, 1)
    low = spec.rate
    assert low < 0.35 < prior.rate
    for _ in range(10):
        spec.idle()           # offered drafts and given none: back towards the common rate
    assert low < spec.rate < prior.rate and spec.idle_steps == 10
    spec.verified(1, 1)
    assert spec.idle_steps == 0
    other = Speculation([5, 6], 4, prior)  # a new sequence starts from the common rate
    assert other.rate == pytest.approx(prior.rate)


def test_step_cost_estimates_untimed_row_counts_from_timed_ones():
    cost = StepCost(0.3)
    assert cost.estimate(4) is None
    cost.observe(1, 1.0)
    assert cost.estimate(1) == 1.0 and cost.estimate(3) == pytest.approx(1.6)  # the prior: 0.3 a row
    cost.observe(3, 2.0)
    assert cost.estimate(2) == pytest.approx(1.5)    # between timed neighbours
    assert cost.estimate(5) == pytest.approx(3.0)    # past them, their slope
    cost.observe(0, 1.0), cost.observe(MAX_STEP_ROWS + 1, 1.0), cost.observe(2, 0.0)  # ignored
    assert cost.estimate(2) == pytest.approx(1.5)


def test_step_cost_follows_the_box_drift_without_losing_the_shape():
    cost = StepCost(0.3)
    for _ in range(20):
        cost.observe(1, 1.0), cost.observe(4, 2.0)
    assert cost.estimate(4) / cost.estimate(1) == pytest.approx(2.0)
    for _ in range(20):
        cost.observe(1, 1.5)   # the box slows down by half; 4-row steps are not run meanwhile
    assert cost.estimate(1) == pytest.approx(1.5, rel=0.02)
    # a 4-row step is still twice a 1-row one (raw means would say 2.0 against 1.5: rows look cheap)
    assert cost.estimate(4) / cost.estimate(1) == pytest.approx(2.0, rel=0.1)
    assert cost.estimate(4) > 2.7


def test_plan_drafts_takes_the_drafts_that_raise_tokens_per_second():
    flat = StepCost(0.0)
    flat.observe(1, 1.0)
    assert plan_drafts(flat, 1, [(0.9, 6)]) == [6]           # free rows: every likely draft
    assert plan_drafts(flat, 1, [(0.5, 32)]) == [5]          # up to 0.5^i >= MIN_DRAFT_GAIN
    steep = StepCost(1.0)                                    # a row costs a whole step
    steep.observe(1, 1.0)
    assert plan_drafts(steep, 1, [(0.9, 6)]) == [0]
    cached = StepCost(0.3)
    cached.observe(1, 1.0)
    assert plan_drafts(cached, 1, [(0.2, 8)]) == [0]         # (1 + 0.2) / 1.3 < 1
    assert plan_drafts(cached, 1, [(0.95, 8)]) == [8]
    # two sequences: the likelier drafts first, within one step's rows
    plan = plan_drafts(cached, 2, [(0.9, 8), (0.4, 8)])
    assert plan[0] > plan[1]
    assert plan_drafts(flat, MAX_STEP_ROWS, [(0.9, 4)]) == [0]  # the step is already as large as planned
    assert plan_drafts(StepCost(0.3), 1, [(0.9, 4)]) == [0]       # nothing timed yet


# ---- the native verifying step ----------------------------------------------------------------------
def test_verifying_greedy_drafts_keeps_what_decoding_one_token_at_a_time_picks(tiny):
    cfg = tiny.config.to_native()
    ids = tiny.tokenizer.encode(PROMPTS[0])
    s = llamas._C.Sequence(cfg)
    greedy = [tiny._native.step([(s, ids, True)])[0]]
    for _ in range(8):
        greedy.append(tiny._native.step([(s, [greedy[-1]], True)])[0])
    # drafts right up to the third: those two, then greedy's own token where the third was wrong
    v = llamas._C.Sequence(cfg)
    tiny._native.step([(v, ids, True)])
    drafts = greedy[1:3] + [(greedy[3] + 1) % tiny.config.vocab_size, greedy[4]]
    last = tiny._native.step([(v, [greedy[0]] + drafts, True, True)])[0]
    assert v.verified == greedy[1:4] and last == greedy[3]
    v.truncate(len(ids) + len(v.verified))  # keep the fed token and the accepted drafts
    assert v.tokens == ids + greedy[:3]
    assert tiny._native.step([(v, [greedy[3]], True)])[0] == greedy[4]
    # drafts that are all right: every one kept, then the token after them
    w = llamas._C.Sequence(cfg)
    tiny._native.step([(w, ids, True)])
    assert tiny._native.step([(w, greedy[:5], True, True)])[0] == greedy[5] and w.verified == greedy[1:6]


def _draw_frequencies(draw, n, vocab):
    counts = np.zeros(vocab)
    for seed in range(n):
        counts[draw(seed)] += 1
    return counts / n


@pytest.mark.parametrize("params", [dict(temperature=1.0),
                                    dict(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.3,
                                         presence_penalty=0.5, logit_bias={3: 1.0})])
def test_verified_sampled_tokens_have_the_sampler_distribution(tiny, params):
    """Speculative sampling keeps each position's distribution: over 20,000 seeds, the first token a
    verification gives is distributed as a plain draw from row 0; given that it kept the first
    draft, the second as a plain draw from row 1 after it. Deterministic (fixed seeds)."""
    cfg = tiny.config.to_native()
    vocab = 8
    rng = np.random.default_rng(5)
    logits = rng.normal(0.0, 1.2, size=(3, vocab)).astype(np.float32)
    drafts = [int(np.argmax(logits[0])), int(np.argmax(logits[1]))]  # likely drafts, so some are kept
    context = [1, 3] + drafts  # the context ends with the drafts
    n = 20000

    def seq(seed):
        return llamas._C.Sequence(cfg, seed=seed, **params)
    first = _draw_frequencies(lambda sd: seq(sd).verify_logits(logits, drafts, context)[0], n, vocab)
    plain0 = _draw_frequencies(lambda sd: seq(sd + n).sample_logits(logits[0], context[:2]), n, vocab)
    assert np.abs(first - plain0).max() < 0.02, (first, plain0)
    kept = [out for out in (seq(sd).verify_logits(logits, drafts, context) for sd in range(n)) if out[0] == drafts[0]]
    assert len(kept) > 1000  # the draft is likely enough for the conditional check to mean something
    second = np.bincount([out[1] for out in kept], minlength=vocab) / len(kept)
    plain1 = _draw_frequencies(lambda sd: seq(sd + 2 * n).sample_logits(logits[1], context[:3]), n, vocab)
    assert np.abs(second - plain1).max() < 0.03, (second, plain1)


def test_verification_refuses_what_it_cannot_follow(tiny):
    cfg = tiny.config.to_native()
    logits = np.zeros((2, 8), np.float32)
    for kwargs in (dict(logprobs=2), dict(min_tokens=3, min_tokens_banned=[0])):
        with pytest.raises(LlamasError, match="speculative"):
            llamas._C.Sequence(cfg, temperature=0.5, **kwargs).verify_logits(logits, [1], [5, 1])


def test_truncate_refuses_positions_it_does_not_hold_and_shared_blocks(tiny):
    cfg = tiny.config.to_native()
    ids = list(range(40))
    s = llamas._C.Sequence(cfg)
    tiny._native.step([(s, ids, True)])
    for bad in (-1, 41):
        with pytest.raises(LlamasError, match="truncate"):
            s.truncate(bad)
    shared = s.share_blocks(0, 2)  # positions 0-31 are now also held elsewhere
    with pytest.raises(LlamasError, match="shared"):
        s.truncate(20)
    s.truncate(32)  # a block boundary: nothing shared is written again
    assert s.length == 32 and s.kv_blocks == 2
    del shared
    s.truncate(20)
    assert s.length == 20 and len(s.tokens) == 20


# ---- the same output -------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [TINY, ODD])
@pytest.mark.parametrize("k", [1, 4, MAX_DRAFT_TOKENS])
def test_greedy_output_is_the_same_with_speculation(path, k):
    model = llamas.load(path)
    accepted = 0
    for prompt in PROMPTS:
        ids = model.tokenizer.encode(prompt)
        for n in (1, 2, 7, 60):
            plain, plain_finish, _ = run_scheduler(model, ids, n, 0, temperature=0.0)
            fast, fast_finish, timing = run_scheduler(model, ids, n, k, temperature=0.0)
            assert fast == plain and fast_finish == plain_finish, (prompt, n)
            accepted += timing.accepted_tokens
            assert timing.accepted_tokens <= timing.draft_tokens
    assert accepted > 0  # the test would pass with speculation doing nothing otherwise


VARIANT_CHECK = """
import sys, llamas
from test_speculative import ODD, PROMPTS, run_scheduler
assert llamas.info()["kernel_variant"] == sys.argv[1], llamas.info()["kernel_variant"]
model = llamas.load(ODD)
for prompt in PROMPTS:
    ids = model.tokenizer.encode(prompt)
    plain, _, _ = run_scheduler(model, ids, 40, 0, temperature=0.0)
    fast, _, _ = run_scheduler(model, ids, 40, 6, temperature=0.0)
    assert fast == plain, prompt
print("ok")
"""


@pytest.mark.parametrize("variant", ["avx2", "neon", "generic"])
def test_other_kernel_variants_give_the_same_output(variant):
    # Each variant's attention takes query rows in groups (AVX-512 4; AVX2, NEON and generic 6) and
    # rounds in its own lanes: a verifying chunk's rows must still equal rows decoded one at a time.
    if variant not in llamas.info()["available_kernel_variants"]:
        pytest.skip(f"{variant} cannot run here")
    paths = [HERE] + [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, LLAMAS_KERNEL=variant, PYTHONPATH=os.pathsep.join(paths))
    out = subprocess.run([sys.executable, "-c", VARIANT_CHECK, variant], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


@pytest.mark.parametrize("kwargs", [dict(dtype="bfloat16", compute_dtype="bfloat16"), dict(kv_dtype="bfloat16"),
                                    dict(dtype="int8", compute_dtype="int8", kv_dtype="int8")])
def test_other_precisions_give_the_same_output_too(kwargs):
    model = llamas.load(TINY, **kwargs)
    drafted = 0
    for prompt in PROMPTS:
        ids = model.tokenizer.encode(prompt)
        plain, _, _ = run_scheduler(model, ids, 100, 0, temperature=0.0)
        fast, _, timing = run_scheduler(model, ids, 100, 8, temperature=0.0)
        assert fast == plain, prompt
        drafted += timing.draft_tokens
    assert drafted > 0  # drafts were verified (and rejected ones' positions dropped)


def test_generate_and_engine_agree_with_plain_greedy_at_the_context_end(tiny):
    ctx = tiny.config.n_positions
    long_prompt = (tiny.tokenizer.encode("a b a b ") * ctx)[:ctx - 5]
    plain = tiny.generate(long_prompt, max_new_tokens=64, temperature=0.0)
    assert len(plain) <= 6  # the context ends the generation, with drafts or without
    assert tiny.generate(long_prompt, max_new_tokens=64, temperature=0.0, speculative_ngram=8) == plain
    batch = [tiny.tokenizer.encode(p) for p in PROMPTS]
    want = tiny.generate(batch, max_new_tokens=40, temperature=0.0)
    assert tiny.generate(batch, max_new_tokens=40, temperature=0.0, speculative_ngram=6) == want
    text = tiny.generate(PROMPTS[1], max_new_tokens=40, temperature=0.0, stop=[" b"])
    assert tiny.generate(PROMPTS[1], max_new_tokens=40, temperature=0.0, stop=[" b"], speculative_ngram=6) == text
    streamed = "".join(tiny.generate(PROMPTS[0], max_new_tokens=40, temperature=0.0, stream=True, speculative_ngram=4))
    assert streamed == tiny.generate(PROMPTS[0], max_new_tokens=40, temperature=0.0)
    with llamas.Engine(tiny, speculative_ngram=4, prefix_cache_mb=4) as engine:
        for _ in range(2):  # the second run starts from the prefix cache's blocks
            handles = [engine.submit(p, max_new_tokens=30, temperature=0.0) for p in PROMPTS]
            assert [h.result().text for h in handles] == [tiny.generate(p, max_new_tokens=30, temperature=0.0)
                                                        for p in PROMPTS]


def test_greedy_with_penalties_and_bias_is_the_same_too(tiny):
    # Each row is processed with the context up to it (the drafts before it included), so penalties
    # and biases see what decoding one token at a time would.
    ids = tiny.tokenizer.encode(PROMPTS[1])
    accepted = 0
    for options in ({"repetition_penalty": 1.3}, {"presence_penalty": 0.8, "frequency_penalty": 0.4},
                    {"logit_bias": {5: 2.0, 7: -3.0}}, {"top_k": 1, "temperature": 0.9}):
        plain, _, _ = run_scheduler(tiny, ids, 40, 0, temperature=0.0, **options) if "temperature" not in options \
            else run_scheduler(tiny, ids, 40, 0, **options)
        fast, _, timing = run_scheduler(tiny, ids, 40, 8, temperature=0.0, **options) if "temperature" not in options \
            else run_scheduler(tiny, ids, 40, 8, **options)
        assert fast == plain, options
        accepted += timing.accepted_tokens
    assert accepted > 0


SAMPLED = [dict(temperature=0.6, top_p=0.9), dict(temperature=1.0), dict(temperature=0.3, top_k=5, min_p=0.05),
           dict(temperature=0.8, repetition_penalty=1.2, presence_penalty=0.3, logit_bias={5: 1.5})]


@pytest.mark.parametrize("options", SAMPLED)
def test_sampled_output_is_the_same_with_speculation(tiny, options):
    # Each position's token comes from the same single draw as without drafts, so a seed gives the
    # same tokens whatever the drafts were and however many a step verified.
    accepted = 0
    for seed in range(4):
        for prompt in PROMPTS:
            ids = tiny.tokenizer.encode(prompt)
            plain, _, _ = run_scheduler(tiny, ids, 40, 0, seed=seed, **options)
            for k in (2, 8):
                fast, _, timing = run_scheduler(tiny, ids, 40, k, seed=seed, **options)
                assert fast == plain, (seed, prompt, k)
                accepted += timing.accepted_tokens
    assert accepted > 0


def test_verifying_draws_what_sampling_one_token_at_a_time_draws(tiny):
    """Sequence.verify_logits against sample_logits row by row from the same seed: the same tokens,
    up to and including the first position whose draw is not the draft."""
    cfg = tiny.config.to_native()
    rng = np.random.default_rng(9)
    vocab = 8
    kept = 0
    for seed in range(300):
        logits = rng.normal(0.0, 1.5, size=(4, vocab)).astype(np.float32)
        drafts = [int(np.argmax(row)) for row in logits[:3]]
        context = [1, 3] + drafts
        got = llamas._C.Sequence(cfg, seed=seed, temperature=0.8).verify_logits(logits.copy(), drafts, context)
        plain = llamas._C.Sequence(cfg, seed=seed, temperature=0.8)
        want = []
        for r in range(4):
            want.append(plain.sample_logits(logits[r].copy(), context[:2 + r]))
            if r == 3 or want[-1] != drafts[r]:
                break
        assert got == want, seed
        kept += len(got) - 1
    assert kept > 100  # drafts were kept often enough for the later positions to be checked


def test_requests_the_sampler_cannot_verify_are_not_speculated(tiny):
    ids = tiny.tokenizer.encode(PROMPTS[1])
    for options in ({"temperature": 0.0, "logprobs": 2}, {"temperature": 0.0, "choices": ["a b a b", "b a"]}):
        plain, _, _ = run_scheduler(tiny, ids, 30, 0, ignore_eos=False, **options)
        fast, _, timing = run_scheduler(tiny, ids, 30, 8, ignore_eos=False, **options)
        assert fast == plain and timing.draft_tokens == 0, options


def run_batch(model, prompts, n, k):
    sched = Scheduler(model, max_batch=len(prompts), prefill_chunk=1024, max_prefill_tokens=None, speculative_ngram=k)
    outs = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        rules = make_stop_rules(None, None, 0, True, False, model.config.vocab_size, n)
        sched.add(Request(model.tokenizer.encode(p), n, SamplingOptions(temperature=0.0), rules,
                          sink=lambda c, i=i: outs[i].extend(c.token_ids)))
    while sched.step():
        pass
    return outs, sched.timing


def test_the_scheduler_drafts_as_its_step_cost_says(tiny, monkeypatch):
    import llamas.speculative
    prompts = PROMPTS * 3  # 9 sequences
    plain, _ = run_batch(tiny, prompts, 40, 0)

    class Cost(FreeRows):  # a fixed share of a step per row, whatever this box's timings
        def __init__(self, row_cost):
            StepCost.__init__(self, row_cost)
    monkeypatch.setattr(llamas.speculative, "StepCost", lambda *args: Cost(1.0))   # a row costs a step
    costly, timing = run_batch(tiny, prompts, 40, 6)
    # only probes: one draft after PROBE_AFTER steps without any, whatever the batch
    assert costly == plain and 0 < timing.draft_tokens <= timing.steps // (PROBE_AFTER + 1)
    monkeypatch.setattr(llamas.speculative, "StepCost", lambda *args: Cost(0.0))   # rows are free
    free, timing = run_batch(tiny, prompts, 40, 6)
    assert free == plain and timing.accepted_tokens > 0
    assert timing.draft_tokens <= timing.steps * 6 * len(prompts)


def test_the_scheduler_times_decode_steps_only(tiny, monkeypatch):
    import llamas.speculative
    monkeypatch.setattr(llamas.speculative, "StepCost", StepCost)  # the real one
    sched = Scheduler(tiny, max_batch=2, prefill_chunk=1024, max_prefill_tokens=None, speculative_ngram=4)
    rules = make_stop_rules(None, None, 0, True, False, tiny.config.vocab_size, 30)
    sched.add(Request(tiny.tokenizer.encode(PROMPTS[1]), 30, SamplingOptions(temperature=0.0), rules, sink=lambda c: None))
    sched.step()  # the prompt (9 rows): not timed
    assert sched.planner.step_cost.estimate(1) is None
    while sched.step():
        pass
    timed = [r for r in range(1, MAX_STEP_ROWS + 1) if sched.planner.step_cost._shape[r] is not None]
    assert 1 in timed and max(timed) <= 5  # one row a step, or one and its drafts (at most 4)


@pytest.mark.parametrize("bad", [-1, MAX_DRAFT_TOKENS + 1, 2.0, True, "4", None])
def test_bad_speculative_ngram_values_are_refused(tiny, bad):
    with pytest.raises(LlamasError, match="speculative_ngram"):
        tiny.generate("x", max_new_tokens=2, speculative_ngram=bad)
    with pytest.raises(LlamasError, match="speculative_ngram"):
        llamas.Engine(tiny, speculative_ngram=bad)
    pytest.importorskip("fastapi")
    from llamas.server import create_app
    with pytest.raises(LlamasError, match="speculative_ngram"):
        create_app(tiny, speculative_ngram=bad)


# ---- server and CLI ---------------------------------------------------------------------------------
def test_the_server_speculates_and_reports_it_in_metrics(tiny):
    pytest.importorskip("uvicorn")
    from test_server import served_client
    body = {"prompt": PROMPTS[1], "max_tokens": 40, "temperature": 0}
    with served_client(tiny) as plain:
        want = plain.post("/v1/completions", json=body).json()["choices"][0]["text"]
    with served_client(tiny, speculative_ngram=6) as http:
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        assert r.json()["usage"]["completion_tokens"] == 40
        # streamed: a verifying step hands out several tokens; the events carry them in order
        streamed = http.post("/v1/completions", json={**body, "stream": True}).text
        events = [json.loads(e[6:]) for e in streamed.split("\n\n") if e.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in events if c["choices"]) == want
        assert streamed.rstrip().endswith("data: [DONE]")
        metrics = http.get("/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("llamas_spec_decode_")}
    assert 0 < values["llamas_spec_decode_accepted_tokens_total"] <= values["llamas_spec_decode_draft_tokens_total"]


def test_cli_generate_speculative_ngram(tiny):
    cmd = [sys.executable, "-m", "llamas", "generate", "--model", TINY, "--temperature", "0", "--max-new-tokens", "30"]
    plain = subprocess.run(cmd + [PROMPTS[1]], capture_output=True, text=True, timeout=120)
    fast = subprocess.run(cmd + ["--speculative-ngram", "6", "--stats", PROMPTS[1]], capture_output=True, text=True,
                          timeout=120)
    assert plain.returncode == 0 and fast.returncode == 0, fast.stderr
    assert fast.stdout == plain.stdout
    # --stats: the steps taken and the drafts fed (how many depends on this box's step timings)
    m = re.search(r"; (\d+) forward steps, (\d+) speculative drafts(, \d+% kept)?$", fast.stderr.strip())
    assert m and 1 <= int(m.group(1)) <= 30, fast.stderr
    bad = subprocess.run(cmd + ["--speculative-ngram", "100", PROMPTS[1]], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "speculative_ngram" in bad.stderr and "Traceback" not in bad.stderr
    assert "--speculative-ngram" in subprocess.run([sys.executable, "-m", "llamas", "serve", "--help"],
                                                   capture_output=True, text=True, timeout=60).stdout


def test_rows_verified_together_equal_rows_decoded_alone(tiny):
    """The property speculation rests on, at the logits: a chunk's rows are bit-identical to the same
    tokens decoded one at a time (each row's logits through forward, its last position)."""
    ids = tiny.tokenizer.encode(PROMPTS[0])
    greedy = tiny.generate(ids, max_new_tokens=12, temperature=0.0)
    full = tiny.forward([ids + greedy])[0]
    steps = [tiny.forward([ids + greedy[:i]])[0][-1] for i in range(len(greedy) + 1)]
    np.testing.assert_array_equal(full[len(ids) - 1:], np.stack(steps))
