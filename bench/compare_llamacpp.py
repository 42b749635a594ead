"""llamas against llama.cpp on the same machine and model: pp512 / tg128 tokens/s, as llama-bench
measures them (a 512-token prompt from an empty context; 128 tokens generated from a 1-token one).

    python bench/compare_llamacpp.py --llama-bench PATH/llama-bench --model DIR \\
        --gguf float32=DIR-f32.gguf --gguf bfloat16=DIR-bf16.gguf --gguf int8=DIR-q8_0.gguf

DIR is a Hugging Face GPT-2 folder (e.g. bench/make_random_gpt2.py's); each --gguf is the same
model converted by llama.cpp's convert_hf_to_gguf.py (--outtype f32, bf16, q8_0), paired with the
llamas precision named before '=': float32, bfloat16 (also run with bfloat16 compute) or int8 (llama.cpp's
Q8_0; also run with bfloat16 and with int8 compute). Neither program is installed by llamas:
llama-bench comes from a llama.cpp build (its source is in the llama-cpp-python sdist on PyPI,
vendor/llama.cpp: `cmake -B build -DGGML_NATIVE=ON && cmake --build build --target llama-bench`).
The two engines run in turn per pairing, round after round (--rounds), each in its own process,
with the same thread count: this box drifts by +-20% over minutes, so compare the ratios."""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

PAIRS = {  # llamas weight dtype -> the llamas configurations run against that GGUF
    "float32": [("float32", "float32")],
    "bfloat16": [("bfloat16", "float32"), ("bfloat16", "bfloat16")],
    "int8": [("int8", "float32"), ("int8", "bfloat16"), ("int8", "int8")],
}


def llama_bench(path: str, gguf: str, threads: int, pp: int, tg: int, reps: int) -> dict:
    """{"pp": tok/s, "tg": tok/s} from one llama-bench run (its JSON output)."""
    cmd = [path, "-m", gguf, "-t", str(threads), "-p", str(pp), "-n", str(tg), "-r", str(reps), "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({out.returncode}): {out.stderr[-2000:]}")
    rates = {}
    for row in json.loads(out.stdout):
        key = "pp" if row["n_prompt"] > 0 and row["n_gen"] == 0 else "tg"
        rates[key] = float(row["avg_ts"])
    return rates


ROW = re.compile(r"\|\s*(pp|tg)\d+\s*\|\s*([0-9.]+)\s*±")


def llamas_bench(model: str, dtype: str, compute: str, threads: int, pp: int, tg: int, reps: int) -> dict:
    """{"pp": tok/s, "tg": tok/s} from `llamas bench` (its table rows) in a process of its own."""
    cmd = [sys.executable, "-m", "llamas", "bench", "--model", model, "--dtype", dtype, "--compute-dtype", compute,
           "--threads", str(threads), "-p", str(pp), "-n", str(tg), "-r", str(reps)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"llamas bench failed ({out.returncode}): {out.stderr[-2000:]}")
    return {m.group(1): float(m.group(2)) for m in ROW.finditer(out.stdout)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-bench", required=True, help="path to llama.cpp's llama-bench binary")
    p.add_argument("--model", required=True, help="the Hugging Face model folder llamas loads")
    p.add_argument("--gguf", action="append", default=[], metavar="DTYPE=FILE",
                   help="a GGUF of the same model and the llamas weight dtype it pairs with (float32, "
                        "bfloat16 or int8); repeatable")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-p", "--prompt-tokens", type=int, default=512)
    p.add_argument("-n", "--gen-tokens", type=int, default=128)
    p.add_argument("-r", "--repetitions", type=int, default=3, help="repetitions inside each engine's run")
    p.add_argument("--rounds", type=int, default=2, help="runs of every engine in turn; medians are reported")
    args = p.parse_args()
    if not os.access(args.llama_bench, os.X_OK):
        p.error(f"--llama-bench {args.llama_bench!r} is not an executable file")
    ggufs = {}
    for item in args.gguf:
        dtype, sep, path = item.partition("=")
        if not sep or dtype not in PAIRS:
            p.error(f"--gguf {item!r}: expected DTYPE=FILE with DTYPE one of {', '.join(PAIRS)}")
        if not os.path.isfile(path):
            p.error(f"--gguf {item!r}: {path} is not a file")
        ggufs[dtype] = path
    if not ggufs:
        p.error("give at least one --gguf DTYPE=FILE")

    results = {}  # (engine label) -> {"pp": [...], "tg": [...]}
    for rnd in range(args.rounds):
        for dtype, gguf in ggufs.items():
            runs = [(f"llama.cpp {os.path.basename(gguf)}", lambda g=gguf: llama_bench(
                args.llama_bench, g, args.threads, args.prompt_tokens, args.gen_tokens, args.repetitions))]
            for weights, compute in PAIRS[dtype]:
                runs.append((f"llamas {weights}" + (f", {compute} compute" if compute != "float32" else ""),
                             lambda w=weights, c=compute: llamas_bench(args.model, w, c, args.threads,
                                                                       args.prompt_tokens, args.gen_tokens,
                                                                       args.repetitions)))
            for label, run in (runs if rnd % 2 == 0 else runs[::-1]):
                print(f"# round {rnd + 1}/{args.rounds}: {label}", file=sys.stderr, flush=True)
                rates = run()
                slot = results.setdefault((dtype, label), {"pp": [], "tg": []})
                for key in ("pp", "tg"):
                    slot[key].append(rates.get(key, float("nan")))

    pp, tg = f"pp{args.prompt_tokens}", f"tg{args.gen_tokens}"
    print(f"\n{args.threads} threads, medians of {args.rounds} rounds (each of {args.repetitions} repetitions); "
          "ratio: llamas / llama.cpp at the same weight precision\n")
    print(f"| engine | {pp} tok/s | {tg} tok/s | {pp} ratio | {tg} ratio |")
    print("|---|---|---|---|---|")
    for dtype in ggufs:
        rows = [(label, r) for (d, label), r in results.items() if d == dtype]
        base = {k: statistics.median(rows[0][1][k]) for k in ("pp", "tg")}
        for label, r in rows:
            med = {k: statistics.median(r[k]) for k in ("pp", "tg")}
            print(f"| {label} | {med['pp']:.1f} | {med['tg']:.1f} | {med['pp'] / base['pp']:.2f}x | "
                  f"{med['tg'] / base['tg']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
