"""The sampler's draws follow the distribution its parameters define.

Thousands of seeded one-token draws after a fixed prompt, against the filtered softmax computed
here in numpy from the model's own logits: temperature, top_k, top_p and min_p each change which
tokens may appear and how often. A wrong filter (a token outside the top-k or the nucleus drawn, or
the weights off) shows as an impossible token or a total-variation distance far above the
sampling noise (0.01-0.04 at 3,000 draws over these supports).
"""
from pathlib import Path

import numpy as np
import pytest

import llamas

TINY = Path(__file__).resolve().parent / "fixtures" / "gpt2-tiny"
PROMPT = [5, 17, 42, 7]
DRAWS = 3000


@pytest.fixture(scope="module")
def model():
    return llamas.load(TINY)


def expected_distribution(logits, temperature, top_k, top_p, min_p):
    """The distribution the sampler documents, from float64 logits."""
    z = logits.astype(np.float64) / temperature
    order = np.lexsort((np.arange(len(z)), -z))  # best logit first, lower id first on ties
    keep = np.zeros(len(z), bool)
    keep[order[:top_k] if top_k > 0 else order] = True
    p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    p /= p.sum()
    if min_p > 0:
        p = np.where(p >= min_p * p.max(), p, 0.0)
        p /= p.sum()
    if top_p < 1:
        ranked = np.argsort(-p, kind="stable")
        mass = np.cumsum(p[ranked])
        cut = int(np.searchsorted(mass, top_p)) + 1  # the smallest prefix whose mass reaches top_p
        nucleus = np.zeros(len(p), bool)
        nucleus[ranked[:cut]] = True
        p = np.where(nucleus, p, 0.0)
        p /= p.sum()
    return p


def draw(model, n, **params):
    cfg = model.config.to_native()
    args = (params.get("temperature", 1.0), params.get("top_k", 0), params.get("top_p", 1.0),
            params.get("min_p", 0.0), 1.0, 0.0, 0.0)
    counts = np.zeros(model.config.vocab_size)
    for seed in range(n):
        seq = llamas._C.Sequence(cfg, *args, seed, {}, -1)
        counts[model._native.step([(seq, PROMPT, True)])[0]] += 1
        seq.release()
    return counts / n


@pytest.mark.parametrize("params", [
    dict(temperature=0.6),
    dict(temperature=0.7, top_k=8),
    dict(temperature=1.3, top_p=0.6),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02),
])
def test_draws_follow_the_filtered_softmax(model, params):
    logits = model.forward(np.array([PROMPT]))[0, -1]
    p = expected_distribution(logits, params["temperature"], params.get("top_k", 0), params.get("top_p", 1.0),
                              params.get("min_p", 0.0))
    freq = draw(model, DRAWS, **params)
    assert np.all(freq[p == 0] == 0), f"drew tokens the filters exclude: {np.flatnonzero((p == 0) & (freq > 0))}"
    tv = 0.5 * np.abs(freq - p).sum()
    # Measured 0.01-0.04 with these seeds; a temperature 0.6 -> 0.75, top_p 0.6 -> 0.7 or min_p
    # 0.05 -> 0.03 in the reference gives 0.09-0.15.
    assert tv < 0.06, f"total variation {tv:.3f} from the expected distribution"


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    """The tiny model with one NaN in its final layernorm: every logit is NaN."""
    import shutil

    from llamas.safetensors_io import read_safetensors, write_safetensors

    folder = tmp_path_factory.mktemp("nan-model")
    for f in TINY.iterdir():
        shutil.copy(f, folder / f.name)
    tensors, meta = read_safetensors(str(folder / "model.safetensors"))
    tensors = {k: np.array(v) for k, v in tensors.items()}
    tensors["transformer.ln_f.weight"][0] = np.nan
    write_safetensors(str(folder / "model.safetensors"), tensors, meta)
    return llamas.load(str(folder))


@pytest.mark.parametrize("kwargs", [dict(), dict(temperature=0.8), dict(temperature=0.8, top_p=0.9, min_p=0.1),
                                    dict(temperature=0.8, top_k=5)])
def test_non_finite_logits_raise_a_clear_error(nan_model, kwargs):
    # Greedy argmax, sampling and every filter used to pick an arbitrary token (or, with min_p,
    # read before the candidate list) from NaN logits.
    with pytest.raises(llamas.LlamasError, match="not finite"):
        nan_model.generate(PROMPT, max_new_tokens=2, seed=0, **kwargs)


def test_non_finite_logits_end_the_request_with_an_error(nan_model):
    # The engine thread survives: a second request is answered too (with the same error).
    with llamas.Engine(nan_model) as engine:
        for logprobs in (3, None):
            done = engine.submit(PROMPT, max_new_tokens=2, logprobs=logprobs).result(timeout=30)
            assert done.finish_reason == "error" and "not finite" in (done.error or "")
