"""Model loading and generation."""
from __future__ import annotations

import operator
import os
import time
from typing import Optional, Sequence, Union

import numpy as np

from . import _C
from ._C import LlamasError
from .config import GPT2Config, read_json_object
from .dtypes import COMPUTE_DTYPES, KV_DTYPES, WEIGHT_DTYPES, one_of
from .engine import Request, SamplingOptions, Scheduler, check_max_new_tokens, make_stop_rules
from .request import check_top_n
from .speculative import check_speculative_ngram
from .step_timing import StepTiming
from .tokenizer import Tokenizer

Prompt = Union[str, Sequence[int]]

# What `generate` uses for a sampling parameter given neither by the caller nor by the model's
# generation_config.json: greedy decoding, no filtering, no penalties.
_SAMPLING_DEFAULTS = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
                      "presence_penalty": 0.0, "frequency_penalty": 0.0}


def _read_generation_config(path: str) -> dict:
    """The sampling defaults of a Hugging Face generation_config.json (used when do_sample is true;
    repetition_penalty always)."""
    file = os.path.join(path, "generation_config.json")
    if not os.path.exists(file):
        return {}
    raw = read_json_object(file, "")
    keys = ("temperature", "top_k", "top_p", "repetition_penalty") if raw.get("do_sample") else ("repetition_penalty",)
    out = {k: raw[k] for k in keys if raw.get(k) is not None}  # (null: not set)
    # Checked now, naming the file (at generate it read as if the caller had passed the value)
    try:
        SamplingOptions(**{k: out.get(k, d) for k, d in _SAMPLING_DEFAULTS.items()}, seed=0)
    except LlamasError as e:
        raise LlamasError(f"[load] {file}: {str(e).replace('[generate] ', '')}") from None
    if raw.get("do_sample"):
        out["do_sample"] = True
    return out


class Model:
    """A loaded model: `generate`, `forward`, `config`, `tokenizer`."""

    def __init__(self, native, config: GPT2Config, tokenizer: Optional[Tokenizer], path: Optional[str],
                 generation_config: Optional[dict] = None):
        self._native = native
        self.config = config
        self.tokenizer = tokenizer
        self.path = path
        # Sampling defaults from the model folder's generation_config.json ({} = greedy).
        self.generation_config = dict(generation_config or {})
        self._constraint_vocab = None  # structured output's native token table, built on first use

    @property
    def dtype(self) -> str:
        return self._native.dtype

    @property
    def kv_dtype(self) -> str:
        """Entry type of the KV caches ('float32', 'bfloat16' or 'int8'; the weights' dtype, or
        bfloat16 for int8 weights, unless load was given kv_dtype)."""
        return self._native.kv_dtype

    @property
    def kv_block_bytes(self) -> int:
        """Bytes of one KV-cache block: 16 positions of every layer's keys and values in kv_dtype
        (GPT-2 124M: 1.18 MB in float32, so a sequence of 1,024 positions holds 75.5 MB)."""
        return self._native.kv_block_bytes

    @property
    def compute_dtype(self) -> str:
        """The dtype of the matrix products' activations: 'float32', or 'bfloat16' or 'int8' when
        load was given that compute_dtype (see llamas.load)."""
        return self._native.compute_dtype

    @property
    def weight_bytes(self) -> int:
        return self._native.weight_bytes

    @property
    def weights_streamed(self) -> bool:
        """Whether the weights are larger than the last-level cache (llamas.info()'s
        last_level_cache_bytes), so that each token reads them from memory: batch-1 decode's products then
        read one weight panel at a time (the same results)."""
        return self._native.weights_streamed

    def __repr__(self) -> str:
        c = self.config
        return (f"Model(gpt2, {c.num_parameters() / 1e6:.1f}M params, n_layer={c.n_layer}, n_embd={c.n_embd}, "
                f"n_head={c.n_head}, vocab={c.vocab_size}, dtype={self.dtype}, kv_dtype={self.kv_dtype}, "
                f"compute_dtype={self.compute_dtype}, "
                f"path={self.path!r})")

    # ---- saving ------------------------------------------------------------------------------
    def save(self, folder: str) -> None:
        """Writes the Hugging Face layout: config.json, model.safetensors (names with the
        "transformer." prefix, Conv1D (in, out) matrices, lm_head tied to wte) and the tokenizer
        files. `llamas.load` and transformers' GPT2LMHeadModel.from_pretrained both read it."""
        from .safetensors_io import write_safetensors
        folder = os.fspath(folder)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise LlamasError(f"[save] {folder} exists and is not a folder")
        os.makedirs(folder, exist_ok=True)
        tensors = dict(self._native.named_weights())
        write_safetensors(os.path.join(folder, "model.safetensors"), tensors, {"format": "pt"})
        self.config.save(folder)
        if self.tokenizer is not None:
            self.tokenizer.save(folder, model_max_length=self.config.n_positions)
        if self.generation_config:
            import json
            with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
                json.dump(self.generation_config, f, indent=2)

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, ids) -> np.ndarray:
        """Logits for every position: int (B, T) -> float32 (B, T, vocab)."""
        arr = np.asarray(ids)
        if arr.ndim == 1:
            raise LlamasError(f"[forward] ids must be 2-D (B, T); got shape {arr.shape} (wrap a single sequence in a list)")
        if arr.ndim != 2 or arr.size == 0:
            raise LlamasError(f"[forward] ids must be a non-empty 2-D (B, T) array, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise LlamasError(f"[forward] ids must be integers, got dtype {arr.dtype}")
        if arr.shape[1] > self.config.n_positions:  # (each row is a sequence: B rows of T may total more)
            raise LlamasError(f"[forward] sequences of {arr.shape[1]} tokens but the context length is "
                              f"{self.config.n_positions}")
        self._check_id_range(int(arr.min()), int(arr.max()), "forward")
        return self._native.forward(np.ascontiguousarray(arr, dtype=np.int32))

    def _check_id_range(self, lo: int, hi: int, op: str) -> None:
        if lo < 0 or hi >= self.config.vocab_size:
            raise LlamasError(f"[{op}] token id {lo if lo < 0 else hi} is out of range [0, {self.config.vocab_size})")

    def _check_ids(self, ids: Sequence[int], op: str) -> None:
        if len(ids) == 0:
            raise LlamasError(f"[{op}] empty prompt: give at least one token")
        self._check_id_range(min(ids), max(ids), op)
        if len(ids) > self.config.n_positions:
            raise LlamasError(f"[{op}] prompt has {len(ids)} tokens but the context length is {self.config.n_positions}")

    # ---- generation --------------------------------------------------------------------------
    def _encode_prompt(self, prompt: Prompt, op: str = "generate") -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise LlamasError(f"[{op}] this model has no tokenizer; pass token ids instead of text")
            if prompt == "":
                raise LlamasError(f"[{op}] empty prompt: give at least one character")
            ids = self.tokenizer.encode(prompt)
        else:
            # bytes iterate as ints, and int() truncates floats: either would pass as wrong token ids.
            if isinstance(prompt, (bytes, bytearray, memoryview)):
                raise LlamasError(f"[{op}] a prompt is a str or a list of int token ids, got "
                                  f"{type(prompt).__name__} (decode it to str first)")
            try:
                items = list(prompt)
            except TypeError:
                raise LlamasError(f"[{op}] a prompt is a str or a list of int token ids") from None
            ids = []
            for item in items:
                if isinstance(item, (bool, np.bool_)):
                    raise LlamasError(f"[{op}] token ids must be ints, not bools")
                try:
                    ids.append(operator.index(item))
                except TypeError:
                    if isinstance(item, (str, list, tuple)):
                        raise LlamasError(f"[{op}] a prompt is a str or a list of int token ids") from None
                    raise LlamasError(f"[{op}] token ids must be ints, got {type(item).__name__} {str(item)[:40]}") from None
        self._check_ids(ids, op)
        return ids

    def sampling_values(self, **given) -> dict:
        """The seven sampling parameters (temperature, top_k, top_p, min_p, repetition_penalty,
        presence_penalty, frequency_penalty): each as given, or when None (or left out) the model's
        generation_config.json value, else greedy / off. What generate and Engine.submit use."""
        unknown = set(given) - set(_SAMPLING_DEFAULTS)
        if unknown:
            raise TypeError(f"not a sampling parameter: {', '.join(sorted(unknown))}")
        return {k: given[k] if given.get(k) is not None else self.generation_config.get(k, d)
                for k, d in _SAMPLING_DEFAULTS.items()}

    def generate(self, prompt: Union[Prompt, list], max_new_tokens: int = 128, temperature: Optional[float] = None,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
                 repetition_penalty: Optional[float] = None, seed: Optional[int] = None,
                 stop: Union[str, Sequence[str], None] = None, stream: bool = False,
                 presence_penalty: Optional[float] = None, frequency_penalty: Optional[float] = None,
                 stop_token_ids: Optional[Sequence[int]] = None, min_tokens: int = 0, ignore_eos: bool = False,
                 include_stop_str_in_output: bool = False, json_object: bool = False,
                 choices: Optional[Sequence[str]] = None, json_schema=None, regex: Optional[str] = None,
                 grammar: Optional[str] = None, skip_special_tokens: bool = False, speculative_ngram: int = 0):
        """Generates a continuation.

        A str prompt returns the generated str; a list of token ids returns the generated ids;
        a list of str (or of id lists) generates a batch and returns a list. With stream=True, a
        single prompt returns an iterator of text pieces (or of ids for id prompts). Generation
        stops at the end-of-text token (unless ignore_eos), at a token of stop_token_ids, at a
        stop string (not included unless include_stop_str_in_output) or after max_new_tokens;
        never at the first three before min_tokens tokens. json_object=True holds the output to one
        JSON object (it ends at end-of-text once the object closes); choices=[...] to exactly one of
        those strings (vLLM's guided_choice); json_schema={...} (a dict, or its JSON text) to an
        instance of that JSON Schema (see llamas.json_schema for what is supported); regex="..." to
        text that is a whole match of that regular expression (vLLM's guided_regex; the syntax is in
        llamas.regex_parse); grammar="root ::= ..." to text a GBNF grammar derives (llama.cpp's
        grammars, vLLM's guided_grammar; see llamas.grammar). temperature=0 is greedy decoding. A
        sampling parameter left as None takes the model's generation_config.json value, else
        greedy / off. skip_special_tokens=True leaves special tokens' text (an end-of-text drawn
        with ignore_eos) out of the text, as vLLM does by default; ids are unchanged.
        speculative_ngram=K (0: off) drafts up to K tokens a step from earlier text that the last
        tokens repeat (prompt lookup decoding) and verifies them in one step (llamas.speculative):
        the output is the same tokens, greedy or sampled from a seed, in fewer steps where the text
        repeats itself. Not with structured output, logprobs or min_tokens (those decode as usual).
        """
        values = self.sampling_values(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                      repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                      frequency_penalty=frequency_penalty)
        options = SamplingOptions(values["temperature"], values["top_k"], values["top_p"], values["min_p"],
                                  values["repetition_penalty"], values["presence_penalty"],
                                  values["frequency_penalty"], seed, json_object=json_object, choices=choices,
                                  json_schema=json_schema, regex=regex, grammar=grammar)
        if options.constrained:
            self.constraint_vocab()
        check_max_new_tokens(max_new_tokens)
        check_speculative_ngram(speculative_ngram, "generate")
        if not isinstance(stream, bool):  # ("no" would be true)
            raise LlamasError(f"[generate] stream must be True or False, got {stream!r}")
        stops = make_stop_rules(stop, stop_token_ids, min_tokens, ignore_eos, include_stop_str_in_output,
                                self.config.vocab_size, max_new_tokens, skip_special_tokens=skip_special_tokens)
        prompts, batched = _as_batch(prompt)
        as_text = [isinstance(p, str) for p in prompts]
        encoded = [self._encode_prompt(p) for p in prompts]
        if stream:
            if batched:
                raise LlamasError("[generate] stream=True takes a single prompt, not a batch")
            timing = StepTiming()  # the scheduler's counters, for stats()
            finish = [None]
            return GenerationStream(self._events([encoded[0]], max_new_tokens, options, stops, speculative_ngram,
                                                 timing, finish), as_text[0], len(encoded[0]), timing, finish)
        results = self._run(encoded, max_new_tokens, options, stops, speculative_ngram)
        outputs = [r.text if t else r.ids for r, t in zip(results, as_text)]
        return outputs if batched else outputs[0]

    def constraint_vocab(self):
        """The native table of token bytes that structured output (JSON mode, json_schema, regex,
        grammar, choices) masks with (built once); LlamasError when the tokenizer is not byte-level
        BPE, or there is no end-of-text token to end a constrained output with."""
        if self._constraint_vocab is None:
            tb = self.tokenizer.token_bytes() if self.tokenizer is not None else None
            if tb is None:
                raise LlamasError("[generate] structured output needs a byte-level BPE tokenizer (GPT-2's); this "
                                  "model's " + ("has none" if self.tokenizer is None else "is another kind"))
            eos = self.tokenizer.eos_token_id
            if eos is None:
                raise LlamasError("[generate] structured output needs an end-of-text token; this tokenizer has none")
            self._constraint_vocab = _C.TokenBytes(tb, eos)
        return self._constraint_vocab

    def score(self, prompt: Union[Prompt, list], top_logprobs: int = 0):
        """Log-probabilities of a prompt's own tokens: for each token, log p(token | the tokens
        before it) under the model, and the top_logprobs (0-20) most likely tokens at that position.

        A str or a list of token ids returns a list with one entry per prompt token: None for the
        first (nothing precedes it), then `TokenLogprob(token_id, logprob, top)`. A list of prompts
        returns a list of those lists. Runs through the same scheduler as generate, in bounded
        chunks, and generates nothing. The sum of the entries' logprobs is the prompt's
        log-likelihood (its negative over the tokens after the first, the per-token loss).
        """
        check_top_n(top_logprobs, "top_logprobs", "score", optional=False)
        prompts, batched = _as_batch(prompt)
        encoded = [self._encode_prompt(p, "score") for p in prompts]
        # A scored chunk keeps its logits for every row: at most 512 prompt rows a step (GPT-2: 512 x
        # 50257 floats, 103 MB) and 8 sequences at once, so a long batch of long prompts streams
        # through in bounded memory. The scores are the same bits in any chunking.
        sched = Scheduler(self, max_batch=min(len(encoded), 8), prefill_chunk=min(256, self.config.n_positions),
                          max_prefill_tokens=512)
        sched.log_errors = False  # the caller gets the error raised
        chunks: list = [None] * len(encoded)  # each request's one chunk (it generates nothing)
        for i, ids in enumerate(encoded):
            sched.add(Request(ids, 0, SamplingOptions(seed=0), sink=lambda c, i=i: chunks.__setitem__(i, c),
                              prompt_logprobs=top_logprobs))
        try:
            while sched.step():
                pass
        finally:
            sched.abort_all()
        for c in chunks:
            if c.error is not None:
                raise LlamasError(_op_error("score", c.error))
        results = [c.prompt_logprobs for c in chunks]
        return results if batched else results[0]

    def _run(self, prompts, max_new_tokens, options, stops, speculative_ngram=0) -> list["_Result"]:
        results = [_Result() for _ in prompts]
        for index, piece, token in self._events(prompts, max_new_tokens, options, stops, speculative_ngram):
            if piece:
                results[index].text += piece
            if token is not None:
                results[index].ids.append(token)
        return results

    def _events(self, prompts, max_new_tokens, options, stops, speculative_ngram=0, timing=None, finish=None):
        """Yields (prompt index, new text piece, accepted token id or None) as generation runs.
        Drives the same Scheduler as llamas.Engine and the server, synchronously: every prompt is
        admitted at once and prefilled whole, then batched decode steps run over the live ones.
        timing, if given, is the StepTiming the scheduler counts into; finish, if given, a list
        that gets each prompt's finish reason ("stop" or "length") at its index."""
        sched = Scheduler(self, max_batch=len(prompts), prefill_chunk=self.config.n_positions,
                          max_prefill_tokens=None, speculative_ngram=speculative_ngram)
        sched.log_errors = False  # the caller gets the error raised
        if timing is not None:
            sched.timing = timing
        out: list = []
        for i, ids in enumerate(prompts):
            sched.add(Request(ids, max_new_tokens, options, stops, sink=lambda c, i=i: out.append((i, c))))
        try:
            while sched.step() or out:
                for i, chunk in out:
                    if chunk.error is not None:
                        raise LlamasError(_op_error("generate", chunk.error))
                    if finish is not None and chunk.finish_reason is not None:
                        finish[i] = chunk.finish_reason
                    if chunk.token_ids:
                        for k, token in enumerate(chunk.token_ids):
                            yield i, chunk.text if k == 0 else "", token
                    else:
                        yield i, chunk.text, None
                out.clear()
        finally:
            sched.abort_all()  # a generator closed early frees its sequences' KV memory


def _op_error(op: str, message: str) -> str:
    """An engine error for the caller of `op`, which names its own op when it has one
    ("[sample] logits are NaN", not "[generate] [sample] ...")."""
    return message if message.startswith("[") else f"[{op}] {message}"


def _as_batch(prompt) -> tuple:
    """(prompts, batched): a list of str or of id lists (or a 2-D id array) is a batch; a str or
    one list of ids is a single prompt."""
    if isinstance(prompt, np.ndarray) and prompt.ndim == 2:
        return prompt.tolist(), True
    if isinstance(prompt, (list, tuple)) and len(prompt) > 0 and not isinstance(prompt[0], (int, np.integer)):
        return list(prompt), True
    return [prompt], False


class GenerationStream:
    """What `generate(..., stream=True)` returns: an iterator of text pieces (or token ids for an id
    prompt) that also counts what it produced. `stats()` gives prompt_tokens, generated_tokens
    (accepted ones), time_to_first_token_s and total_s (from the first next() call), the
    forward steps it took with the speculative drafts fed and accepted in them, and once the
    stream has ended its finish_reason, as the server's: "stop" (end-of-text, a stop string or
    token, or a structured output completed) or "length" (max_new_tokens, or the model's context,
    ended it); closing it (or dropping it) early frees the sequence's KV memory ("cancelled")."""

    def __init__(self, events, as_text: bool, prompt_tokens: int, timing: StepTiming, finish: Optional[list] = None):
        self._events = events
        self._timing = timing
        self._finish = finish if finish is not None else [None]
        self._as_text = as_text
        self.prompt_tokens = prompt_tokens
        self.generated_tokens = 0
        self._start: Optional[float] = None
        self._first: Optional[float] = None
        self._end: Optional[float] = None

    def __iter__(self) -> "GenerationStream":
        return self

    def __next__(self):
        if self._start is None:
            self._start = time.perf_counter()
        while True:
            try:
                _, piece, token = next(self._events)
            except StopIteration:
                if self._end is None:
                    self._end = time.perf_counter()
                raise
            if token is not None:
                self.generated_tokens += 1
                if self._first is None:
                    self._first = time.perf_counter()
            if self._as_text:
                if piece:
                    return piece
            elif token is not None:
                return token

    def close(self) -> None:
        self._events.close()
        if self._finish[0] is None:  # closed before its end: as the server calls such a sequence
            self._finish[0] = "cancelled"
            if self._end is None:
                self._end = time.perf_counter()

    def stats(self) -> dict:
        end = self._end if self._end is not None else time.perf_counter()
        start = self._start if self._start is not None else end
        t = self._timing
        return {"prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
                "time_to_first_token_s": None if self._first is None else self._first - start,
                "total_s": end - start, "steps": t.steps, "draft_tokens": t.draft_tokens,
                "accepted_tokens": t.accepted_tokens, "finish_reason": self._finish[0]}


class _Result:
    __slots__ = ("text", "ids")

    def __init__(self):
        self.text = ""
        self.ids: list[int] = []


def default_model_path() -> str:
    """The model bundled with the package: a small GPT-2 trained by llamas on Shakespeare."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "shakespeare")


def _weight_files(path: str) -> list:
    """model.safetensors, or the shards model.safetensors.index.json names (in its order)."""
    weights = os.path.join(path, "model.safetensors")
    if os.path.exists(weights):
        return [weights]
    index = weights + ".index.json"
    if os.path.exists(index):
        weight_map = read_json_object(index, "load").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(f, str) and f and os.path.basename(f) == f for f in weight_map.values()):
            raise LlamasError(f"[load] {index}: 'weight_map' must map tensor names to shard file names in the folder")
        files = [os.path.join(path, f) for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not os.path.exists(f):
                raise LlamasError(f"[load] {f} not found (a shard {index} names)")
        return files
    if any(os.path.exists(os.path.join(path, f)) for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise LlamasError(f"[load] {weights} not found; the folder has a PyTorch checkpoint (pytorch_model.bin): "
                          f"run `llamas convert {path}` once to write model.safetensors from it")
    raise LlamasError(f"[load] {weights} not found (only safetensors checkpoints are supported)")


def check_dtypes(dtype: str, kv_dtype: Optional[str], compute_dtype: str, op: str = "load") -> None:
    """Raises LlamasError naming the field when load's dtype arguments are not a valid choice."""
    if dtype not in WEIGHT_DTYPES:
        raise LlamasError(f"[{op}] dtype must be {one_of(WEIGHT_DTYPES)}, got {dtype!r}")
    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        raise LlamasError(f"[{op}] kv_dtype must be {one_of(KV_DTYPES)} (or None: the weights' default), "
                          f"got {kv_dtype!r}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise LlamasError(f"[{op}] compute_dtype must be {one_of(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    if compute_dtype == "bfloat16" and dtype == "float32":
        raise LlamasError(f"[{op}] compute_dtype='bfloat16' needs bfloat16 or int8 weights: pass dtype='bfloat16' "
                          "(or 'int8') too")
    if compute_dtype == "int8" and dtype != "int8":
        raise LlamasError(f"[{op}] compute_dtype='int8' needs int8 weights: pass dtype='int8' too")


def load(path: Optional[str] = None, dtype: str = "float32", kv_dtype: Optional[str] = None,
         compute_dtype: str = "float32") -> Model:
    """Loads a Hugging Face model folder (config.json, model.safetensors, tokenizer files); with no
    path, the bundled Shakespeare model.

    float32 weights are memory-mapped, not copied; dtype="bfloat16" converts the matrices once
    (halving the bytes each decoded token reads); dtype="int8" quantizes them once (each column's
    weights 32 rows at a time as int8 times a float32 scale: 1.125 bytes a weight; activations stay
    float32). kv_dtype ('float32', 'bfloat16' or 'int8'; default: the same as dtype, bfloat16 for
    int8) is what the KV cache stores: bfloat16 halves its memory and the bytes attention reads per
    token, at bfloat16 rounding of keys and values; int8 quarters them (plus a float32 scale per
    head and position), each head's key and value vectors quantized as int8 weights are.
    compute_dtype="bfloat16" (with dtype "bfloat16" or "int8") also rounds each matrix product's
    activations to bfloat16 and sums them in k pairs, as the AVX512_BF16 instruction VDPBF16PS
    does: prefill about twice as fast on CPUs that have it (Zen 4, Sapphire Rapids), bit-identical
    results elsewhere (emulated, slower), at one more bfloat16 rounding per product.
    compute_dtype="int8" (with dtype "int8") quantizes the activations too, 32 values at a time as
    the weights are, and sums each block's int8 products exactly in integers before scaling (W8A8,
    as llama.cpp's Q8_0 x Q8_0 dot products): VPDPBUSD does 64 multiply-adds an instruction on CPUs
    with AVX512_VNNI (Zen 4, Ice Lake and later), so prefill and batched decode run ~1.3x faster
    than bfloat16 compute and batch-1 decode reads its weights at memory speed; bit-identical
    results elsewhere (plain integer loops, slower)."""
    check_dtypes(dtype, kv_dtype, compute_dtype)
    path = default_model_path() if path is None else os.fspath(path)
    if not os.path.isdir(path):
        raise LlamasError(f"[load] {path} is not a folder (expected a Hugging Face model folder)")
    config = GPT2Config.from_file(os.path.join(path, "config.json"))
    # (as bytes: a file name that is not UTF-8 reaches Python with surrogate escapes, which no str
    # converts to C++'s std::string, but its bytes do)
    native = _C.GPT2Model(config.to_native(), [os.fsencode(f) for f in _weight_files(path)], dtype)
    if kv_dtype is not None:
        native.kv_dtype = kv_dtype
    native.compute_dtype = compute_dtype
    tokenizer = None
    if any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json")):
        tokenizer = Tokenizer.from_folder(path, config.eos_token_id)
    return Model(native, config, tokenizer, path, _read_generation_config(path))
