"""`llamas train` and `llamas eval`."""
from __future__ import annotations

import json
import math
import os
import struct
import sys
import time
import zlib

from ._C import LlamasError
from .cli_args import add_dtype_args, positive_int as _positive_int, non_negative_int as _non_negative_int, finite_float as _finite_float


def add_parsers(sub, default_model_help: str) -> None:
    from .train import PRESETS
    t = sub.add_parser(
        "train", help="train or fine-tune a model on prepared token shards",
        description="Train a GPT-2 from scratch (--config) or fine-tune one (--model) on shards made by "
                    "`llamas data prepare`. Writes the model (Hugging Face layout), checkpoint.safetensors, "
                    "metrics.jsonl and loss.png (with matplotlib) into --out.")
    t.add_argument("--data", required=True, metavar="DIR", help="folder written by `llamas data prepare`")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR", help="fine-tune this model folder")
    src.add_argument("--config", metavar="NAME",
                     help=f"train from scratch: a preset ({', '.join(PRESETS)}) or a config.json path "
                          "(vocab_size comes from the data's tokenizer)")
    t.add_argument("--out", required=True, metavar="DIR", help="output folder")
    t.add_argument("--steps", type=_positive_int, required=True, help="total optimizer steps")
    t.add_argument("--batch", type=_positive_int, default=8, help="sequences per step (default 8)")
    t.add_argument("--seq", type=_positive_int, default=128, help="tokens per sequence (default 128)")
    t.add_argument("--micro-batch", type=_positive_int, default=None,
                   help="sequences per forward/backward; gradients accumulate over the step (default: --batch)")
    t.add_argument("--lr", type=_finite_float, default=3e-4, help="peak learning rate (default 3e-4)")
    t.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="cosine: linear warmup then cosine decay to --min-lr-ratio x lr (default); constant: lr")
    t.add_argument("--warmup", type=_non_negative_int, default=None,
                   help="warmup steps (default: 10%% of --steps, at most 200)")
    t.add_argument("--min-lr-ratio", type=_finite_float, default=0.1, help="cosine floor as a fraction of lr (default 0.1)")
    t.add_argument("--weight-decay", type=_finite_float, default=0.1, help="AdamW weight decay on 2-D weights (default 0.1)")
    t.add_argument("--beta1", type=_finite_float, default=0.9, help="AdamW beta1 (default 0.9)")
    t.add_argument("--beta2", type=_finite_float, default=0.95, help="AdamW beta2 (default 0.95)")
    t.add_argument("--grad-clip", type=_finite_float, default=1.0, help="global gradient-norm clip, 0 = off (default 1)")
    t.add_argument("--eval-every", type=_non_negative_int, default=100, help="validation every N steps, 0 = only at the end (default 100)")
    t.add_argument("--eval-batches", type=_positive_int, default=20, help="validation batches per evaluation (default 20)")
    t.add_argument("--save-every", type=_non_negative_int, default=200, help="checkpoint every N steps, 0 = only at the end (default 200)")
    t.add_argument("--seed", type=_non_negative_int, default=0, help="initialisation and data-order seed (default 0)")
    t.add_argument("--n-positions", type=_positive_int, default=None, help="context length of a new model (default: the preset's, or --seq where that is longer)")
    t.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.safetensors")
    t.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: all cores)")
    t.add_argument("--profile", action="store_true", help="print a per-op time table to stderr at the end")

    e = sub.add_parser("eval", help="loss and perplexity of a model on prepared shards or a text file",
                       description="Print the mean loss and perplexity of a model on a split of a prepared data folder "
                                   "(--data), or on a UTF-8 text file (--file: sliding windows of --seq tokens every "
                                   "--stride, through the inference engine, so --dtype and --kv-dtype both count).")
    e.add_argument("--model", default=None, metavar="DIR", help=default_model_help)
    source = e.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="DIR", help="folder written by `llamas data prepare`")
    source.add_argument("--file", metavar="FILE", help="a UTF-8 text file (- reads standard input)")
    e.add_argument("--stride", type=_positive_int, default=None,
                   help="with --file: tokens between window starts (default: half of --seq); each token is "
                        "counted once, so it has at least seq - stride tokens of context")
    e.add_argument("--max-tokens", type=_positive_int, default=None,
                   help="with --file: evaluate only the first N tokens of the text")
    e.add_argument("--split", default="val", help="split to evaluate (default val)")
    e.add_argument("--batch", type=_positive_int, default=8, help="sequences per batch (default 8)")
    e.add_argument("--seq", type=_positive_int, default=None, help="tokens per sequence (default: min(256, context))")
    e.add_argument("--max-batches", type=_positive_int, default=None, help="stop after N batches (default: all)")
    add_dtype_args(e)  # (--kv-dtype applies with --file only: cmd_eval says so)
    e.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: all cores)")


def _check_vocab(model, dataset, op: str = "train") -> None:
    if dataset.vocab_size > model.config.vocab_size:
        raise LlamasError(f"[{op}] the data's tokenizer has {dataset.vocab_size} tokens but the model's vocabulary "
                          f"has {model.config.vocab_size}: tokenize the data with the model's tokenizer")
    # The same ids must mean the same text: data tokenized with another tokenizer of a smaller
    # vocabulary trained (or scored) on ids the model reads as other tokens, without a word.
    if model.tokenizer is None:
        return
    from .tokenizer import Tokenizer
    try:
        theirs = Tokenizer.from_folder(dataset.tokenizer_dir)
    except LlamasError:
        return  # (a data folder without its tokenizer: nothing to compare)
    mine = model.tokenizer
    for i in range(min(theirs.vocab_size, mine.vocab_size)):
        if theirs.id_to_token(i) != mine.id_to_token(i):
            raise LlamasError(f"[{op}] the data was tokenized with another tokenizer than the model's (token {i} is "
                              f"{theirs.id_to_token(i)!r} in the data's, {mine.id_to_token(i)!r} in the model's): "
                              "tokenize the data with the model's tokenizer")


_DROPOUT_KEYS = ("embd_pdrop", "attn_pdrop", "resid_pdrop")


def _dropout_note(config_path: str) -> None:
    """llamas trains without dropout: say so when the config asks for it (GPT-2's own: 0.1 each),
    rather than let the run differ silently from what the config describes."""
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return  # (the load reports a config it cannot read)
    asked = {k: raw[k] for k in _DROPOUT_KEYS
             if isinstance(raw, dict) and isinstance(raw.get(k), (int, float)) and raw[k] > 0}
    if asked:
        print(f"note: {config_path} asks for dropout ({', '.join(f'{k} {v}' for k, v in asked.items())}); "
              "llamas trains without dropout", file=sys.stderr)


def _new_model(args, dataset):
    import llamas
    from .config import GPT2Config
    from .tokenizer import Tokenizer
    from .train import PRESETS, preset_config
    tokenizer = Tokenizer.from_folder(dataset.tokenizer_dir, dataset.eos_token_id)
    if args.model:
        model = llamas.load(args.model, dtype="float32")
        _check_vocab(model, dataset)
        _dropout_note(os.path.join(args.model, "config.json"))
        return model
    name = args.config or "small"
    if name in PRESETS:
        preset_positions = PRESETS[name]["n_positions"]
        n_positions = args.n_positions or max(preset_positions, args.seq)
        if n_positions != preset_positions and not args.n_positions:
            print(f"note: context {n_positions} (preset {name}'s is {preset_positions}) to fit --seq {args.seq}",
                  file=sys.stderr)
        config = preset_config(name, dataset.vocab_size, dataset.eos_token_id, n_positions)
    else:
        if not os.path.exists(name):
            raise LlamasError(f"[train] --config {name} is neither a preset ({', '.join(PRESETS)}) nor a "
                              "config.json file")
        config = GPT2Config.from_file(name)
        _dropout_note(name)
        if config.vocab_size < dataset.vocab_size:
            raise LlamasError(f"[train] {name} has vocab_size {config.vocab_size}, the data needs {dataset.vocab_size}")
    return llamas.create(config, seed=args.seed, tokenizer=tokenizer)


class _Progress:
    """One status line on stderr: redrawn in place on a terminal, a line every 10 steps otherwise."""

    def __init__(self, total: int):
        self.total = total
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.first_step = None

    def update(self, step: int, loss: float, val, tok_s: float, lr: float) -> None:
        now = time.perf_counter()
        if self.first_step is None:
            self.first_step, self.start = step - 1, now
        done = step - self.first_step
        eta = (now - self.start) / max(done, 1) * (self.total - step)
        val_text = f" | val {val:.4f}" if val is not None else ""
        line = (f"step {step}/{self.total} | loss {loss:.4f}{val_text} | {tok_s:,.0f} tok/s | lr {lr:.2e} | "
                f"ETA {int(eta // 60)}:{int(eta % 60):02d}")
        if self.tty:
            print("\r" + line + "\033[K", end="", file=sys.stderr, flush=True)
        elif step % 10 == 0 or step == self.total:
            print(line, file=sys.stderr, flush=True)

    def newline(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def _trim_metrics(path: str, steps_done: int) -> None:
    """On resume, drop records the interrupted run wrote after its last checkpoint."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= steps_done:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(kept)


def _plot(out: str, metrics_path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train, val = [], []
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                train.append((r["step"], r["loss"]))
            if "val_loss" in r:
                val.append((r["step"], r["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=0.8)
    if val:
        ax.plot(*zip(*val), label="validation", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=100)
    plt.close(fig)
    return True


def _warmup(flag, steps: int) -> int:
    """Warmup steps: --warmup, else 10% of the steps up to 200."""
    return flag if flag is not None else min(200, steps // 10)


def _run_settings(args, train_set) -> dict:
    """What must not change between a run and its resumption (the losses would differ)."""
    # The shards' own crc32s, combined: data prepared again with other text of the same size is
    # another run (its windows hold other tokens), found without reading the tokens again.
    data_crc = zlib.crc32(struct.pack(f"<{len(train_set.checksums)}I", *train_set.checksums))
    return {"batch": args.batch, "seq": args.seq, "seed": args.seed, "data_tokens": train_set.num_tokens,
            "data_crc32": f"{data_crc:#010x}", "steps": args.steps, "lr": args.lr, "schedule": args.schedule, "warmup": _warmup(args.warmup, args.steps),
            "min_lr_ratio": args.min_lr_ratio, "weight_decay": args.weight_decay, "beta1": args.beta1,
            "beta2": args.beta2, "grad_clip": args.grad_clip, "micro_batch": args.micro_batch}


def cmd_train(args) -> int:
    import llamas
    from . import data
    from .checkpoint import CHECKPOINT_NAME, read_checkpoint, restore_checkpoint, save_checkpoint
    from .config import GPT2Config
    from .train import PRESETS, Trainer, WarmupCosine, preset_config

    if args.threads is not None:
        llamas.set_num_threads(args.threads)
    train_set = data.TokenDataset(args.data, "train")
    try:
        val_set = data.TokenDataset(args.data, "val")
    except LlamasError:
        val_set = None
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, CHECKPOINT_NAME)
    for name in os.listdir(args.out):  # temporary files of a save that was killed
        if name.startswith(CHECKPOINT_NAME + ".") and name.endswith(".tmp"):
            os.unlink(os.path.join(args.out, name))
    metrics_path = os.path.join(args.out, "metrics.jsonl")

    state = None
    if args.resume and args.model:  # (it was ignored without a word)
        raise LlamasError("[train] --resume continues the run in --out from its own checkpoint: leave out --model")
    if not args.resume and os.path.exists(ckpt_path):  # a run's checkpoint is never overwritten unasked
        raise LlamasError(f"[train] {args.out} already holds a training run ({ckpt_path}); --resume continues it, "
                          "or give another --out (or delete that folder to start over)")
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise LlamasError(f"[train] --resume: {ckpt_path} not found")
        tensors, state = read_checkpoint(ckpt_path)
        if not isinstance(state.get("config"), dict) or not isinstance(state.get("loader"), dict):
            raise LlamasError(f"[train] --resume: {ckpt_path} holds a damaged training state (no config or loader "
                              "position)")
        config = GPT2Config.from_dict(state["config"])
        if args.config in PRESETS:
            wanted = preset_config(args.config, train_set.vocab_size, train_set.eos_token_id,
                                   args.n_positions or config.n_positions)
            if wanted.to_native() != config.to_native():
                raise LlamasError(f"[train] --resume: {ckpt_path} was written for a different config "
                                  f"({config.to_native()}), not --config {args.config} ({wanted.to_native()})")
        current = _run_settings(args, train_set)
        run = state.get("run")
        saved = dict(run) if isinstance(run, dict) else {}
        if saved.get("warmup", 0) is None:  # (written before the resolved count was kept)
            saved["warmup"] = _warmup(None, saved.get("steps", 0))
        changed = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in current.items()
                   if saved.get(k) != v and not (k == "data_crc32" and k not in saved)]  # (older runs: none)
        if changed:
            raise LlamasError(f"[train] --resume: {ckpt_path} was written with other settings ({'; '.join(changed)}); "
                              "resume with the same flags and data so the run continues exactly")
        from .tokenizer import Tokenizer
        model = llamas.create(config, seed=0,
                              tokenizer=Tokenizer.from_folder(train_set.tokenizer_dir, train_set.eos_token_id))
        _check_vocab(model, train_set)
    else:
        model = _new_model(args, train_set)
    if args.seq > model.config.n_positions:
        raise LlamasError(f"[train] --seq {args.seq} exceeds the model's context {model.config.n_positions}")

    warmup = _warmup(args.warmup, args.steps)
    schedule = WarmupCosine(warmup, args.steps, args.min_lr_ratio) if args.schedule == "cosine" else None
    trainer = Trainer(model, lr=args.lr, betas=(args.beta1, args.beta2), weight_decay=args.weight_decay,
                      grad_clip=args.grad_clip, schedule=schedule, micro_batch_size=args.micro_batch)
    loader = data.DataLoader(train_set, args.batch, args.seq, seed=args.seed, shuffle=True)
    val_loader = None
    if val_set is not None:
        try:
            windows = data.DataLoader(val_set, 1, args.seq, shuffle=False).num_windows
            val_loader = data.DataLoader(val_set, min(args.batch, windows), args.seq, shuffle=False)
        except LlamasError as e:
            print(f"note: no validation ({e})", file=sys.stderr)
    if state is not None:
        try:
            restore_checkpoint(trainer, tensors, state, ckpt_path)
            loader.load_state_dict(state["loader"])
        except LlamasError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a hand-edited or damaged state
            raise LlamasError(f"[train] --resume: {ckpt_path} holds a damaged training state ({type(e).__name__}: "
                              f"{str(e)[:120]})") from None
        _trim_metrics(metrics_path, trainer.steps_done)
        if trainer.steps_done >= args.steps:  # a finished run: its model is already saved beside the checkpoint
            print(f"{ckpt_path} is already at step {trainer.steps_done} of {args.steps}: nothing left to train "
                  f"(the model is in {args.out})", file=sys.stderr)
            return 0
        print(f"resumed from {ckpt_path} at step {trainer.steps_done}", file=sys.stderr)
    elif os.path.exists(metrics_path):
        os.unlink(metrics_path)

    run_info = _run_settings(args, train_set)
    c = model.config
    print(f"model: gpt2 {c.num_parameters() / 1e6:.2f}M params (n_layer {c.n_layer}, n_embd {c.n_embd}, "
          f"n_head {c.n_head}, vocab {c.vocab_size}, context {c.n_positions}); data: {train_set.num_tokens:,} "
          f"train tokens, {val_set.num_tokens if val_set else 0:,} val tokens; {args.steps} steps of "
          f"{args.batch}x{args.seq} tokens", file=sys.stderr)

    saved = [trainer.steps_done if state is not None else None]  # the step of the last checkpoint

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, trainer, {"config": c.to_hf_dict(), "loader": loader.state_dict(), "run": run_info})
        model.save(args.out)
        saved[0] = trainer.steps_done

    progress = _Progress(args.steps)
    val_loss = None
    with llamas.profile(enabled=args.profile) as prof, open(metrics_path, "a", encoding="utf-8") as metrics:
        try:
            while trainer.steps_done < args.steps:
                inputs, targets = loader.next_batch()
                t0 = time.perf_counter()
                try:
                    loss = trainer.step(inputs, targets)
                except LlamasError as e:
                    progress.newline()
                    kept = f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint was written yet"
                    raise LlamasError(f"{e}; training stopped, {kept}") from None
                dt = time.perf_counter() - t0
                step = trainer.steps_done
                record = {"step": step, "loss": loss, "lr": trainer.last_lr, "grad_norm": trainer.last_grad_norm,
                          "tokens_per_s": inputs.size / dt, "time_s": dt}
                last = step == args.steps
                if val_loader is not None and ((args.eval_every and step % args.eval_every == 0) or last):
                    val_loss = trainer.evaluate(val_loader, max_batches=args.eval_batches)
                    record["val_loss"] = val_loss
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                progress.update(step, loss, val_loss, inputs.size / dt, trainer.last_lr)
                if (args.save_every and step % args.save_every == 0) or last:
                    checkpoint()
        except KeyboardInterrupt:  # Ctrl-C: say what is kept and how to go on
            progress.newline()
            kept = (f"the last checkpoint is step {saved[0]} in {ckpt_path}: the same command with --resume continues "
                    "from it") if saved[0] is not None else "no checkpoint was written yet"
            print(f"interrupted at step {trainer.steps_done} of {args.steps}; {kept}", file=sys.stderr)
            raise
    progress.newline()
    summary = f"done: {args.steps} steps, final train loss {loss:.4f}"
    if val_loss is not None:
        summary += f", val loss {val_loss:.4f} (perplexity {math.exp(val_loss):.1f})"
    print(summary + f"; model saved in {args.out}", file=sys.stderr)
    if _plot(args.out, metrics_path):
        print(f"loss curve: {os.path.join(args.out, 'loss.png')}", file=sys.stderr)
    if args.profile:
        print(prof.table(), file=sys.stderr)
    return 0


def cmd_eval(args, model_path: str) -> int:
    import llamas
    from . import data
    from .train import evaluate
    if args.threads is not None:
        llamas.set_num_threads(args.threads)
    if args.file is not None:
        return _eval_text(args, model_path)
    for flag in ("stride", "max_tokens", "kv_dtype"):
        if getattr(args, flag) is not None:
            raise LlamasError(f"[eval] --{flag.replace('_', '-')} applies to --file only")
    model = llamas.load(model_path, dtype=args.dtype, compute_dtype=args.compute_dtype)
    dataset = data.TokenDataset(args.data, args.split)
    _check_vocab(model, dataset, "eval")
    seq = args.seq or min(256, model.config.n_positions)
    if seq > model.config.n_positions:
        raise LlamasError(f"[eval] --seq {seq} exceeds the model's context {model.config.n_positions}")
    loader = data.DataLoader(dataset, args.batch, seq, shuffle=False)
    loss = evaluate(model, loader, args.max_batches)
    n_batches = len(loader) if args.max_batches is None else min(len(loader), args.max_batches)
    print(f"split {args.split}: loss {loss:.4f} nats/token, perplexity {math.exp(loss):.2f} "
          f"({n_batches * args.batch * seq:,} tokens)")
    return 0


def _eval_text(args, model_path: str) -> int:
    import llamas
    from .cli import read_text
    from .text_eval import text_perplexity
    model = llamas.load(model_path, dtype=args.dtype, kv_dtype=args.kv_dtype, compute_dtype=args.compute_dtype)
    if model.tokenizer is None:
        raise LlamasError("[eval] this model has no tokenizer, so it cannot read a text file")
    text = read_text(args.file, "eval")
    ids = model.tokenizer.encode(text)
    if args.max_tokens is not None:
        ids = ids[:args.max_tokens]
    seq = args.seq or model.config.n_positions
    if seq > model.config.n_positions:
        raise LlamasError(f"[eval] --seq {seq} exceeds the model's context {model.config.n_positions}")
    stride = args.stride or max(1, seq // 2)
    if stride > seq:
        raise LlamasError(f"[eval] --stride {stride} is longer than --seq {seq}: tokens between windows would be skipped")
    tty = sys.stderr.isatty()

    def progress(done, total, nll):
        if tty or done == total:
            end = "\n" if done == total else ""
            print(f"\r[eval] {done}/{total} windows, perplexity so far {math.exp(nll):.3f}", end=end,
                  file=sys.stderr, flush=True)

    r = text_perplexity(model, ids, seq, stride, args.batch, progress)
    print(f"{args.file}: loss {r['nll']:.4f} nats/token, perplexity {r['perplexity']:.3f} ({r['tokens']:,} tokens, "
          f"{r['windows']} windows of {seq} every {stride}; {model.dtype} weights, {model.kv_dtype} KV cache, "
          f"{model.compute_dtype} compute)")
    return 0
