"""The `llamas` command line: generate, convert, info, bench (data, train, eval and serve: cli_*.py)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from ._C import LlamasError
from .cli_args import add_dtype_args, non_negative_int as _non_negative_int, positive_int as _positive_int


MODEL_HELP = ("Hugging Face model folder (config.json, model.safetensors, tokenizer files); "
              "default: the bundled Shakespeare model")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR", help=MODEL_HELP)
    add_dtype_args(p)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


def _version() -> str:
    from . import __version__
    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamas", description="llamas: run transformer language models on a hand-written C++ engine.")
    parser.add_argument("--version", action="version", version=f"llamas {_version()}",
                        help="print the version and exit (`llamas info` says more)")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)",
                       description="Generate a continuation of PROMPT (or of the text of --file) and stream it to "
                                   "stdout.")
    _add_model_args(g)
    g.add_argument("prompt", nargs="?", default=None, help="the prompt text; - reads it from standard input")
    g.add_argument("--file", "-f", metavar="FILE", default=None,
                   help="read the prompt from FILE (UTF-8) instead; - is standard input")
    g.add_argument("--max-new-tokens", type=_positive_int, default=128,
                   help="tokens to generate at most (default 128); generation also ends where the model's context "
                        "does, with a note on stderr, as is a structured output (--json, --json-schema, --regex, "
                        "--grammar, --choice) that this cut short")
    g.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy, higher = more random (default: the model's generation_config.json, else 0)")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (0 = off; default: the model's, else 0)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (1 = off; default: the model's, else 1)")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top probability (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=None, help="penalise tokens already seen (1 = off; default: the model's, else 1)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")
    g.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID",
                   help="stop at this token id (repeatable), as at the end-of-text token")
    g.add_argument("--min-tokens", type=_non_negative_int, default=0, metavar="N",
                   help="generate at least N tokens before any stop: end-of-text and stop token ids are held "
                        "back and stop strings ignored until then (default 0)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="do not stop at the end-of-text token (generate --max-new-tokens tokens)")
    g.add_argument("--skip-special-tokens", action="store_true",
                   help="print no text for special tokens (an end-of-text drawn with --ignore-eos), as vLLM")
    g.add_argument("--json", action="store_true",
                   help="JSON mode: hold the output to one JSON object (as response_format json_object)")
    g.add_argument("--json-schema", default=None, metavar="FILE_OR_JSON",
                   help="the output is an instance of this JSON Schema (a file, or the schema's JSON text; as "
                        "response_format json_schema)")
    g.add_argument("--regex", default=None, metavar="PATTERN",
                   help="the output is a whole match of this regular expression (vLLM's guided_regex)")
    g.add_argument("--grammar", default=None, metavar="FILE_OR_GBNF",
                   help="the output is text this GBNF grammar derives from its 'root' rule (a file, or the "
                        "grammar itself; llama.cpp's grammars, vLLM's guided_grammar)")
    g.add_argument("--choice", action="append", default=None, metavar="TEXT",
                   help="the output is exactly one of these strings (repeatable; vLLM's guided_choice)")
    g.add_argument("--speculative-ngram", type=_non_negative_int, default=0, metavar="K",
                   help="draft up to K tokens a step from earlier text that the last tokens repeat (prompt "
                        "lookup decoding) and verify them in one step: the output is the same tokens (greedy, or "
                        "sampled from a --seed); fewer steps where text repeats itself (default 0: off; 4-8 "
                        "is typical)")
    g.add_argument("--profile", action="store_true", help="print a per-op time table to stderr at the end")
    g.add_argument("--stats", action="store_true",
                   help="print token counts, time to first token, generation speed and the forward steps taken "
                        "(with --speculative-ngram, the drafts fed and kept) to stderr at the end")

    c = sub.add_parser("convert", help="write model.safetensors from a folder's pytorch_model.bin",
                       description="Write FOLDER/model.safetensors from FOLDER/pytorch_model.bin (or the shards of "
                                   "pytorch_model.bin.index.json), reading the PyTorch pickle without torch and "
                                   "refusing any pickle that holds more than tensors. llamas.load then reads the "
                                   "folder.")
    c.add_argument("folder", help="Hugging Face model folder with pytorch_model.bin")
    c.add_argument("--force", action="store_true", help="replace an existing model.safetensors")

    i = sub.add_parser("info", help="version, CPU features, kernel variant, threads, CUDA",
                       description="Print version, CPU features, the chosen kernel variant, threads and CUDA availability.")
    i.add_argument("--json", action="store_true", help="print as JSON")

    b = sub.add_parser("bench", help="prefill and decode tokens/s, like llama-bench",
                       description="Measure prompt processing (pp) and token generation (tg) speed, mean ± sd over repetitions.")
    _add_model_args(b)
    b.add_argument("--prompt-tokens", "-p", type=_positive_int, default=None,
                   help=f"prompt length for pp (default {BENCH_PROMPT_TOKENS}, or the model's context if shorter)")
    b.add_argument("--gen-tokens", "-n", type=_positive_int, default=None,
                   help=f"tokens generated for tg from a 1-token prompt (default {BENCH_GEN_TOKENS}, or what the "
                        "model's context leaves room for)")
    b.add_argument("--repetitions", "-r", type=_positive_int, default=5, help="repetitions (default 5)")
    b.add_argument("--batch", "-b", type=_batch_sizes, default=[1], metavar="B[,B...]",
                   help="sequences run together (default 1): pp feeds B prompts in one step, tg decodes B "
                        "sequences per step; t/s counts the tokens of all of them (a comma list runs each)")
    b.add_argument("--profile", action="store_true", help="print a per-op time table to stderr at the end")

    from . import cli_batch, cli_data, cli_serve, cli_train
    cli_data.add_parser(sub)
    cli_train.add_parsers(sub, MODEL_HELP)
    cli_serve.add_parser(sub, MODEL_HELP)
    cli_batch.add_parser(sub, MODEL_HELP)
    return parser


def _model_path(args) -> str:
    import os
    from .model import default_model_path
    if args.model is not None:
        return args.model
    path = default_model_path()
    if not os.path.isdir(path):
        raise LlamasError(f"no --model given and the bundled model is missing ({path}); pass --model DIR")
    return path


def _load(args):
    import llamas
    if args.threads is not None:
        llamas.set_num_threads(args.threads)
    return llamas.load(_model_path(args), dtype=args.dtype, kv_dtype=args.kv_dtype,
                       compute_dtype=args.compute_dtype)


def _batch_sizes(text: str) -> list:
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be positive integers separated by commas, got {text!r}") from None
    if not sizes or min(sizes) < 1 or max(sizes) > 256:
        raise argparse.ArgumentTypeError(f"batch sizes must be in [1, 256], got {text!r}")
    return sizes


def _read_prompt(args) -> str:
    """The prompt: the argument, or the text of --file (- for either reads standard input)."""
    if args.prompt is not None and args.file is not None:
        raise LlamasError("[generate] give the prompt as an argument or with --file, not both")
    if args.prompt is None and args.file is None:
        raise LlamasError("[generate] no prompt: give it as an argument, or with --file FILE (- reads standard input)")
    if args.file is None and args.prompt != "-":
        return args.prompt
    return read_text(args.file if args.file is not None else args.prompt, "generate", "the prompt")


def _json_schema_arg(value):
    """--json-schema: the schema's JSON text as given, or read from the file it names."""
    if value is None:
        return None
    if value.lstrip().startswith(("{", "[")) or value.strip() in ("true", "false"):
        return value
    return read_text(value, "generate", "the JSON schema")


def _grammar_arg(value):
    """--grammar: the grammar's text as given (it has a '::='), or read from the file it names."""
    if value is None or "::=" in value:
        return value
    return read_text(value, "generate", "the grammar")


def read_text(source: str, op: str, what: str = "the text") -> str:
    """A UTF-8 file's text, or standard input's for "-"."""
    try:
        if source == "-":
            return sys.stdin.buffer.read().decode("utf-8")
        with open(source, "rb") as f:
            return f.read().decode("utf-8")
    except OSError as e:
        raise LlamasError(f"[{op}] cannot read {what} from {source}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        where = "standard input" if source == "-" else source
        raise LlamasError(f"[{op}] {what} in {where} is not UTF-8 (byte {e.start})") from None


def cmd_generate(args) -> int:
    import llamas
    prompt = _read_prompt(args)
    model = _load(args)
    with llamas.profile(enabled=args.profile) as prof:
        stream = model.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                repetition_penalty=args.repetition_penalty, seed=args.seed,
                                stop=args.stop or None, stop_token_ids=args.stop_token_id,
                                min_tokens=args.min_tokens, ignore_eos=args.ignore_eos,
                                skip_special_tokens=args.skip_special_tokens, json_object=args.json,
                                choices=args.choice, json_schema=_json_schema_arg(args.json_schema), regex=args.regex,
                                grammar=_grammar_arg(args.grammar), speculative_ngram=args.speculative_ngram,
                                stream=True)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    s = stream.stats()
    context = model.config.n_positions
    if s["finish_reason"] == "length" and s["generated_tokens"] < args.max_new_tokens:
        print(f"llamas generate: stopped after {s['generated_tokens']} tokens at the end of the model's context "
              f"({context} positions; the prompt took {s['prompt_tokens']})", file=sys.stderr)
    constraint = next((flag for flag, on in (("--json", args.json), ("--json-schema", args.json_schema),
                                              ("--regex", args.regex), ("--grammar", args.grammar),
                                              ("--choice", args.choice)) if on), None)
    if constraint and s["finish_reason"] == "length":
        limit = "--max-new-tokens" if s["generated_tokens"] >= args.max_new_tokens else "the model's context"
        print(f"llamas generate: the output is incomplete: {limit} ended it before it matched {constraint} "
              f"(it is a prefix of a match)", file=sys.stderr)
    if args.stats:
        ttft, total, n = s["time_to_first_token_s"], s["total_s"], s["generated_tokens"]
        line = f"[stats] prompt {s['prompt_tokens']} tokens, generated {n} in {total:.3f} s"
        if ttft is not None:
            line += f"; time to first token {ttft * 1e3:.1f} ms"
            if n > 1:
                line += f", then {(n - 1) / max(total - ttft, 1e-9):.1f} tokens/s"
        line += f"; {s['steps']} forward steps"
        if args.speculative_ngram:
            drafts, kept = s["draft_tokens"], s["accepted_tokens"]
            line += f", {drafts} speculative drafts" + (f", {kept / drafts:.0%} kept" if drafts else "")
        print(line, file=sys.stderr)
    if args.profile:
        print(prof.table(), file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from .torch_checkpoint import convert_folder
    convert_folder(args.folder, force=args.force, progress=lambda line: print(line, file=sys.stderr, flush=True))
    return 0


def cmd_info(args) -> int:
    import llamas
    info = llamas.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if isinstance(value, list):
            value = " ".join(value) or "-"
        print(f"{key:<26}{value}")
    return 0


BENCH_PROMPT_TOKENS, BENCH_GEN_TOKENS = 512, 128  # llama-bench's pp512 and tg128


def bench_lengths(args, context: int) -> None:
    """Sets args.prompt_tokens and args.gen_tokens. pp and tg are separate tests, each on new
    sequences (tg from a 1-token prompt, as llama-bench's tg128 decodes from an empty cache), so
    each must fit the context on its own. A default that does not fit a short-context model (the
    bundled one has 256 positions) shrinks to fit, with a note; a length asked for must fit."""
    tests = (("prompt_tokens", "--prompt-tokens", BENCH_PROMPT_TOKENS, context, "pp's prompt"),
             ("gen_tokens", "--gen-tokens", BENCH_GEN_TOKENS, context - 1, "tg's tokens after its 1-token prompt"))
    for attr, flag, default, room, what in tests:
        asked = getattr(args, attr)
        if asked is None:
            setattr(args, attr, min(default, room))
            if room < default:
                print(f"llamas bench: the model's context is {context} positions, so {what}: {room} tokens"
                      f" (default {default}; {flag} sets it)", file=sys.stderr)
        elif asked > room:
            raise LlamasError(f"[bench] {flag} {asked} does not fit the model's context of {context} positions"
                              f" ({what}: at most {room})")


def cmd_bench(args) -> int:
    import numpy as np
    import llamas
    from llamas import _C
    model = _load(args)
    cfg = model.config
    bench_lengths(args, cfg.n_positions)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, args.prompt_tokens).tolist() for _ in range(max(args.batch))]

    def run_pp(batch: int) -> float:
        seqs = [_C.Sequence(cfg.to_native()) for _ in range(batch)]
        t0 = time.perf_counter()
        model._native.step([(s, p, True) for s, p in zip(seqs, prompts)])
        dt = time.perf_counter() - t0
        for s in seqs:
            s.release()
        return batch * args.prompt_tokens / dt

    def run_tg(batch: int) -> float:
        seqs = [_C.Sequence(cfg.to_native()) for _ in range(batch)]
        tokens = model._native.step([(s, p[:1], True) for s, p in zip(seqs, prompts)])
        t0 = time.perf_counter()
        for _ in range(args.gen_tokens):
            tokens = model._native.step([(s, [t], True) for s, t in zip(seqs, tokens)])
        dt = time.perf_counter() - t0
        for s in seqs:
            s.release()
        return batch * args.gen_tokens / dt

    params = cfg.num_parameters()
    dtype = model.dtype if model.kv_dtype == model.dtype else f"{model.dtype}, kv {model.kv_dtype}"
    if model.compute_dtype != "float32":
        dtype += f", compute {model.compute_dtype}"
    batched = args.batch != [1]
    print("| model | size | params | dtype | threads |" + (" batch |" if batched else "") + " test | t/s |")
    print("|---|---|---|---|---|" + ("---|" if batched else "") + "---|---|")
    with llamas.profile(enabled=args.profile) as prof:
        for batch in args.batch:
            for name, fn in ((f"pp{args.prompt_tokens}", run_pp), (f"tg{args.gen_tokens}", run_tg)):
                fn(batch)  # warm-up
                rates = []
                for r in range(args.repetitions):
                    rates.append(fn(batch))
                    print(f"\r  {name} x{batch}: repetition {r + 1}/{args.repetitions}", end="", file=sys.stderr,
                          flush=True)
                print("\r" + " " * 40 + "\r", end="", file=sys.stderr)
                sd = statistics.stdev(rates) if len(rates) > 1 else 0.0
                print(f"| gpt2 | {model.weight_bytes / 2**20:.1f} MiB | {params / 1e6:.1f} M | {dtype} | "
                      f"{llamas.get_num_threads()} |" + (f" {batch} |" if batched else "")
                      + f" {name} | {statistics.mean(rates):.2f} ± {sd:.2f} |", flush=True)
    if args.profile:
        print(prof.table(), file=sys.stderr)
    return 0


def _silence_stdout() -> None:
    """Points stdout at /dev/null: its reader is gone or its disk is full, and Python's own flush
    at exit would otherwise raise again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from . import cli_batch, cli_data, cli_serve, cli_train
        commands = {"generate": cmd_generate, "info": cmd_info, "bench": cmd_bench, "data": cli_data.run,
                    "convert": cmd_convert,
                    "train": cli_train.cmd_train,
                    "eval": lambda a: cli_train.cmd_eval(a, _model_path(a)),
                    "serve": lambda a: cli_serve.run(a, _model_path(a)),
                    "run-batch": lambda a: cli_batch.run(a, _model_path(a))}
        return commands[args.command](args)
    except LlamasError as e:
        print(f"llamas: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read our output has gone (`llamas generate ... | head`): stop quietly, as a tool
        # killed by SIGPIPE does, with stdout pointed at /dev/null so that Python's own flush at
        # exit does not raise again.
        _silence_stdout()
        return 141
    except OSError as e:  # a full disk, a read-only folder, --out naming a file: the reason, not a traceback
        try:
            sys.stdout.flush()
        except OSError:  # stdout itself failed (> /dev/full): nothing more can be written there
            _silence_stdout()
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"llamas: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
