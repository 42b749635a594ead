from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"


# The parity fixtures: random-weight GPT-2 models with transformers' logits and greedy ids.
PARITY_MODELS = ["gpt2-tiny", "gpt2-odd", "gpt2-scaled"]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """tests/fixtures (small committed models and tokenizers; rebuilt by tools/make_fixtures.py)."""
    return FIXTURES


@pytest.fixture(scope="module", params=PARITY_MODELS)
def case(request, fixtures_dir):
    """One parity fixture (test_gpt2_parity.Case): its folder, reference logits and greedy ids."""
    from test_gpt2_parity import Case
    return Case(fixtures_dir / request.param)


@pytest.fixture(scope="module")
def one_engine_thread():
    """Runs a module's tests with one engine thread: their models are tiny, so threads only add
    hand-offs; results are bit-identical at any thread count (test_train.py checks 1 vs 2)."""
    import llamas
    previous = llamas.get_num_threads()
    llamas.set_num_threads(1)
    yield
    llamas.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_http():
    """An httpx client of a server on the tiny fixture model (16 sequences at once), one per module."""
    pytest.importorskip("uvicorn")
    import llamas
    from test_server import served_client
    with served_client(llamas.load(str(FIXTURES / "gpt2-tiny")), max_batch=16) as c:
        yield c


@pytest.fixture(scope="module")
def http(tiny_http):
    """The tiny-model server's client, for modules that have no server of their own (the ones
    that do define their own `http`)."""
    return tiny_http


def submit_grid(model, prompt, seeds, temperatures, lengths, **constraint):
    """The results of `prompt` through one Engine for every seed x temperature x max_new_tokens (in
    that nesting order), all queued before any is read, so they run batched. Plain sampling at each
    temperature: no top-k and no penalty, whatever the model's generation_config.json says."""
    import llamas
    with llamas.Engine(model) as engine:
        handles = [engine.submit(prompt, max_new_tokens=n, temperature=t, seed=s, top_k=0, repetition_penalty=1.0,
                                 **constraint)
                   for s in seeds for t in temperatures for n in lengths]
        return [h.result() for h in handles]


def walk_recogniser(compiled, rng, limit, stop=0.25, closing=b"", settle=b"", max_len=4000):
    """Bytes drawn one at a time from those a structured-output recogniser (`match(bytes)` ->
    (valid, complete)) allows, until it says complete and a coin (probability `stop`) agrees. Every
    prefix must be valid and, unless complete, have a next byte (no dead ends). Past `limit` bytes
    it ends as soon as it can and prefers bytes in `closing` or that complete the text, then those
    in `settle`."""
    text = b""
    while True:
        ok, complete = compiled.match(text)
        assert ok
        allowed = [b for b in range(256) if compiled.match(text + bytes([b]))[0]]
        assert allowed or complete, text  # never a dead end
        if complete and (not allowed or rng.random() < stop or len(text) > limit):
            return text
        if len(text) > limit and (closing or settle):  # lean towards closing
            ends = [b for b in allowed if b in closing or compiled.match(text + bytes([b]))[1]]
            allowed = ends or [b for b in allowed if b in settle] or allowed
        text += bytes([rng.choice(allowed)])
        assert len(text) < max_len, text


def run_llamas(*args, timeout: float = 120, **kwargs):
    """`python -m llamas ARGS` in a subprocess: its CompletedProcess (text output captured)."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "llamas", *args], capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def _kernel_variants():
    from llamas import _C
    return list(_C.available_kernel_variants())


@pytest.fixture(params=_kernel_variants())
def variant(request):
    """Runs a test once per kernel variant this CPU supports (generic, and avx2 + avx512 or neon)."""
    from llamas import _C
    before = _C.kernel_variant()
    _C.set_kernel_variant(request.param)
    yield request.param
    _C.set_kernel_variant(before)


def rand(*shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


class SlowNative:
    """A model's native runtime with a pause before each batched step, so a request lasts long
    enough for a client to leave in the middle of it, or for a queue to fill, however fast the
    machine is. Everything else is passed through."""

    def __init__(self, native, delay):
        self._native, self._delay = native, delay

    def __getattr__(self, name):
        return getattr(self._native, name)

    def step(self, entries):
        import time
        time.sleep(self._delay)
        return self._native.step(entries)
