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
with the same thread count: this box drifts by +-20% over minutes, so compare the ratios.

With --batched-bench PATH (llama.cpp's llama-batched-bench, same build, target llama-batched-bench)
it also measures batched decode: --batch sequences generating --gen-tokens each from a 1-token
prompt, aggregate tokens/s (llama-batched-bench's S_TG against `llamas bench -p 1 --batch N`)."""
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


def llama_batched_bench(path: str, gguf: str, threads: int, tg: int, batch: int) -> float:
    """Aggregate decode tokens/s of `batch` sequences (llama-batched-bench's S_TG column)."""
    cmd = [path, "-m", gguf, "-t", str(threads), "-c", str(batch * (tg + 2) + 64), "-b", "2048", "-ub", "512",
           "-npp", "1", "-ntg", str(tg), "-npl", str(batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"llama-batched-bench failed ({out.returncode}): {out.stderr[-2000:]}")
    header = None
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "S_TG t/s" in cells:
            header = cells
        elif header and len(cells) == len(header) and cells[header.index("B")] == str(batch):
            return float(cells[header.index("S_TG t/s")])
    raise RuntimeError(f"llama-batched-bench printed no row for {batch} sequences: {out.stdout[-2000:]}")


ROW = re.compile(r"\|\s*(pp|tg)\d+\s*\|\s*([0-9.]+)\s*±")


def llamas_bench(model: str, dtype: str, compute: str, threads: int, pp: int, tg: int, reps: int,
                 batch: int = 1) -> dict:
    """{"pp": tok/s, "tg": tok/s} from `llamas bench` (its table rows) in a process of its own; with
    batch > 1, the aggregate rates of that many sequences."""
    cmd = [sys.executable, "-m", "llamas", "bench", "--model", model, "--dtype", dtype, "--compute-dtype", compute,
           "--threads", str(threads), "-p", str(pp), "-n", str(tg), "-r", str(reps), "--batch", str(batch)]
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
    p.add_argument("--batched-bench", metavar="PATH",
                   help="llama.cpp's llama-batched-bench: also compare batched decode (--batch sequences)")
    p.add_argument("--batch", type=int, default=16, help="sequences for the batched-decode comparison (default 16)")
    args = p.parse_args()
    if not os.access(args.llama_bench, os.X_OK):
        p.error(f"--llama-bench {args.llama_bench!r} is not an executable file")
    if args.batched_bench is not None and not os.access(args.batched_bench, os.X_OK):
        p.error(f"--batched-bench {args.batched_bench!r} is not an executable file")
    if args.batch < 1:
        p.error(f"--batch must be at least 1, got {args.batch}")
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

    results = {}  # (weight dtype, engine label) -> {"pp": [...], "tg": [...], "batch": [...]}: one per round
    for rnd in range(args.rounds):
        for dtype, gguf in ggufs.items():
            def llama_cpp(g=gguf):
                rates = llama_bench(args.llama_bench, g, args.threads, args.prompt_tokens, args.gen_tokens,
                                    args.repetitions)
                if args.batched_bench:
                    rates["batch"] = llama_batched_bench(args.batched_bench, g, args.threads, args.gen_tokens,
                                                         args.batch)
                return rates

            def ours(w, c):
                rates = llamas_bench(args.model, w, c, args.threads, args.prompt_tokens, args.gen_tokens,
                                     args.repetitions)
                if args.batched_bench:
                    rates["batch"] = llamas_bench(args.model, w, c, args.threads, 1, args.gen_tokens,
                                                  args.repetitions, args.batch)["tg"]
                return rates

            runs = [(f"llama.cpp {os.path.basename(gguf)}", llama_cpp)]
            for weights, compute in PAIRS[dtype]:
                runs.append((f"llamas {weights}" + (f", {compute} compute" if compute != "float32" else ""),
                             lambda w=weights, c=compute: ours(w, c)))
            for label, run in (runs if rnd % 2 == 0 else runs[::-1]):
                print(f"# round {rnd + 1}/{args.rounds}: {label}", file=sys.stderr, flush=True)
                rates = run()
                slot = results.setdefault((dtype, label), {"pp": [], "tg": [], "batch": []})
                for key in slot:
                    slot[key].append(rates.get(key, float("nan")))

    pp, tg = f"pp{args.prompt_tokens}", f"tg{args.gen_tokens}"
    keys = ["pp", "tg"] + (["batch"] if args.batched_bench else [])
    names = {"pp": pp, "tg": tg, "batch": f"{tg} x{args.batch}"}
    print(f"\n{args.threads} threads, medians of {args.rounds} rounds (each of {args.repetitions} repetitions); "
          "ratio: llamas / llama.cpp at the same weight precision"
          + (f"; {names['batch']}: {args.batch} sequences' aggregate decode" if args.batched_bench else "") + "\n")
    print("| engine | " + " | ".join(f"{names[k]} tok/s" for k in keys) + " | "
          + " | ".join(f"{names[k]} ratio" for k in keys) + " |")
    print("|---|" + "---|" * (2 * len(keys)))
    for dtype in ggufs:
        rows = [(label, r) for (d, label), r in results.items() if d == dtype]
        base = {k: statistics.median(rows[0][1][k]) for k in keys}
        for label, r in rows:
            med = {k: statistics.median(r[k]) for k in keys}
            print(f"| {label} | " + " | ".join(f"{med[k]:.1f}" for k in keys) + " | "
                  + " | ".join(f"{med[k] / base[k]:.2f}x" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
