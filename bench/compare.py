"""llamas vs numpy / PyTorch eager / transformers on CPU, all in one run at one thread count.

    PYTHONPATH=python python bench/compare.py [--threads 2] [--quick] [--model DIR]

Prints markdown tables:
  a. machine limits: memory read bandwidth (GB/s) and the best numpy sgemm GFLOP/s seen;
  b. GEMM GFLOP/s, llamas.ops.matmul (B packed per call) and llamas.ops.linear on B packed once
     (llamas.ops.pack: the layout a loaded model holds its weights in) vs numpy (OpenBLAS) a @ b;
  c. GPT-2 124M (random weights unless --model): prefill-512 and batch-1 decode tokens/s for
     llamas float32 / bfloat16, a plain PyTorch eager GPT-2 with a KV cache, and transformers
     GPT2LMHeadModel.generate; decode as % of the memory-bandwidth bound;
and the performance targets, each marked met / not met.
"""
from __future__ import annotations

import argparse
import os
import sys

# ---- thread counts must be fixed before numpy (OpenBLAS) / torch (OpenMP, MKL) are imported ----
_ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
_ap.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
_ap.add_argument("--quick", action="store_true", help="fewer reps and decode tokens (smoke run)")
_ap.add_argument("--model", default=None, help="GPT-2 folder (default: random 124M weights in a temp dir)")
_ap.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
_ap.add_argument("--wait-quiet", type=float, default=None, metavar="S",
                 help="before each section wait up to S seconds for other processes to leave the CPUs "
                      "(default 30, 0 with --quick)")
ARGS = _ap.parse_args()
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(ARGS.threads)

import gc  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import md_table, median, read_safetensors  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import llamas  # noqa: E402

torch.set_num_threads(ARGS.threads)
llamas.set_num_threads(ARGS.threads)

QUICK = ARGS.quick
WAIT_QUIET = ARGS.wait_quiet if ARGS.wait_quiet is not None else (0.0 if ARGS.quick else 30.0)
PROMPT_LEN = 512
DECODE_TOKENS = 32 if QUICK else 128
PREFILL_REPS = 1 if QUICK else 3          # timed prefills per engine (after one warm-up)
DECODE_REPS = 1 if QUICK else 2           # of those, how many are followed by a timed decode
BASE_PREFILL_REPS = 1 if QUICK else 2     # the same for the (slower) PyTorch / transformers baselines
BASE_DECODE_REPS = 1
GEMM_REPS = 3 if QUICK else 5
GEMM_ROUNDS = 1 if QUICK else 3           # engine blocks per shape (each GEMM_REPS timed calls)
GEMM_SHAPES = [(256, 768, 2304), (256, 768, 3072), (256, 3072, 768), (1, 768, 3072), (256, 768, 50257)]

NOTES: list[str] = []       # problems and check results, printed at the end
PEAK_GEMM = [0.0]           # best numpy sgemm GFLOP/s seen anywhere


def note(msg: str) -> None:
    NOTES.append(msg)
    print(f"  [note] {msg}", file=sys.stderr, flush=True)


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def settle(quick: bool = False) -> None:
    """Lets spinning worker threads of the previous engine (OpenBLAS, OpenMP) go to sleep
    before the next engine is timed: on a 2-core box they would otherwise steal a core. Then,
    unless quick, with --wait-quiet, waits a while for other processes to leave the CPUs."""
    gc.collect()
    time.sleep(0.3)
    if WAIT_QUIET > 0 and not quick:
        deadline = time.perf_counter() + WAIT_QUIET
        load = other_load_now(0.5)
        while load > 0.2 and time.perf_counter() < deadline:
            load = other_load_now(1.0)
        if load > 0.2:
            log(f"other processes still use {load:.1f} CPU cores after waiting {WAIT_QUIET:.0f} s; measuring anyway")


def _cpu_ticks():
    """(busy ticks of the whole machine, ticks of this process)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]               # minus idle and iowait; no guest
    with open("/proc/self/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return busy, int(parts[11]) + int(parts[12])                 # utime + stime


class OtherLoad:
    """CPU cores used by OTHER processes while a measurement ran (a busy box makes every
    multi-threaded number here unreliable, spin-waiting thread pools most)."""

    def __init__(self):
        try:
            self.hz = os.sysconf("SC_CLK_TCK")
            self.t0, (self.b0, self.o0) = time.perf_counter(), _cpu_ticks()
        except (OSError, ValueError, IndexError):
            self.hz = None

    def stop(self) -> float:
        if self.hz is None:
            return float("nan")
        b1, o1 = _cpu_ticks()
        dt = time.perf_counter() - self.t0
        return max(0.0, ((b1 - self.b0) - (o1 - self.o0)) / self.hz / max(dt, 1e-9))


def other_load_now(seconds: float = 1.0) -> float:
    m = OtherLoad()
    time.sleep(seconds)
    return m.stop()


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def mark(ok: bool) -> str:
    return "met" if ok else "NOT met"


# ================================================================================================
# a. machine limits
# ================================================================================================
def machine_limits() -> dict:
    log("machine limits")
    n = (1 << 30) // 4                     # 1 GiB of float32
    reps = 3 if QUICK else 6
    buf = np.ones(n, dtype=np.float32)     # touched, so no page faults in the timing
    np_times, th_times = [], []
    tbuf = torch.from_numpy(buf)
    for _ in range(reps):                  # interleave to share the noise
        t0 = time.perf_counter(); np.add.reduce(buf); np_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); tbuf.sum(); th_times.append(time.perf_counter() - t0)
    bw_np = buf.nbytes / min(np_times) / 1e9
    bw_th = buf.nbytes / min(th_times) / 1e9
    del tbuf, buf
    gc.collect()

    # peak sgemm: a square 2048^3 numpy GEMM (the GEMM table also feeds PEAK_GEMM)
    s = 2048
    a = np.random.default_rng(1).standard_normal((s, s), dtype=np.float32)
    b = np.random.default_rng(2).standard_normal((s, s), dtype=np.float32)
    a @ b
    best = min(_time_once(lambda: a @ b) for _ in range(2 if QUICK else 4))
    sq = 2 * s ** 3 / best / 1e9
    PEAK_GEMM[0] = max(PEAK_GEMM[0], sq)
    return {"bw_numpy": bw_np, "bw_torch": bw_th, "bw": max(bw_np, bw_th), "sgemm_square": sq}


def _time_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ================================================================================================
# b. GEMM
# ================================================================================================
def gemm_table() -> list:
    log("GEMM")
    rows = []
    rng = np.random.default_rng(0)
    for (m, k, n) in GEMM_SHAPES:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        ref = a @ b
        try:
            out = llamas.ops.matmul(a, b)
            err = rel_err(out, ref)
            if out.shape != ref.shape or not err < 1e-4:
                note(f"GEMM {m}x{k}x{n}: llamas result differs from numpy (shape {out.shape}, rel err {err:.2e})")
        except Exception as e:  # noqa: BLE001
            note(f"GEMM {m}x{k}x{n}: llamas.ops.matmul raised {type(e).__name__}: {e}")
            rows.append(((m, k, n), float("nan"), float("nan"), float("nan"), float("nan")))
            continue
        packed = llamas.ops.pack(b)
        if not np.array_equal(llamas.ops.linear(a, packed), out):
            note(f"GEMM {m}x{k}x{n}: prepacked result differs from llamas.ops.matmul")
        flops = 2.0 * m * k * n
        big = flops > 5e9
        reps = max(2, GEMM_REPS // 2) if big else GEMM_REPS
        inner = 1 if flops > 1e8 else max(1, int(1e8 / flops))     # tiny shapes: loop inside the timer
        f_l = lambda: [llamas.ops.matmul(a, b) for _ in range(inner)]
        f_p = lambda: [llamas.ops.linear(a, packed) for _ in range(inner)]
        f_n = lambda: [a @ b for _ in range(inner)]
        tl, tp, tn = [], [], []
        # Each engine runs a block of reps after settle(): OpenBLAS's workers spin for ~0.1 s
        # after a call, so a llamas call right after a numpy one ran on one core (interleaving
        # call by call measured llamas at 0.55-0.6x where blocks give 0.85-0.9x). Rounds
        # alternate the engines so that drift hits all of them.
        for _ in range(GEMM_ROUNDS):
            for f, times in ((f_n, tn), (f_l, tl), (f_p, tp)):
                settle(quick=True)
                f()                         # warm-up: the pool wakes, B is touched
                times.extend(_time_once(f) / inner for _ in range(reps))
        g_l, g_p, g_n = (flops / median(t) / 1e9 for t in (tl, tp, tn))
        PEAK_GEMM[0] = max(PEAK_GEMM[0], flops / min(tn) / 1e9)
        rows.append(((m, k, n), g_l, g_p, g_n, err))
        settle()
    return rows


# ================================================================================================
# c. GPT-2: PyTorch eager reference implementation
# ================================================================================================
class TorchGPT2(torch.nn.Module):
    """Plain eager GPT-2: pre-LN blocks, tanh GELU, tied lm_head, Conv1D (in, out) weights
    (y = x @ W + b), KV cache kept as concatenated (B, H, T, D) tensors.

    tuned=True is a stronger eager baseline with the same math: a preallocated KV cache written
    in place (no torch.cat per step), matmul-softmax-matmul attention for the one-token decode
    step, and a pre-transposed (C, V) copy of wte for the lm_head GEMV."""

    def __init__(self, weights: dict, n_layer: int, n_head: int, eps: float, tuned: bool = False):
        super().__init__()
        self.n_layer, self.n_head, self.eps, self.tuned = n_layer, n_head, eps, tuned

        def t(name):
            return torch.from_numpy(np.array(weights[name], dtype=np.float32))   # a private copy

        self.register_buffer("wte", t("transformer.wte.weight"))
        self.register_buffer("wpe", t("transformer.wpe.weight"))
        self.register_buffer("lnf_w", t("transformer.ln_f.weight"))
        self.register_buffer("lnf_b", t("transformer.ln_f.bias"))
        if tuned:
            self.register_buffer("wte_t", self.wte.t().contiguous())
        self.n_embd = self.wte.shape[1]
        self.n_positions = self.wpe.shape[0]
        self.layers = []
        for i in range(n_layer):
            p = f"transformer.h.{i}."
            names = {"ln1_w": "ln_1.weight", "ln1_b": "ln_1.bias", "attn_w": "attn.c_attn.weight",
                     "attn_b": "attn.c_attn.bias", "proj_w": "attn.c_proj.weight", "proj_b": "attn.c_proj.bias",
                     "ln2_w": "ln_2.weight", "ln2_b": "ln_2.bias", "fc_w": "mlp.c_fc.weight",
                     "fc_b": "mlp.c_fc.bias", "mproj_w": "mlp.c_proj.weight", "mproj_b": "mlp.c_proj.bias"}
            layer = {}
            for key, suffix in names.items():
                buf = t(p + suffix)
                self.register_buffer(f"h{i}_{key}", buf)
                layer[key] = buf
            self.layers.append(layer)

    def _attend(self, i: int, q, k, v, cache, past: int):
        """Returns (attention output (B, H, T, D), this layer's cache entry)."""
        T = q.shape[2]
        if not self.tuned:
            if cache is not None:
                k = torch.cat([cache[i][0], k], dim=2)
                v = torch.cat([cache[i][1], v], dim=2)
            # a fresh prompt is causal; a decode step (T == 1) sees every cached position
            return F.scaled_dot_product_attention(q, k, v, is_causal=(cache is None and T > 1)), (k, v)
        kbuf, vbuf = cache[i]
        kbuf[:, :, past:past + T] = k
        vbuf[:, :, past:past + T] = v
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            assert T == 1, "tuned eager model: decode one token at a time after the prompt"
            kk, vv = kbuf[:, :, :past + 1], vbuf[:, :, :past + 1]
            s = torch.matmul(q, kk.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
            y = torch.matmul(torch.softmax(s, dim=-1), vv)
        return y, (kbuf, vbuf)

    def forward(self, ids: torch.Tensor, cache=None, last_only: bool = True):
        """ids (B, T) -> (logits, new cache). logits are (B, V) for the last position when
        last_only, else (B, T, V). Tuned mode: cache is ([(kbuf, vbuf)] * n_layer, length)."""
        B, T = ids.shape
        C, H = self.n_embd, self.n_head
        D = C // H
        if self.tuned:
            if cache is None:
                shape = (B, H, self.n_positions, D)
                cache = ([(torch.empty(shape), torch.empty(shape)) for _ in range(self.n_layer)], 0)
            layers_cache, past = cache
        else:
            layers_cache, past = cache, (0 if cache is None else cache[0][0].shape[2])
        x = self.wte[ids] + self.wpe[past:past + T]
        new_cache = []
        for i, L in enumerate(self.layers):
            h = F.layer_norm(x, (C,), L["ln1_w"], L["ln1_b"], self.eps)
            qkv = torch.addmm(L["attn_b"], h.view(B * T, C), L["attn_w"]).view(B, T, 3, H, D)
            q, k, v = (z.transpose(1, 2) for z in qkv.unbind(2))
            y, entry = self._attend(i, q, k, v, layers_cache, past)
            new_cache.append(entry)
            y = y.transpose(1, 2).reshape(B * T, C)
            x = x + torch.addmm(L["proj_b"], y, L["proj_w"]).view(B, T, C)
            h = F.layer_norm(x, (C,), L["ln2_w"], L["ln2_b"], self.eps)
            h = F.gelu(torch.addmm(L["fc_b"], h.view(B * T, C), L["fc_w"]), approximate="tanh")
            x = x + torch.addmm(L["mproj_b"], h, L["mproj_w"]).view(B, T, C)
        if last_only:
            x = x[:, -1]
        x = F.layer_norm(x, (C,), self.lnf_w, self.lnf_b, self.eps)
        logits = torch.matmul(x, self.wte_t) if self.tuned else F.linear(x, self.wte)
        return logits, ((new_cache, past + T) if self.tuned else new_cache)


# ================================================================================================
# c. GPT-2 runs
# ================================================================================================
def summarize(pre_t: list, steps: list, dec_totals: list, n_decode: int) -> dict:
    """prefill tok/s from the best prompt run; decode tok/s from the median single-step time
    (robust to bursts from other processes on this small box) and, for reference, from the
    mean over whole decode runs."""
    return {"prefill": PROMPT_LEN / min(pre_t), "prefill_median": PROMPT_LEN / median(pre_t),
            "decode": 1.0 / median(steps), "decode_mean": n_decode / median(dec_totals) if dec_totals else float("nan"),
            "step_ms": 1e3 * median(steps)}


def run_llamas(path: str, dtype: str, prompt: list[int]) -> dict:
    log(f"llamas {dtype}")
    m = llamas.load(path, dtype=dtype)
    native_cfg = m.config.to_native()

    def one(decode: int):
        seq = llamas._C.Sequence(native_cfg, seed=0)     # temperature 0: greedy
        steps = []
        try:
            t0 = time.perf_counter()
            tok = m._native.step([(seq, prompt, True)])[0]
            pre = time.perf_counter() - t0
            toks = [tok]
            for _ in range(decode):
                t0 = time.perf_counter()
                tok = m._native.step([(seq, [tok], True)])[0]
                steps.append(time.perf_counter() - t0)
                toks.append(tok)
            if seq.length != len(prompt) + decode:
                note(f"llamas {dtype}: sequence length {seq.length} after {len(prompt)}+{decode} tokens "
                     f"(expected {len(prompt) + decode})")
        finally:
            seq.release()
        return pre, steps, toks

    one(8)                                                # warm-up (pages the weights in)
    meter = OtherLoad()
    res, toks = repeat_runs(one, PREFILL_REPS, DECODE_REPS, f"llamas {dtype}")
    res.update(tokens=toks, weight_bytes=m.weight_bytes, model=m, other_load=meter.stop())
    return res


def repeat_runs(one, prefill_reps: int, decode_reps: int, label: str):
    """Runs one(decode_tokens) prefill_reps times (the first decode_reps of them also decode),
    notes when two identical greedy runs disagree, and summarises the timings."""
    pre_t, steps, totals, toks = [], [], [], None
    for r in range(prefill_reps):
        d = DECODE_TOKENS if r < decode_reps else 0
        pre, st, tk = one(d)
        pre_t.append(pre)
        if d:
            steps += st
            totals.append(sum(st))
            if toks is not None and tk != toks:
                note(f"{label}: greedy output differs between two identical runs")
            toks = tk
    return summarize(pre_t, steps, totals, DECODE_TOKENS), toks


def run_torch_eager(model: TorchGPT2, prompt: list[int]) -> dict:
    log("PyTorch eager" + (" (tuned)" if model.tuned else ""))
    ids = torch.tensor([prompt], dtype=torch.long)

    def one(decode: int):
        steps = []
        with torch.inference_mode():
            t0 = time.perf_counter()
            logits, cache = model(ids)
            tok = int(logits[0].argmax())
            pre = time.perf_counter() - t0
            toks = [tok]
            for _ in range(decode):
                t0 = time.perf_counter()
                logits, cache = model(torch.tensor([[tok]], dtype=torch.long), cache)
                tok = int(logits[0].argmax())
                steps.append(time.perf_counter() - t0)
                toks.append(tok)
        return pre, steps, toks

    one(8)
    meter = OtherLoad()
    res, toks = repeat_runs(one, BASE_PREFILL_REPS, BASE_DECODE_REPS, "PyTorch eager")
    res.update(tokens=toks, other_load=meter.stop())
    return res


def run_hf(hf, prompt: list[int]) -> dict:
    log("transformers")
    import transformers
    ids = torch.tensor([prompt], dtype=torch.long)
    mask = torch.ones_like(ids)
    gen_kw = dict(attention_mask=mask, do_sample=False, pad_token_id=50256)

    class StepClock(transformers.LogitsProcessor):
        """Called once per generated token, right after that step's forward: the gaps between
        calls are the decode steps (forward + generate's own per-token work)."""
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    def forward():
        try:
            return hf(ids, use_cache=True, logits_to_keep=1)
        except TypeError:
            return hf(ids, use_cache=True)

    with torch.inference_mode():
        forward()
        hf.generate(ids, max_new_tokens=2, min_new_tokens=2, **gen_kw)          # warm-up
        meter = OtherLoad()
        pre_t = [_time_once(forward) for _ in range(BASE_PREFILL_REPS)]
        t1 = [_time_once(lambda: hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **gen_kw))
              for _ in range(BASE_PREFILL_REPS)]
        n = DECODE_TOKENS
        tn, steps, out = [], [], None
        for _ in range(BASE_DECODE_REPS):
            clock = StepClock()
            t0 = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n,
                              logits_processor=transformers.LogitsProcessorList([clock]), **gen_kw)
            tn.append(time.perf_counter() - t0)
            steps += [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
        other = meter.stop()
    gen = out[0, len(prompt):].tolist()
    if len(gen) != n:
        note(f"transformers generate returned {len(gen)} new tokens, asked for {n}")
    # generate(n) = prefill (gives token 1) + n-1 decode steps; generate(1) = prefill alone
    dec_time = median(tn) - median(t1)
    res = summarize(pre_t, steps, [dec_time * n / (n - 1)], n)
    res.update(tokens=gen, other_load=other,
               generate1_prefill=PROMPT_LEN / median(t1))
    return res


def bytes_per_token(weights: dict, dtype: str) -> int:
    """Weight bytes one batch-1 decode step has to read: every matrix (incl. wte for the tied
    lm_head) in the compute dtype, every vector in float32; wpe contributes one row only."""
    mat_bytes = 2 if dtype == "bfloat16" else 4
    total = 0
    for name, a in weights.items():
        if name == "transformer.wpe.weight":
            total += a.shape[1] * 4
        elif a.ndim == 2:
            total += a.size * mat_bytes
        else:
            total += a.size * 4
    return total


def check_agreement(eager: TorchGPT2, llm: dict, prompt: list[int]) -> None:
    """Logits of llamas (both dtypes) and transformers against the eager reference."""
    ids = prompt[:64]
    with torch.inference_mode():
        ref = eager(torch.tensor([ids]), last_only=False)[0][0].numpy()
    for dtype, r in llm.items():
        try:
            got = r["model"].forward(np.array([ids], dtype=np.int32))[0]
            err = rel_err(got, ref)
            same = int((got.argmax(-1) == ref.argmax(-1)).sum())
            tol = 1e-4 if dtype == "float32" else 3e-2
            msg = f"llamas {dtype} forward(64 tokens) vs PyTorch eager: logits rel err {err:.2e}, argmax equal at {same}/64 positions"
            note(msg + ("" if err < tol else f"  <-- above tolerance {tol:g}"))
        except Exception as e:  # noqa: BLE001
            note(f"llamas {dtype} forward raised {type(e).__name__}: {e}")


def compare_tokens(name: str, toks: list, ref: list, k: int = 16) -> None:
    a, b = toks[:k], ref[:k]
    if a == b:
        note(f"{name}: first {len(a)} greedy tokens equal to PyTorch eager ({a[:4]}...)")
    else:
        i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        note(f"{name}: greedy tokens differ from PyTorch eager at position {i}: {a[:i + 2]} vs {b[:i + 2]}")


def model_section(path: str, limits: dict) -> tuple[list, dict]:
    import json
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    n_layer, n_head = cfg["n_layer"], cfg["n_head"]
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    weights = read_safetensors(os.path.join(path, "model.safetensors"))
    weights = {k: v for k, v in weights.items() if not k.startswith("lm_head")}
    vocab = weights["transformer.wte.weight"].shape[0]
    prompt = [int(x) for x in np.random.default_rng(123).integers(0, min(vocab, 50256), PROMPT_LEN)]

    results = {}
    llm = {}
    for dtype in ("float32", "bfloat16"):
        try:
            llm[dtype] = run_llamas(path, dtype, prompt)
            results[("llamas", dtype)] = llm[dtype]
        except Exception as e:  # noqa: BLE001
            note(f"llamas {dtype} failed: {type(e).__name__}: {e}")
            traceback.print_exc()
        settle()

    eager = TorchGPT2(weights, n_layer, n_head, eps).eval()
    check_agreement(eager, llm, prompt)
    for r in llm.values():
        r.pop("model", None)
    gc.collect()
    settle()
    results[("PyTorch eager", "float32")] = run_torch_eager(eager, prompt)
    ref_tokens = results[("PyTorch eager", "float32")]["tokens"]
    for dtype, r in llm.items():
        compare_tokens(f"llamas {dtype}", r["tokens"], ref_tokens)
    settle()

    tuned = TorchGPT2(weights, n_layer, n_head, eps, tuned=True).eval()
    with torch.inference_mode():               # same logits as the plain model, prefill and decode
        a, ca = eager(torch.tensor([prompt[:32]]))
        b, cb = tuned(torch.tensor([prompt[:32]]))
        a2, _ = eager(torch.tensor([[prompt[32]]]), ca)
        b2, _ = tuned(torch.tensor([[prompt[32]]]), cb)
    err = max(rel_err(b.numpy(), a.numpy()), rel_err(b2.numpy(), a2.numpy()))
    note(f"PyTorch eager tuned vs plain: logits rel err {err:.2e}" + ("" if err < 1e-4 else "  <-- large"))
    del ca, cb
    settle()
    results[("PyTorch eager, tuned", "float32")] = run_torch_eager(tuned, prompt)
    compare_tokens("PyTorch eager, tuned", results[("PyTorch eager, tuned", "float32")]["tokens"], ref_tokens)
    del tuned
    settle()

    if not ARGS.no_hf:
        try:
            import transformers
            transformers.logging.set_verbosity_error()
            try:
                hf = transformers.GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()
            except TypeError:   # transformers < 4.56 spells it torch_dtype
                hf = transformers.GPT2LMHeadModel.from_pretrained(path, torch_dtype=torch.float32).eval()
            with torch.inference_mode():
                ids = torch.tensor([prompt[:64]])
                hf_logits = hf(ids).logits[0].numpy()
                ref = eager(ids, last_only=False)[0][0].numpy()
            err = rel_err(hf_logits, ref)
            note(f"transformers vs PyTorch eager: logits rel err {err:.2e}" + ("" if err < 1e-4 else "  <-- large"))
            del eager
            gc.collect()
            settle()
            r = run_hf(hf, prompt)
            results[("transformers", "float32")] = r
            compare_tokens("transformers", r["tokens"], ref_tokens)
            del hf
        except Exception as e:  # noqa: BLE001
            note(f"transformers run failed: {type(e).__name__}: {e}")
            traceback.print_exc()
    gc.collect()

    bpt = {d: bytes_per_token(weights, d) for d in ("float32", "bfloat16")}
    for (eng, dt), r in results.items():
        r["bound"] = limits["bw"] * 1e9 / bpt[dt]
        r["bpt"] = bpt[dt]
    llm_bytes = {d: llm[d]["weight_bytes"] for d in llm}
    return results, {"bpt": bpt, "llamas_weight_bytes": llm_bytes, "cfg": cfg}


# ================================================================================================
def main() -> None:
    t_start = time.perf_counter()
    busy_before = other_load_now()
    if busy_before > 0.3:
        note(f"other processes were using {busy_before:.1f} CPU cores when the run started: "
             "timings (multi-threaded ones most) are disturbed")
    tmp = None
    path = ARGS.model
    if path is None:
        from make_random_gpt2 import make_model
        tmp = tempfile.mkdtemp(prefix="llamas-bench-")
        path = os.path.join(tmp, "gpt2-124M-random")
        log(f"writing random GPT-2 124M to {path}")
        make_model(path, "124M", seed=0)
    try:
        info = llamas.info()
        settle()
        meter = OtherLoad()
        limits = machine_limits()
        limits["other_load"] = meter.stop()
        settle()
        meter = OtherLoad()
        gemm = gemm_table()
        gemm_load = meter.stop()
        settle()
        model_rows, extra = model_section(path, limits)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---------------------------------------------------------------- output
    print(f"## llamas benchmark ({'quick' if QUICK else 'full'} run, {ARGS.threads} threads)\n")
    print(f"CPU: {info['cpu']} ({', '.join(info['cpu_features'])}), llamas kernel variant "
          f"{info['kernel_variant']}, torch {torch.__version__}, numpy {np.__version__}. "
          f"Model: {'random-weight GPT-2 124M' if ARGS.model is None else path}; prompt {PROMPT_LEN} random "
          f"token ids, {DECODE_TOKENS} greedy decode steps after it.\n")

    print("### a. Machine limits\n")
    print(md_table(["quantity", "value"], [
        ["memory read bandwidth, numpy add.reduce over 1 GiB f32 (1 thread)", f"{limits['bw_numpy']:.1f} GB/s"],
        [f"memory read bandwidth, torch sum over 1 GiB f32 ({ARGS.threads} threads)", f"{limits['bw_torch']:.1f} GB/s"],
        ["bandwidth used for bounds (best)", f"{limits['bw']:.1f} GB/s"],
        ["numpy sgemm 2048x2048x2048", f"{limits['sgemm_square']:.1f} GFLOP/s"],
        ["peak sgemm (best numpy seen)", f"{PEAK_GEMM[0]:.1f} GFLOP/s"],
        ["CPU cores used by other processes meanwhile", f"{limits['other_load']:.2f}"],
    ]))
    print()

    print("### b. GEMM (float32, C = A @ B, MxKxN)\n")
    rows = []
    gemm_ok = True
    for (m, k, n), g_l, g_p, g_n, err in gemm:
        ratio = g_l / g_n if g_n == g_n and g_n > 0 else float("nan")
        ratio_p = g_p / g_n if g_n == g_n and g_n > 0 else float("nan")
        gemm_ok &= ratio >= 1.0
        rows.append([f"{m}x{k}x{n}", f"{g_l:.1f}", f"{g_p:.1f}", f"{g_n:.1f}", f"{ratio:.2f}x", f"{ratio_p:.2f}x",
                     f"{err:.1e}"])
    print(md_table(["shape", "llamas matmul GFLOP/s", "llamas prepacked B", "numpy GFLOP/s", "ratio",
                    "prepacked ratio", "rel err"], rows))
    print(f"\nMedian of {GEMM_ROUNDS} rounds x {GEMM_REPS} reps per engine, each engine's block after a 0.3 s pause "
          f"(OpenBLAS workers spin ~0.1 s after a call) and a warm-up call (fewer reps for the 50257 shape); "
          f"other processes used {gemm_load:.2f} CPU cores meanwhile.\n")

    print("### c. GPT-2 124M (batch 1)\n")
    eager = model_rows.get(("PyTorch eager", "float32"))
    rows = []
    for (eng, dt), r in model_rows.items():
        rp = r["prefill"] / eager["prefill"] if eager else float("nan")
        rd = r["decode"] / eager["decode"] if eager else float("nan")
        rows.append([eng, dt, f"{r['prefill']:.1f}", f"{r['decode']:.2f}", f"{r['decode_mean']:.2f}",
                     f"{rp:.2f}x", f"{rd:.2f}x", f"{100 * r['decode'] / r['bound']:.0f}%", f"{r['other_load']:.2f}"])
    print(md_table(["engine", "dtype", "prefill-512 tok/s", "decode tok/s", "decode tok/s (mean)",
                    "prefill vs eager", "decode vs eager", "% of bandwidth bound", "other CPU load"], rows))
    print("\nprefill: best of the timed 512-token prompts; decode tok/s: 1 / median single-step time over "
          f"{DECODE_TOKENS} steps after the prompt (context 513..{PROMPT_LEN + DECODE_TOKENS}); \"mean\": steps / "
          "total decode time (transformers: (t(generate N) - t(generate 1)) based). \"other CPU load\": cores "
          "used by other processes during that row's measurements.")
    print("\n\"eager\" is the plain PyTorch GPT-2 (torch.cat KV cache, SDPA, F.linear lm_head); \"tuned\" adds a "
          "preallocated KV cache, matmul attention for decode and a pre-transposed lm_head (same logits). "
          "transformers: GPT2LMHeadModel.generate(do_sample=False, min_new_tokens=N), decode steps timed by a "
          "LogitsProcessor; its prefill is one forward pass with logits_to_keep=1.")
    bpt = extra["bpt"]
    print(f"\nBandwidth bound: weight bytes per decoded token float32 {bpt['float32'] / 1e6:.1f} MB, "
          f"bfloat16 {bpt['bfloat16'] / 1e6:.1f} MB (llamas reports weight_bytes "
          + ", ".join(f"{d} {b / 1e6:.1f} MB" for d, b in extra["llamas_weight_bytes"].items())
          + f"); at {limits['bw']:.1f} GB/s: float32 {limits['bw'] * 1e9 / bpt['float32']:.1f} tok/s, "
          f"bfloat16 {limits['bw'] * 1e9 / bpt['bfloat16']:.1f} tok/s. (KV-cache reads, ~"
          f"{2 * extra['cfg']['n_layer'] * (PROMPT_LEN + DECODE_TOKENS / 2) * extra['cfg']['n_embd'] * 4 / 1e6:.0f} MB/token "
          "at fp32 on average here, are not counted.)\n")

    print("### Targets\n")
    l32 = model_rows.get(("llamas", "float32"))
    l16 = model_rows.get(("llamas", "bfloat16"))
    nan = float("nan")
    t_rows = []
    worst_gemm = min((g_l / g_n for _, g_l, _, g_n, _ in gemm if g_n > 0), default=nan)
    t_rows.append(["GEMM >= 1.0x numpy (every shape)", f"worst {worst_gemm:.2f}x", mark(gemm_ok)])
    worst_p = min((g_p / g_n for _, _, g_p, g_n, _ in gemm if g_n > 0), default=nan)
    t_rows.append(["(info) prepacked-B GEMM >= 1.0x numpy", f"worst {worst_p:.2f}x", mark(worst_p >= 1.0)])
    if l32 and eager:
        x = l32["decode"] / eager["decode"]
        t_rows.append(["fp32 decode >= 1.2x PyTorch eager", f"{x:.2f}x", mark(x >= 1.2)])
        x = l32["decode"] / l32["bound"]
        t_rows.append(["fp32 decode >= 90% of bandwidth bound", f"{100 * x:.0f}%", mark(x >= 0.9)])
        x = l32["prefill"] / eager["prefill"]
        t_rows.append(["fp32 prefill >= 1.2x PyTorch eager", f"{x:.2f}x", mark(x >= 1.2)])
    if l16 and l32:
        x = l16["decode"] / l32["decode"]
        t_rows.append(["bf16 decode >= 1.8x llamas fp32 decode", f"{x:.2f}x", mark(x >= 1.8)])
    if l16 and eager:
        x = l16["prefill"] / eager["prefill"]
        t_rows.append(["bf16 prefill >= 1.2x PyTorch eager", f"{x:.2f}x", mark(x >= 1.2)])
    tuned = model_rows.get(("PyTorch eager, tuned", "float32"))
    if l32 and tuned:   # the same targets against the stronger eager baseline, for information
        x = l32["decode"] / tuned["decode"]
        t_rows.append(["(info) fp32 decode >= 1.2x tuned PyTorch eager", f"{x:.2f}x", mark(x >= 1.2)])
        x = l32["prefill"] / tuned["prefill"]
        t_rows.append(["(info) fp32 prefill >= 1.2x tuned PyTorch eager", f"{x:.2f}x", mark(x >= 1.2)])
    print(md_table(["target", "measured", "status"], t_rows))
    print()

    print("### Checks and notes\n")
    for n_ in NOTES:
        print(f"- {n_}")
    busy_after = other_load_now()
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"]
    print(f"\n(total wall time {time.perf_counter() - t_start:.0f} s; CPU cores used by other processes: "
          f"{busy_before:.1f} at start, {busy_after:.1f} at end; load average {' '.join(load)})")


if __name__ == "__main__":
    main()
