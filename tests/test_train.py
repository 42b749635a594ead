"""Training API: PyTorch parity (tests/fixtures/train-odd), determinism, learning, Model.save,
bad input, NaN handling and the safetensors reader/writer."""
import json
import os
import struct

import numpy as np
import pytest

import llamas
from llamas import LlamasError, safetensors_io
from llamas.safetensors_io import read_safetensors, write_safetensors

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "jumbo vexing bright sphinx of black quartz judge my vow").split()


pytestmark = pytest.mark.usefixtures("one_engine_thread")


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def odd(fixtures_dir):
    """The train-odd fixture: folder, batches, expected numbers, reference tensors."""
    root = fixtures_dir / "train-odd"
    batches = np.load(root / "batches.npz")
    grads, grads_meta = read_safetensors(str(root / "grads0.safetensors"))
    final, _ = read_safetensors(str(root / "final_weights.safetensors"))
    return {
        "model": str(root / "model"),
        "inputs": batches["inputs"], "targets": batches["targets"],
        "expected": json.loads((root / "expected.json").read_text()),
        "grads": grads, "grads_meta": grads_meta, "final": final,
    }


def odd_trainer(odd, **kw):
    model = llamas.load(odd["model"])
    return llamas.Trainer(model, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=1.0, **kw)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b) / np.abs(b)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A byte-level BPE tokenizer (vocabulary 300) trained on a small synthetic corpus."""
    from llamas import data
    from llamas.tokenizer import Tokenizer
    root = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS, 8)) + "." for _ in range(200)), encoding="utf-8")
    data.train_tokenizer([str(corpus)], vocab_size=300, out=str(root / "tok"))
    return Tokenizer.from_folder(str(root / "tok"))


def tiny_config(vocab_size=256, n_positions=32, n_embd=32, n_layer=1, n_head=2, eos=0):
    return llamas.GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                             n_head=n_head, bos_token_id=eos, eos_token_id=eos)


def params_copy(trainer, kind="param"):
    return {name: np.array(trainer._native.tensor(kind, name)) for name, _shape, _decay in trainer._native.params()}


def random_batch(vocab, b=2, t=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab, (b, t))
    y = rng.integers(0, vocab, (b, t))
    return x, y


# -- PyTorch parity -----------------------------------------------------------------------------
def test_step0_loss_and_gradients_match_torch(odd):
    trainer = odd_trainer(odd)
    loss = trainer.compute_gradients(odd["inputs"][0], odd["targets"][0])
    assert rel_err(loss, odd["expected"]["loss0"]) <= 1e-5, (loss, odd["expected"]["loss0"])
    assert float(odd["grads_meta"]["loss0"]) == pytest.approx(odd["expected"]["loss0"], rel=1e-7)
    names = sorted(name for name, _s, _d in trainer._native.params())
    assert names == sorted(odd["grads"]) == sorted(odd["expected"]["param_names"])
    worst_name, worst = None, 0.0
    for name, ref in odd["grads"].items():
        got = trainer.gradient(name)
        assert got.shape == ref.shape and got.dtype == np.float32, name
        err = float(np.abs(got - ref).max() / np.abs(ref).max())
        if err > worst:
            worst_name, worst = name, err
    assert worst <= 1e-4, f"worst gradient error {worst:.3g} (x max|ref|) in {worst_name}"
    # compute_gradients does not update anything
    assert trainer.steps_done == 0
    assert trainer.compute_gradients(odd["inputs"][0], odd["targets"][0]) == loss


def test_scaled_attention_trains_with_its_own_scale(fixtures_dir):
    """gpt2-scaled (scores / (layer + 1), no head_dim^-0.5): the training forward gives the loss of
    transformers' logits, and the backward's query gradients match central differences (a
    backward still scaling by head_dim^-0.5 would be off by a factor 2-3 in every layer)."""
    folder = fixtures_dir / "gpt2-scaled"
    ids = np.load(folder / "expected.npz")["input_ids"]
    logits = np.load(folder / "expected.npz")["logits"].astype(np.float64)
    x, y = ids[:, :-1], ids[:, 1:]
    logp = logits[:, :-1] - np.log(np.exp(logits[:, :-1]).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logp, y[..., None], -1).mean()
    trainer = llamas.Trainer(llamas.load(folder), lr=1e-3)
    assert rel_err(trainer.compute_gradients(x, y), expected) <= 1e-5
    C = 48
    for layer in (0, 2):
        name = f"transformer.h.{layer}.attn.c_attn.weight"
        grad = trainer.gradient(name)[:, :C].copy()  # the query columns
        weight = trainer._native.tensor("param", name)
        for flat in np.argsort(-np.abs(grad), axis=None)[:3]:
            i, j = np.unravel_index(flat, grad.shape)
            w0, h = float(weight[i, j]), 1e-2
            weight[i, j] = w0 + h
            up = trainer.compute_gradients(x, y)
            weight[i, j] = w0 - h
            down = trainer.compute_gradients(x, y)
            weight[i, j] = w0
            numeric = (up - down) / (2 * h)
            assert abs(numeric - grad[i, j]) <= 0.05 * abs(grad[i, j]), (name, i, j, numeric, grad[i, j])


def test_adamw_steps_match_torch(odd):
    exp = odd["expected"]
    trainer = odd_trainer(odd)
    losses, norms = [], []
    for k in range(10):
        losses.append(trainer.step(odd["inputs"][k], odd["targets"][k]))
        norms.append(trainer.last_grad_norm)
        assert trainer.last_lr == 3e-3 and trainer.steps_done == k + 1
    assert rel_err(losses, exp["adamw_losses"]).max() <= 1e-4, (losses, exp["adamw_losses"])
    assert rel_err(norms, exp["adamw_grad_norms"]).max() <= 1e-4, (norms, exp["adamw_grad_norms"])

    # Final weights. AdamW normalises each update (m / sqrt(v)), so a weight's movement does not
    # scale with its gradient; the measured worst error is 2.9e-4 x max|ref| (h.0.mlp.c_fc.weight),
    # i.e. ~3e-5 absolute, 1% of one lr-sized update: 1e-3 leaves a ~3x margin.
    # The key slice of c_attn.bias is the exception: its gradient is mathematically zero (adding
    # a constant to every key's score leaves the softmax unchanged) and in practice ~3e-11 of
    # rounding noise, below eps = 1e-8, so Adam moves it by lr * g / (|g| + eps) ~ 1e-5 per step
    # in a direction set by noise in both engines. It is checked separately: it must stay within
    # 10 steps x lr x 1e-2 of its initial value in both, which bounds the difference as well.
    initial, _ = read_safetensors(os.path.join(odd["model"], "model.safetensors"))
    c = odd["expected"]["config"]["model"]["n_embd"]
    worst_name, worst = None, 0.0
    for name, ref in odd["final"].items():
        got = np.array(trainer._native.tensor("param", name))
        assert got.shape == ref.shape, name
        checksum = exp["final_weights_checksum"][name]
        assert np.isclose(float(got.sum(dtype=np.float64)), checksum, rtol=1e-3, atol=1e-3), name
        if name.endswith("attn.c_attn.bias"):
            key = slice(c, 2 * c)
            bound = 10 * 3e-3 * 1e-2
            assert np.abs(ref[key] - initial[name][key]).max() <= bound, name
            assert np.abs(got[key] - initial[name][key]).max() <= bound, name
            got, ref = np.delete(got, np.s_[c:2 * c]), np.delete(ref, np.s_[c:2 * c])
        err = float(np.abs(got - ref).max() / np.abs(ref).max())
        if err > worst:
            worst_name, worst = name, err
    assert worst <= 1e-3, f"worst final-weight error {worst:.3g} (x max|ref|) in {worst_name}"


def test_gradient_accumulation_matches_torch(odd):
    exp = odd["expected"]
    trainer = odd_trainer(odd, micro_batch_size=2)  # micro-batches of rows [0:2] and [2:3]
    losses, norms = [], []
    for k in range(10):
        losses.append(trainer.step(odd["inputs"][k], odd["targets"][k]))
        norms.append(trainer.last_grad_norm)
    assert rel_err(losses, exp["accum_losses"]).max() <= 1e-4, (losses, exp["accum_losses"])
    assert rel_err(norms, exp["accum_grad_norms"]).max() <= 1e-4, (norms, exp["accum_grad_norms"])


def test_warmup_cosine_schedule_matches_torch(odd):
    exp = odd["expected"]
    trainer = odd_trainer(odd, schedule=llamas.WarmupCosine(3, 10, 0.1))
    losses, lrs, norms = [], [], []
    for k in range(10):
        assert trainer.lr_at(k) == pytest.approx(exp["schedule_lrs"][k], rel=1e-12)
        losses.append(trainer.step(odd["inputs"][k], odd["targets"][k]))
        lrs.append(trainer.last_lr)
        norms.append(trainer.last_grad_norm)
    assert rel_err(lrs, exp["schedule_lrs"]).max() <= 1e-12, (lrs, exp["schedule_lrs"])
    assert rel_err(losses, exp["schedule_losses"]).max() <= 1e-4, (losses, exp["schedule_losses"])
    assert rel_err(norms, exp["schedule_grad_norms"]).max() <= 1e-4
    sched = llamas.WarmupCosine(3, 10, 0.1)
    assert sched(10) == sched(50) == 0.1 and "WarmupCosine" in repr(sched)


# -- determinism ----------------------------------------------------------------------------------
def test_create_is_deterministic_per_seed():
    cfg = tiny_config()
    a = dict(llamas.create(cfg, seed=5)._native.named_weights())
    b = dict(llamas.create(cfg, seed=5)._native.named_weights())
    c = dict(llamas.create(cfg, seed=6)._native.named_weights())
    assert list(a) == list(b) == list(c)
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    assert any(not np.array_equal(a[n], c[n]) for n in a)
    assert not np.array_equal(a["transformer.wte.weight"], c["transformer.wte.weight"])
    # GPT-2 init: normal(0, 0.02) matrices, unit layernorm scales, zero biases
    wte = a["transformer.wte.weight"]
    assert wte.dtype == np.float32 and 0.015 < wte.std() < 0.025
    assert np.all(a["transformer.h.0.ln_1.weight"] == 1) and np.all(a["transformer.h.0.attn.c_attn.bias"] == 0)
    # the config dict form gives the same model
    d = dict(llamas.create(cfg.to_hf_dict(), seed=5)._native.named_weights())
    assert all(np.array_equal(a[n], d[n]) for n in a)


def test_training_runs_are_bit_identical():
    def run():
        model = llamas.create(tiny_config(n_layer=2), seed=1)
        trainer = llamas.Trainer(model, lr=3e-3, schedule=llamas.WarmupCosine(2, 6), micro_batch_size=1)
        losses = [trainer.step(*random_batch(256, seed=s)) for s in range(6)]
        return losses, [trainer.last_grad_norm], params_copy(trainer)
    la, na, pa = run()
    lb, nb, pb = run()
    assert la == lb and na == nb
    assert all(np.array_equal(pa[n], pb[n]) for n in pa)


def test_training_is_identical_across_thread_counts():
    def run(threads):
        llamas.set_num_threads(threads)
        try:
            model = llamas.create(tiny_config(n_layer=2), seed=3)
            trainer = llamas.Trainer(model, lr=3e-3)
            return [trainer.step(*random_batch(256, b=3, seed=s)) for s in range(3)], params_copy(trainer)
        finally:
            llamas.set_num_threads(1)
    l1, p1 = run(1)
    l2, p2 = run(2)
    assert l1 == l2
    assert all(np.array_equal(p1[n], p2[n]) for n in p1)


# -- learning -------------------------------------------------------------------------------------
def test_loss_falls_on_a_repeated_batch():
    model = llamas.create(tiny_config(vocab_size=128, n_layer=2), seed=0)
    trainer = llamas.Trainer(model, lr=1e-2, weight_decay=0.0)
    x, y = random_batch(128, b=4, t=16, seed=3)
    losses = [trainer.step(x, y) for _ in range(30)]
    assert losses[0] == pytest.approx(np.log(128), rel=0.05)  # random init: about uniform
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(np.isfinite(losses))
    # evaluate agrees with the training loss on the same batch (no update in between)
    assert llamas.evaluate(model, [(x, y)]) == pytest.approx(trainer.step(x, y), rel=1e-5)
    assert trainer.evaluate([(x, y)] * 3, max_batches=1) == pytest.approx(llamas.evaluate(model, [(x, y)]), rel=1e-6)
    with pytest.raises(LlamasError, match="no batches"):
        llamas.evaluate(model, [])


# -- save / load ------------------------------------------------------------------------------------
def test_save_load_round_trip_with_tokenizer(tmp_path, tok):
    cfg = tiny_config(vocab_size=tok.vocab_size, n_layer=2, eos=tok.eos_token_id)
    model = llamas.create(cfg, seed=2, tokenizer=tok)
    trainer = llamas.Trainer(model, lr=1e-2)
    for s in range(3):
        trainer.step(*random_batch(cfg.vocab_size, seed=s))
    out = tmp_path / "saved"
    model.save(str(out))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["vocab_size"] == tok.vocab_size and config["n_layer"] == 2
    tensors, meta = read_safetensors(str(out / "model.safetensors"))
    assert meta == {"format": "pt"} and all(n.startswith("transformer.") for n in tensors)
    assert "lm_head.weight" not in tensors  # tied to wte

    loaded = llamas.load(str(out))
    assert loaded.tokenizer is not None and loaded.config.to_native() == model.config.to_native()
    ids = np.array([tok.encode("the quick brown fox jumps over a lazy dog")])
    assert np.array_equal(model.forward(ids), loaded.forward(ids))
    assert model.generate("the quick", max_new_tokens=8) == loaded.generate("the quick", max_new_tokens=8)
    assert model.generate([1, 2, 3], max_new_tokens=6) == loaded.generate([1, 2, 3], max_new_tokens=6)
    sampled = dict(max_new_tokens=6, temperature=0.9, top_p=0.9, seed=4)
    assert model.generate([5, 6], **sampled) == loaded.generate([5, 6], **sampled)
    # saving into an existing file path is refused
    (tmp_path / "file").write_text("x")
    with pytest.raises(LlamasError, match="not a folder"):
        model.save(str(tmp_path / "file"))


def test_save_without_tokenizer(tmp_path):
    model = llamas.create(tiny_config(), seed=0)
    model.save(str(tmp_path / "m"))
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    loaded = llamas.load(str(tmp_path / "m"))
    assert loaded.tokenizer is None
    ids = np.array([[1, 2, 3, 4]])
    assert np.array_equal(model.forward(ids), loaded.forward(ids))


def test_saved_model_loads_in_transformers(tmp_path, tok):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    cfg = tiny_config(vocab_size=tok.vocab_size, n_layer=2, eos=tok.eos_token_id)
    model = llamas.create(cfg, seed=7, tokenizer=tok)
    trainer = llamas.Trainer(model, lr=1e-2)
    for s in range(2):  # trained weights, so biases and layernorms are not at their init values
        trainer.step(*random_batch(cfg.vocab_size, seed=s))
    model.save(str(tmp_path / "m"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "m")).eval()
    ids = np.array([tok.encode("the quick brown fox jumps over a lazy dog")[:20]])
    ours = model.forward(ids)
    with torch.no_grad():
        theirs = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    scale = float(np.abs(theirs).max())
    err = float(np.abs(ours - theirs).max())
    assert err <= 1e-4 * scale, f"max |llamas - transformers| = {err:.3g}, logit scale {scale:.3g}"


def test_generate_uses_trained_weights(tmp_path):
    model = llamas.create(tiny_config(vocab_size=64, n_layer=2), seed=0)
    prompt = [[3, 1, 4, 1, 5]]
    before = model.forward(prompt)
    first = model.generate(prompt[0], max_new_tokens=4)
    trainer = llamas.Trainer(model, lr=3e-2, weight_decay=0.0)
    # teach it to continue with token 9 everywhere
    x = np.tile(np.arange(16) % 64, (2, 1))
    y = np.full_like(x, 9)
    for _ in range(10):
        trainer.step(x, y)
    after = model.forward(prompt)
    assert not np.allclose(before, after)
    out = model.generate(prompt[0], max_new_tokens=4)
    assert out == [9, 9, 9, 9] and out != first
    assert int(np.argmax(after[0, -1])) == out[0]
    model.save(str(tmp_path / "m"))
    assert llamas.load(str(tmp_path / "m")).generate(prompt[0], max_new_tokens=4) == out


# -- bad input ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_trainer():
    return llamas.Trainer(llamas.create(tiny_config(vocab_size=100, n_positions=16), seed=0))


@pytest.mark.parametrize("inputs, targets, match", [
    (np.zeros((2, 8), int), np.zeros((2, 7), int), r"same shape"),
    (np.zeros(8, int), np.zeros(8, int), r"2-D"),
    (np.zeros((2, 0), int), np.zeros((2, 0), int), r"non-empty"),
    (np.zeros((2, 8), np.float32), np.zeros((2, 8), int), r"integer"),
    (np.zeros((2, 8), int), np.full((2, 8), 100), r"token id 100\b"),
    (np.zeros((2, 8), int), np.full((2, 8), -1), r"token id -1\b.*not -100"),
    (np.zeros((2, 8), int), np.full((2, 8), -100), r"every target is -100"),
    (np.full((2, 8), 123), np.zeros((2, 8), int), r"inputs contain token id 123\b"),
    (np.zeros((1, 17), int), np.zeros((1, 17), int), r"sequence length 17 exceeds the model's context 16"),
])
def test_bad_batches_are_refused(small_trainer, inputs, targets, match):
    before = params_copy(small_trainer)
    steps = small_trainer.steps_done
    for call in (small_trainer.step, small_trainer.compute_gradients):
        with pytest.raises(LlamasError, match=match):
            call(inputs, targets)
    with pytest.raises(LlamasError, match=match):
        llamas.evaluate(small_trainer.model, [(inputs, targets)])
    assert small_trainer.steps_done == steps
    after = params_copy(small_trainer)
    assert all(np.array_equal(before[n], after[n]) for n in before)


def test_ignored_targets_are_left_out_of_the_loss_and_the_gradient():
    # -100 (PyTorch's ignore_index): padding, or a prompt's tokens in supervised fine-tuning.
    model = llamas.create(tiny_config(vocab_size=100, n_positions=16), seed=3)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 100, (3, 16)).astype(np.int32)
    y = rng.integers(0, 100, (3, 16)).astype(np.int32)
    y[0, :9] = -100
    y[2, 11:] = -100
    kept = y != -100
    logits = model.forward(x).reshape(-1, 100)
    per_token, _ = llamas._C.ops.cross_entropy(logits, np.where(kept, y, 0).reshape(-1), 0.0)
    expected = float(per_token[kept.reshape(-1)].astype(np.float64).mean())
    assert llamas.evaluate(model, [(x, y)]) == pytest.approx(expected, rel=1e-6)
    full = llamas.Trainer(model, micro_batch_size=3)
    assert full.compute_gradients(x, y) == pytest.approx(expected, rel=1e-6)
    grads = {n: full.gradient(n).copy() for n, *_ in full._native.params()}
    # micro-batches of one row each: the same mean over the step's kept targets, the same gradient
    split = llamas.Trainer(llamas.create(tiny_config(vocab_size=100, n_positions=16), seed=3), micro_batch_size=1)
    assert split.step(x, y) == pytest.approx(expected, rel=1e-6)
    for n, g in grads.items():
        np.testing.assert_allclose(split.gradient(n), g, rtol=1e-4, atol=1e-7, err_msg=n)
    # an ignored row's logits get no gradient: rows of all -100 change nothing
    lone = llamas.Trainer(llamas.create(tiny_config(vocab_size=100, n_positions=16), seed=3))
    y_masked = y.copy()
    y_masked[1] = -100
    a = lone.compute_gradients(x[[0, 2]], y[[0, 2]])
    ga = {n: lone.gradient(n).copy() for n in grads}
    lone2 = llamas.Trainer(llamas.create(tiny_config(vocab_size=100, n_positions=16), seed=3))
    b = lone2.compute_gradients(x, y_masked)
    assert a == pytest.approx(b, rel=1e-6)
    for n in grads:
        np.testing.assert_allclose(lone2.gradient(n), ga[n], rtol=1e-4, atol=1e-7, err_msg=n)


def test_trainer_refuses_bfloat16_model(odd):
    model = llamas.load(odd["model"], dtype="bfloat16")
    with pytest.raises(LlamasError, match="float32"):
        llamas.Trainer(model)
    with pytest.raises(LlamasError, match="llamas.Model"):
        llamas.Trainer("not a model")


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1e-3), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(lr=float("inf")), "lr"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(betas=(-0.1, 0.9)), "betas"),
    (dict(betas=(0.9,)), "betas"),
    (dict(eps=0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(grad_clip=-1), "grad_clip"),
    (dict(micro_batch_size=0), "micro_batch_size"),
    (dict(micro_batch_size=1.5), "micro_batch_size"),
    (dict(schedule=3), "schedule"),
])
def test_bad_hyper_parameters(kwargs, match):
    model = llamas.create(tiny_config(), seed=0)
    with pytest.raises(LlamasError, match=match):
        llamas.Trainer(model, **kwargs)


def test_bad_schedules():
    for args in ((5, 3), (-1, 3), (0, 0)):
        with pytest.raises(LlamasError, match="warmup_steps"):
            llamas.WarmupCosine(*args)
    with pytest.raises(LlamasError, match="min_ratio"):
        llamas.WarmupCosine(1, 3, 1.5)
    trainer = llamas.Trainer(llamas.create(tiny_config(), seed=0), schedule=lambda s: float("nan"))
    with pytest.raises(LlamasError, match="schedule returned nan at step 0"):
        trainer.step(*random_batch(256))
    assert trainer.steps_done == 0


@pytest.mark.parametrize("config, match", [
    (dict(vocab_size=0, n_embd=32, n_head=2, n_layer=1), "vocab_size"),
    (dict(vocab_size=64, n_embd=30, n_head=4, n_layer=1), "divisible"),
    (dict(vocab_size=64, n_embd=32, n_head=2, n_layer=-1), "n_layer"),
    (dict(vocab_size="big", n_embd=32, n_head=2, n_layer=1), "vocab_size"),
    (dict(vocab_size=64, n_embd=32, n_head=2, n_layer=1, activation_function="relu"), "activation_function"),
    (dict(model_type="llama", vocab_size=64), "model_type"),
])
def test_create_refuses_bad_config(config, match):
    with pytest.raises(LlamasError, match=match):
        llamas.create(config)


def test_create_refuses_bad_seed_and_type():
    for seed in (-1, 1.5, True, "0"):
        with pytest.raises(LlamasError, match="seed"):
            llamas.create(tiny_config(), seed=seed)
    with pytest.raises(LlamasError, match="GPT2Config or a dict"):
        llamas.create([1, 2, 3])


def test_nan_weight_stops_the_step_without_updating():
    model = llamas.create(tiny_config(), seed=0)
    trainer = llamas.Trainer(model, lr=1e-3)
    x, y = random_batch(256)
    trainer.step(x, y)
    trainer._native.tensor("param", "transformer.wte.weight")[x[0, 0], 4] = np.nan
    before = {kind: params_copy(trainer, kind) for kind in ("param", "exp_avg", "exp_avg_sq")}
    with pytest.raises(LlamasError, match=r"step 2\b.*not updated"):
        trainer.step(x, y)
    assert trainer.steps_done == 1
    for kind, tensors in before.items():
        after = params_copy(trainer, kind)
        for name in tensors:
            assert np.array_equal(tensors[name], after[name], equal_nan=True), (kind, name)
    # only the poisoned entry is NaN
    assert int(np.isnan(trainer._native.tensor("param", "transformer.wte.weight")).sum()) == 1


# -- safetensors_io ------------------------------------------------------------------------------------
def test_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "bf16": rng.integers(0, 2**16, (4, 2), dtype=np.uint16),
        "ids": np.arange(7, dtype=np.int64),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "f16": rng.standard_normal(5).astype(np.float16),
        "i32": np.array([[-1, 2]], np.int32),
        "transposed": rng.standard_normal((4, 6)).astype(np.float32).T,  # not C-contiguous
    }
    path = str(tmp_path / "t.safetensors")
    write_safetensors(path, tensors, {"format": "pt", "step": 3})
    got, meta = read_safetensors(path)
    assert meta == {"format": "pt", "step": "3"}
    assert list(got) == list(tensors)
    for name, ref in tensors.items():
        assert got[name].dtype == ref.dtype and got[name].shape == ref.shape, name
        assert np.array_equal(got[name], ref), name
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    assert n % 8 == 0 and header["bf16"]["dtype"] == "BF16" and header["a.weight"]["dtype"] == "F32"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    with pytest.raises(LlamasError, match="unsupported dtype"):
        write_safetensors(str(tmp_path / "bad.safetensors"), {"x": np.zeros(2, np.complex64)})
    assert not os.path.exists(tmp_path / "bad.safetensors")


def test_safetensors_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "t.safetensors")
    write_safetensors(path, {"x": np.ones(4, np.float32)})

    def boom(tmp):
        assert os.path.exists(tmp) and os.path.dirname(tmp) == str(tmp_path)
        raise RuntimeError("simulated crash")
    monkeypatch.setattr(safetensors_io, "_before_replace_hook", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_safetensors(path, {"x": np.zeros(4, np.float32)})
    assert os.listdir(tmp_path) == ["t.safetensors"]
    assert np.array_equal(read_safetensors(path)[0]["x"], np.ones(4, np.float32))


def st_bytes(header: bytes, data_bytes: int = 0) -> bytes:
    """A raw safetensors file: header length, header, zero data."""
    return struct.pack("<Q", len(header)) + header + b"\0" * data_bytes


def test_safetensors_bad_files_name_the_path(tmp_path):
    good = str(tmp_path / "good.safetensors")
    write_safetensors(good, {"x": np.arange(64, dtype=np.float32)})
    raw = open(good, "rb").read()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[:-10])
    with pytest.raises(LlamasError, match="truncated") as e:
        read_safetensors(str(truncated))
    assert str(truncated) in str(e.value)

    for name, content, match in [
        ("short.safetensors", raw[:5], "truncated"),
        ("empty.safetensors", b"", "truncated"),
        ("garbage.safetensors", struct.pack("<Q", 16) + b"\xff{not json!!}\x00\x01" + b"\0" * 32, "not valid JSON"),
        ("huge_header.safetensors", struct.pack("<Q", 1 << 40) + b"{}", "header length"),
        ("list_header.safetensors", struct.pack("<Q", 8) + b"[1, 2]  ", "JSON object"),
        ("bad_entry.safetensors", st_bytes(b'{"x": {"dtype": "F32"}}'), "malformed"),
        ("bad_dtype.safetensors", st_bytes(b'{"x":{"dtype":"Q9","shape":[1],"data_offsets":[0,4]}}', 4),
         "unsupported"),
        ("bad_offsets.safetensors", st_bytes(b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', 8),
         "needs bytes"),
        ("past_end.safetensors", st_bytes(b'{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', 8),
         "needs bytes"),
    ]:
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(LlamasError, match=match) as e:
            read_safetensors(str(p))
        assert str(p) in str(e.value), name

    missing = str(tmp_path / "missing.safetensors")
    with pytest.raises(LlamasError, match="not found") as e:
        read_safetensors(missing)
    assert missing in str(e.value)
