"""The Shakespeare model shipped inside the package (trained by llamas itself; see README)."""
import math
import os

import numpy as np
import pytest

import llamas
from llamas import Engine
from llamas.model import default_model_path

# A passage from the corpus (Romeo and Juliet, Act I, Scene 1; public domain).
PASSAGE = """Tybalt.
What, art thou drawn among these heartless hinds?
Turn thee Benvolio, look upon thy death.

Benvolio.
I do but keep the peace: put up thy sword,
Or manage it to part these men with me.

Tybalt.
What, drawn, and talk of peace! I hate the word
As I hate hell, all Montagues, and thee:
Have at thee, coward!
"""


def test_bundled_model_is_installed_with_the_package():
    path = default_model_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.exists(os.path.join(path, name)), f"{name} missing from the installed package ({path})"
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    assert size <= 25 * 2**20, f"the bundled model folder is {size / 2**20:.1f} MiB (limit 25)"


def test_bundled_model_loads_by_default_and_predicts_shakespeare():
    model = llamas.load()
    assert model.config.num_parameters() > 1_000_000
    ids = model.tokenizer.encode(PASSAGE)
    x, y = np.array([ids[:-1]]), np.array([ids[1:]])
    loss = llamas.evaluate(model, [(x, y)])
    # A uniform guess costs ln(vocab) nats per token (8.3 for 4096 tokens); an untrained model
    # about that. The trained model must do far better on real Shakespeare...
    assert loss < 0.6 * math.log(model.config.vocab_size), loss
    # ...and far better than on the same tokens shuffled.
    shuffled = np.random.default_rng(0).permutation(ids)
    xs, ys = np.array([shuffled[:-1]]), np.array([shuffled[1:]])
    assert llamas.evaluate(model, [(xs, ys)]) > loss + 1.0


def test_generate_without_model_flag_uses_the_bundled_model(capsys):
    from llamas.cli import main
    assert main(["generate", "ROMEO:", "--max-new-tokens", "24", "--seed", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip()) > 20
    llamas.set_num_threads(1)
    try:
        expected = llamas.load().generate("ROMEO:", max_new_tokens=24, seed=1)
    finally:
        llamas.set_num_threads(os.cpu_count() or 1)
    assert out == expected + "\n"


def test_engine_and_server_sample_with_the_models_generation_config():
    # The bundled model's generation_config.json: temperature 0.8, top-k 40, repetition penalty 1.1.
    # Engine.submit and the server's requests that leave those fields out use them, as generate does
    # (Engine.submit was greedy and the server sampled at temperature 1 from the whole vocabulary).
    import asyncio

    import httpx
    from llamas.server import create_app
    model = llamas.load()
    assert model.generation_config["temperature"] == 0.8 and model.generation_config["top_k"] == 40
    expected = model.generate("ROMEO:", max_new_tokens=24, seed=7)
    plain = model.generate("ROMEO:", max_new_tokens=24, seed=7, temperature=1.0, top_k=0, repetition_penalty=1.0)
    assert expected != plain
    with llamas.Engine(model) as engine:
        assert engine.submit("ROMEO:", max_new_tokens=24, seed=7).result().text == expected

    async def complete(app, body):
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                r = await c.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]
    body = {"prompt": "ROMEO:", "max_tokens": 24, "seed": 7}
    assert asyncio.run(complete(create_app(model), body)) == expected
    assert asyncio.run(complete(create_app(model, generation_config="none"), body)) == plain
    assert asyncio.run(complete(create_app(model), dict(body, temperature=1.0, top_k=0, repetition_penalty=1.0))) == plain


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "int8"])
def test_rows_bit_identical_across_attention_steps(kv_dtype):
    # Attention's online softmax takes 4 KV blocks (64 positions) a step, steps counted from
    # position 0: a row must come out bit for bit the same whether it is the last row of a prompt
    # (alone, or in a group whose last rows reach into a later block of its step) or decoded after
    # it, at lengths on both sides of the step and block boundaries.
    m = llamas.load(kv_dtype=kv_dtype)
    ids = (np.arange(230, dtype=np.int32) * 37 % m.config.vocab_size)[None]
    full = m.forward(ids)
    for n in (15, 16, 17, 63, 64, 65, 66, 79, 127, 128, 129, 130, 200):
        np.testing.assert_array_equal(m.forward(ids[:, :n]), full[:, :n], err_msg=f"prefix of {n}")
    # Decoding 60 tokens after 100 (across positions 128 and 144): each step's log-probability of
    # its token equals, bit for bit, what scoring the whole text in one prefill gives it.
    prompt = ids[0, :100].tolist()
    with Engine(m) as engine:  # (plain greedy: the bundled model's generation config adds a penalty)
        r = engine.submit(prompt, max_new_tokens=60, logprobs=1, temperature=0.0, top_k=0,
                          repetition_penalty=1.0).result(timeout=120)
    assert len(r.token_ids) == 60
    scored = m.score(prompt + r.token_ids)[len(prompt):]
    assert [lp.logprob for lp in r.logprobs] == [t.logprob for t in scored]
