"""llamas vs numpy / PyTorch eager / transformers on CPU, all in one run at one thread count.

    PYTHONPATH=python python bench/compare.py [--threads 2] [--quick] [--model DIR]

Prints markdown tables:
  a. machine limits: memory read bandwidth (GB/s) and the best numpy sgemm GFLOP/s seen;
  b. GEMM GFLOP/s, llamas.ops.matmul (B packed per call) and llamas.ops.linear on B packed once
     (llamas.ops.pack: the layout a loaded model holds its weights in) vs numpy (OpenBLAS) a @ b;
  c. GPT-2 124M (random weights unless --model): prefill-512 and batch-1 decode tokens/s for
     llamas float32 / bfloat16, a plain PyTorch eager GPT-2 with a KV cache, and transformers
     GPT2LMHeadModel.generate; decode at two contexts: after the 512-token prompt (context
     513-640), and from a 1-token prompt (context 2-129, as llama-bench's tg128 starts from an
     empty cache); each as % of the memory-bandwidth bound (weight bytes only);
and the performance targets, each marked met / not met (the float32 prefill target on the medians
of llamas and PyTorch eager prefills alternated one by one).
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
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median, read_safetensors, rel_err, timeit  # noqa: E402
from compare_gemm import gemm_table, machine_limits, read_rate  # noqa: E402
from quiet_box import OtherLoad, other_load_now, wait_for_quiet  # noqa: E402
from torch_gpt2 import TorchGPT2  # noqa: E402
from compare_report import print_report  # noqa: E402

import torch  # noqa: E402

import llamas  # noqa: E402

torch.set_num_threads(ARGS.threads)
llamas.set_num_threads(ARGS.threads)

QUICK = ARGS.quick
WAIT_QUIET = ARGS.wait_quiet if ARGS.wait_quiet is not None else (0.0 if ARGS.quick else 30.0)
PROMPT_LEN = 512
SHORT_PROMPT_LEN = 1                      # the short-context decode's prompt (contexts 2..129)
DECODE_TOKENS = 32 if QUICK else 128
LLAMAS_REPS = 1 if QUICK else 3          # timed prefill + decode rounds per llamas dtype (after a warm-up)
BASE_PREFILL_REPS = 1 if QUICK else 2     # timed prefills of the (slower) PyTorch / transformers baselines
BASE_DECODE_REPS = 1                      # of those, how many are followed by a timed decode
GEMM_REPS = 3 if QUICK else 5
GEMM_ROUNDS = 1 if QUICK else 3           # engine blocks per shape (each GEMM_REPS timed calls)
GEMM_SHAPES = [(256, 768, 2304), (256, 768, 3072), (256, 3072, 768), (1, 768, 3072), (256, 768, 50257)]

NOTES: list[str] = []       # problems and check results, printed at the end


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
    if not quick:
        wait_for_quiet(WAIT_QUIET, log)


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


BF16_COMPUTE = "bfloat16, bf16 compute"


def llamas_runner(m, dtype: str, prompt: list[int]):
    """one(decode) for a loaded llamas model: a 512-token prefill, then `decode` greedy steps,
    each timed alone; returns (prefill s, step times, tokens)."""
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
    return one


# llamas configurations, by the label the table shows in its dtype column.
LLAMAS_CONFIGS = {"float32": dict(dtype="float32"), "bfloat16": dict(dtype="bfloat16"),
                  BF16_COMPUTE: dict(dtype="bfloat16", compute_dtype="bfloat16"), "int8": dict(dtype="int8"),
                  "int8, bf16 compute": dict(dtype="int8", compute_dtype="bfloat16"),
                  "int8, int8 compute": dict(dtype="int8", compute_dtype="int8")}


def run_llamas(path: str, prompt: list[int]) -> dict:
    """llamas in every LLAMAS_CONFIGS precision, loaded side by side, their runs interleaved (the
    order reversed in odd rounds): the box drifts by +-20% over a minute, and the bfloat16 target
    is a ratio to float32. Returns {label: results}; "round_steps" holds each round's median
    decode step time."""
    ones, models = {}, {}
    for dtype, kwargs in LLAMAS_CONFIGS.items():
        log(f"llamas {dtype}")
        try:
            models[dtype] = llamas.load(path, **kwargs)
            ones[dtype] = llamas_runner(models[dtype], dtype, prompt)
            ones[dtype](8)                                # warm-up (pages the weights in)
        except Exception as e:  # noqa: BLE001
            note(f"llamas {dtype} failed: {type(e).__name__}: {e}")
            traceback.print_exc()
            ones.pop(dtype, None)
    meter = OtherLoad()
    runs = repeat_runs({f"llamas {d}": f for d, f in ones.items()}, LLAMAS_REPS, LLAMAS_REPS)
    short = repeat_runs({f"llamas {d}": llamas_runner(models[d], d, prompt[:SHORT_PROMPT_LEN]) for d in ones},
                        LLAMAS_REPS, LLAMAS_REPS)
    alternated = None
    if "float32" in ones and "bfloat16" in ones:
        alternated = alternated_step_ratio(models["bfloat16"], models["float32"], prompt)
    other = meter.stop()
    out = {}
    for dtype in ones:
        res, toks, step_medians = runs[f"llamas {dtype}"]
        res.update(tokens=toks, weight_bytes=models[dtype].weight_bytes, model=models[dtype], other_load=other,
                   round_steps=step_medians)
        add_short(res, short[f"llamas {dtype}"])
        out[dtype] = res
    if alternated is not None:
        out["bfloat16"]["alternated_ratio"] = alternated
    return out


def alternated_step_ratio(fast, base, prompt: list[int]) -> float:
    """fast's decode speed over base's with their steps alternated one by one (each after the same
    prompt, the order swapped every step), so both see the same memory mode: the rounds above are a
    second or two each, and this box's memory switches between its slow and fast modes within
    seconds. Returns median(base step) / median(fast step)."""
    models = (fast, base)
    seqs = [llamas._C.Sequence(m.config.to_native(), seed=0) for m in models]
    times: list[list[float]] = [[], []]
    try:
        toks = [m._native.step([(s, prompt, True)])[0] for m, s in zip(models, seqs)]
        for i in range(DECODE_TOKENS):
            for j in ((0, 1) if i % 2 == 0 else (1, 0)):
                t0 = time.perf_counter()
                toks[j] = models[j]._native.step([(seqs[j], [toks[j]], True)])[0]
                times[j].append(time.perf_counter() - t0)
    finally:
        for s in seqs:
            s.release()
    return median(times[1]) / median(times[0])


PREFILL_PAIRS = 2 if QUICK else 9   # llamas float32 / PyTorch eager prefills, alternated


def interleaved_prefill(model, eager: TorchGPT2, prompt: list[int]) -> dict:
    """llamas float32 and PyTorch eager 512-token prefills alternated one by one (the order
    swapped each pair, a 0.3 s pause after each: OpenMP and OpenBLAS workers spin a while after a
    region), so both see the same machine: the sections above run minutes apart, and this box
    drifts by +-20% in that time. Returns each engine's prefill times (s)."""
    log("prefill pairs: llamas float32 / PyTorch eager")
    ones = {"llamas": llamas_runner(model, "float32", prompt), "eager": torch_runner(eager, prompt)}
    for one in ones.values():
        one(0)                                   # warm-up
    times: dict = {k: [] for k in ones}
    for i in range(PREFILL_PAIRS):
        for k in (("llamas", "eager") if i % 2 == 0 else ("eager", "llamas")):
            times[k].append(ones[k](0)[0])
            time.sleep(0.3)
    return times


def add_short(res: dict, short_run: tuple) -> None:
    """Puts a short-context repeat_runs result beside a row's long-context numbers."""
    summary, toks, step_medians = short_run
    res.update(decode_short=summary["decode"], tokens_short=toks, round_steps_short=step_medians,
               round_bw_short=summary["round_bw"])


BANDWIDTH_SAMPLES: list[float] = []   # GB/s of two-thread torch sums taken between decode rounds
_BW_BUFFER = []


def sample_bandwidth() -> float:
    """Two torch sums over 1 GiB, the best kept (GB/s): this box's memory switches between a slow
    and a fast mode (30-36 against 55-64 GB/s) within seconds, so each decode run is held against
    the memory's rate right before and right after it, not only against one taken at the start."""
    if not _BW_BUFFER:
        _BW_BUFFER.append(torch.ones((1 << 30) // 4, dtype=torch.float32))
    buf = _BW_BUFFER[0]
    best = max(read_rate(buf.sum, buf.numel() * 4) for _ in range(2))
    BANDWIDTH_SAMPLES.append(best)
    time.sleep(0.3)                        # torch's OpenMP workers spin a while after a region
    return best


def repeat_runs(ones: dict, prefill_reps: int, decode_reps: int) -> dict:
    """Runs each engine's one(decode_tokens) prefill_reps times, the engines interleaved round by
    round (their order alternating), the first decode_reps rounds also decoding; notes when two
    identical greedy runs disagree. Returns {label: (summary, tokens, median step time per round)};
    summary["round_bw"] holds, per decode run, the better of the bandwidth samples taken right
    before and right after it."""
    labels = list(ones)
    acc = {k: {"pre": [], "steps": [], "totals": [], "rounds": [], "bw": [], "tokens": None} for k in labels}
    bw_before = None
    for r in range(prefill_reps):
        d = DECODE_TOKENS if r < decode_reps else 0
        for label in (labels if r % 2 == 0 else labels[::-1]):
            a = acc[label]
            if d and bw_before is None:
                bw_before = sample_bandwidth()
            pre, st, tk = ones[label](d)
            a["pre"].append(pre)
            if d:
                bw_after = sample_bandwidth()
                a["bw"].append(max(bw_before, bw_after))
                bw_before = bw_after
                a["steps"] += st
                a["totals"].append(sum(st))
                a["rounds"].append(median(st))
                if a["tokens"] is not None and tk != a["tokens"]:
                    note(f"{label}: greedy output differs between two identical runs")
                a["tokens"] = tk
    out = {}
    for k, a in acc.items():
        summary = summarize(a["pre"], a["steps"], a["totals"], DECODE_TOKENS)
        summary["round_bw"] = a["bw"]
        out[k] = (summary, a["tokens"], a["rounds"])
    return out


def torch_runner(model: TorchGPT2, prompt: list[int]):
    """one(decode) for the PyTorch eager model, as llamas_runner."""
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
    return one


def run_torch_eager(model: TorchGPT2, prompt: list[int]) -> dict:
    log("PyTorch eager" + (" (tuned)" if model.tuned else ""))
    one = torch_runner(model, prompt)
    one(8)
    meter = OtherLoad()
    res, toks, step_medians = repeat_runs({"PyTorch eager": one}, BASE_PREFILL_REPS, BASE_DECODE_REPS)["PyTorch eager"]
    short = repeat_runs({"PyTorch eager": torch_runner(model, prompt[:SHORT_PROMPT_LEN])}, BASE_DECODE_REPS,
                        BASE_DECODE_REPS)["PyTorch eager"]
    res.update(tokens=toks, other_load=meter.stop(), round_steps=step_medians)
    add_short(res, short)
    return res


def run_hf(hf, prompt: list[int]) -> dict:
    log("transformers")
    import transformers
    ids = torch.tensor([prompt], dtype=torch.long)
    gen_kw = dict(do_sample=False, pad_token_id=50256)

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

    def generate(prompt_ids, n, **kw):
        return hf.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=n,
                           min_new_tokens=n, **gen_kw, **kw)

    def decode_runs(prompt_ids, n):
        """BASE_DECODE_REPS generate(n) calls: their total times, the steps between, the last output."""
        tn, steps, out = [], [], None
        for _ in range(BASE_DECODE_REPS):
            clock = StepClock()
            t0 = time.perf_counter()
            out = generate(prompt_ids, n, logits_processor=transformers.LogitsProcessorList([clock]))
            tn.append(time.perf_counter() - t0)
            steps += [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
        return tn, steps, out

    with torch.inference_mode():
        forward()
        generate(ids, 2)                                                       # warm-up
        meter = OtherLoad()
        pre_t = timeit(forward, BASE_PREFILL_REPS, warmup=0)
        t1 = timeit(lambda: generate(ids, 1), BASE_PREFILL_REPS, warmup=0)
        n = DECODE_TOKENS
        bw0 = sample_bandwidth()
        tn, steps, out = decode_runs(ids, n)
        bw1 = sample_bandwidth()
        _, short_steps, short_out = decode_runs(ids[:, :SHORT_PROMPT_LEN], n)
        bw2 = sample_bandwidth()
        other = meter.stop()
    gen = out[0, len(prompt):].tolist()
    if len(gen) != n:
        note(f"transformers generate returned {len(gen)} new tokens, asked for {n}")
    # generate(n) = prefill (gives token 1) + n-1 decode steps; generate(1) = prefill alone
    dec_time = median(tn) - median(t1)
    res = summarize(pre_t, steps, [dec_time * n / (n - 1)], n)
    res.update(tokens=gen, other_load=other, round_steps=[median(steps)], round_bw=[max(bw0, bw1)],
               generate1_prefill=PROMPT_LEN / median(t1))
    short = summarize(pre_t, short_steps, [], n)
    short["round_bw"] = [max(bw1, bw2)]
    add_short(res, (short, short_out[0, SHORT_PROMPT_LEN:].tolist(), [median(short_steps)]))
    return res


def bytes_per_token(weights: dict, dtype: str) -> int:
    """Weight bytes one batch-1 decode step has to read: every matrix (incl. wte for the tied
    lm_head) in the weights' dtype (int8: 1 byte a weight + a float32 scale per 32), every vector in
    float32; wpe contributes one row only."""
    mat_bytes = {"bfloat16": 2, "int8": 1.125}.get(dtype, 4)
    total = 0
    for name, a in weights.items():
        if name == "transformer.wpe.weight":
            total += a.shape[1] * 4
        elif a.ndim == 2:
            total += int(a.size * mat_bytes)
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
    llm = run_llamas(path, prompt)
    for dtype, r in llm.items():
        results[("llamas", dtype)] = r
    settle()

    eager = TorchGPT2(weights, n_layer, n_head, eps).eval()
    check_agreement(eager, llm, prompt)
    if "float32" in llm:
        settle()
        llm["float32"]["prefill_pairs"] = interleaved_prefill(llm["float32"]["model"], eager, prompt)
    for r in llm.values():
        r.pop("model", None)
    gc.collect()
    settle()
    results[("PyTorch eager", "float32")] = run_torch_eager(eager, prompt)
    ref_tokens = results[("PyTorch eager", "float32")]["tokens"]
    ref_short = results[("PyTorch eager", "float32")]["tokens_short"]
    for dtype, r in llm.items():
        compare_tokens(f"llamas {dtype}", r["tokens"], ref_tokens)
        if dtype == "float32":  # (the other precisions' near-tied first logits may pick another token)
            compare_tokens(f"llamas {dtype} (1-token prompt)", r["tokens_short"], ref_short)
    settle()

    # The same eager model with every buffer in bfloat16 (activations too): what bfloat16 compute
    # is up against in PyTorch.
    eager16 = TorchGPT2(weights, n_layer, n_head, eps, dtype=torch.bfloat16).eval()
    results[("PyTorch eager", "bfloat16")] = run_torch_eager(eager16, prompt)
    compare_tokens("PyTorch eager bfloat16", results[("PyTorch eager", "bfloat16")]["tokens"], ref_tokens)
    del eager16
    gc.collect()
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
            compare_tokens("transformers (1-token prompt)", r["tokens_short"], ref_short)
            del hf
        except Exception as e:  # noqa: BLE001
            note(f"transformers run failed: {type(e).__name__}: {e}")
            traceback.print_exc()
    gc.collect()

    _BW_BUFFER.clear()
    limits["bw_samples"] = len(BANDWIDTH_SAMPLES)
    limits["bw"] = max([limits["bw"]] + BANDWIDTH_SAMPLES)
    bpt = {d: bytes_per_token(weights, d) for d in ("float32", "bfloat16", "int8")}
    for (eng, dt), r in results.items():
        weight_dtype = dt.split(",")[0]
        r["bound"] = limits["bw"] * 1e9 / bpt[weight_dtype]
        r["bpt"] = bpt[weight_dtype]
        # Each decode run against the memory's rate beside it: weight bytes a token x tokens/s over
        # that rate, the median over runs.
        for suffix in ("", "_short"):
            fracs = [bpt[weight_dtype] / step / (bw * 1e9)
                     for step, bw in zip(r.get("round_steps" + suffix, []), r.get("round_bw" + suffix, []))]
            r["bound_frac" + suffix] = median(fracs) if fracs else float("nan")
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
        limits = machine_limits(QUICK, log)
        limits["other_load"] = meter.stop()
        settle()
        meter = OtherLoad()
        gemm = gemm_table(GEMM_SHAPES, GEMM_REPS, GEMM_ROUNDS, settle, note, log)
        gemm_load = meter.stop()
        peak_gemm = max([limits["sgemm_square"]] + [row[5] for row in gemm if row[5] == row[5]])
        settle()
        model_rows, extra = model_section(path, limits)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    print_report(SimpleNamespace(
        threads=ARGS.threads, quick=QUICK, random_model=ARGS.model is None, path=path, prompt_len=PROMPT_LEN,
        decode_tokens=DECODE_TOKENS, gemm_rounds=GEMM_ROUNDS, gemm_reps=GEMM_REPS, peak_gemm=peak_gemm,
        notes=NOTES, t_start=t_start, busy_before=busy_before, info=info, limits=limits, gemm=gemm,
        gemm_load=gemm_load, model_rows=model_rows, extra=extra))


if __name__ == "__main__":
    main()
