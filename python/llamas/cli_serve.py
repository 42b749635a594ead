"""`llamas serve`: the OpenAI-compatible HTTP server."""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import socket
import sys

from ._C import LlamasError
from .cli_args import add_engine_args, finite_float as _non_negative_float, positive_int as _positive_int
from .cli_args import non_negative_int as _non_negative_int, port_number


def add_parser(sub, model_help: str) -> None:
    s = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server with continuous batching",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                    "/v1/models, /tokenize, /detokenize, /tokenizer_info, /health, /metrics, /version) with continuous "
                    "batching. "
                    "SIGTERM (or Ctrl-C) stops accepting, finishes running requests, then exits.",
        epilog="Example: llamas serve --model DIR, then use the openai client with "
               "base_url='http://127.0.0.1:8000/v1' and api_key='none'.")
    add_engine_args(s, model_help)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=port_number, default=8000, help="port (default 8000)")
    key = s.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None, metavar="KEY",
                     help="require 'Authorization: Bearer KEY' (except /health and /metrics); "
                          "default: $LLAMAS_API_KEY if set, else no key")
    key.add_argument("--api-key-file", default=None, metavar="F", help="read the API key from file F (first line)")
    s.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model id clients send and /v1/models lists (default: the model folder's name)")
    s.add_argument("--max-queue", type=_non_negative_int, default=256,
                   help="sequences that may wait for a place in the batch; beyond that requests get 429 (default 256)")
    s.add_argument("--max-body-bytes", type=_positive_int, default=1 << 20,
                   help="larger request bodies get 413 (default 1048576)")
    s.add_argument("--prefill-chunk", type=_positive_int, default=128,
                   help="prompt tokens fed per sequence per step, so long prompts do not stall running streams "
                        "(default 128)")
    s.add_argument("--prefix-cache-mb", type=_non_negative_float, default=0.0, metavar="MB",
                   help="keep up to MB MiB of finished requests' KV blocks, so a request that starts with the same "
                        "tokens (a shared system prompt, the earlier turns of a chat, one context scored with "
                        "several continuations) skips computing them; usage reports them as cached_tokens "
                        "(default 0: off)")
    s.add_argument("--speculative-ngram", type=_non_negative_int, default=0, metavar="K",
                   help="draft up to K tokens a step from earlier text that a request's last tokens repeat "
                        "(prompt lookup decoding, vLLM's ngram method) and verify them in one step: the same tokens, "
                        "greedy or sampled from a seed; drafts are made only where "
                        "the step times measured so far say they pay (default 0: off)")
    s.add_argument("--stream-interval", type=_positive_int, default=1, metavar="N",
                   help="a streamed response sends its first text at once, then one event per N tokens and the "
                        "rest when it ends (vLLM's --stream-interval): fewer wake-ups and socket writes per token at "
                        "high concurrency, burstier streams (default 1: an event per token)")
    s.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000; * for any) call the API from a "
                        "browser (CORS); repeatable; default: none")
    s.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="jinja2 chat template for /v1/chat/completions, a file or the template itself, instead of "
                        "the model's tokenizer_config.json chat_template (default: the model's, else one "
                        "'role: content' line per message)")
    s.add_argument("--generation-config", default="auto", choices=["auto", "none"],
                   help="auto: sampling fields a request leaves out take the model's generation_config.json values "
                        "(temperature, top_k, top_p, repetition_penalty), as llamas generate does (default); "
                        "none: OpenAI's defaults (temperature 1, no top-k, no penalty)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log level; one JSON line per request at info (logger llamas.server)")
    s.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text: the request lines and events are JSON, uvicorn's own lines plain text (default); "
                        "json: every line a JSON object, uvicorn's and tracebacks included (for log collectors)")


class _JsonLines(logging.Formatter):
    """--log-format json: the request lines and events are JSON already; any other record (uvicorn's,
    a warning, a traceback) becomes {"event": "log", "level", "logger", "message"[, "traceback"]}."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if message.startswith("{") and not record.exc_info:
            return message
        line = {"event": "log", "level": record.levelname.lower(), "logger": record.name, "message": message}
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"))


def _api_key(args) -> str | None:
    if args.api_key_file is not None:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except OSError as e:
            raise LlamasError(f"[serve] cannot read --api-key-file: {e}") from None
        if not key:
            raise LlamasError(f"[serve] --api-key-file {args.api_key_file} is empty")
        return key
    if args.api_key is not None:
        if not args.api_key.strip():
            raise LlamasError("[serve] --api-key is empty")
        return args.api_key.strip()
    return os.environ.get("LLAMAS_API_KEY") or None


def _chat_template(arg: str | None) -> str | None:
    """The --chat-template source: a file's text, or the argument itself when it looks like a template
    (as vLLM reads it); compiled here so that a broken template stops the server before it loads."""
    if arg is None:
        return None
    if os.path.isfile(arg):
        try:
            with open(arg, encoding="utf-8") as f:
                source = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise LlamasError(f"[serve] cannot read --chat-template {arg}: {e}") from None
    elif any(c in arg for c in "{}\n"):
        source = arg
    else:
        raise LlamasError(f"[serve] --chat-template {arg!r} is neither a file nor a jinja2 template")
    from jinja2 import TemplateError

    from .server_chat import ChatTemplate
    try:
        ChatTemplate(source)
    except TemplateError as e:
        raise LlamasError(f"[serve] --chat-template is not a valid jinja2 template: {e}") from None
    return source


def run(args, model_path: str) -> int:
    try:
        import uvicorn
        from .server import create_app
    except ImportError as e:
        raise LlamasError(f"[serve] missing a server dependency ({e.name}); pip install fastapi uvicorn "
                          "prometheus-client jinja2") from None
    import llamas
    if not os.path.isdir(model_path):
        raise LlamasError(f"[load] {model_path} is not a folder (expected a Hugging Face model folder)")
    chat_template = _chat_template(args.chat_template)
    _check_listen(args.host, args.port)
    if args.threads is not None:
        llamas.set_num_threads(args.threads)
    level = getattr(logging, args.log_level.upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLines() if args.log_format == "json" else logging.Formatter("%(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("llamas").setLevel(level)
    app = create_app(model_path, dtype=args.dtype, kv_dtype=args.kv_dtype, compute_dtype=args.compute_dtype,
                     api_key=_api_key(args), model_name=args.model_name, max_batch=args.max_batch, max_queue=args.max_queue,
                     kv_cache_mb=args.kv_cache_mb,
                     max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes, prefill_chunk=args.prefill_chunk,
                     prefix_cache_mb=args.prefix_cache_mb, cors_origins=args.cors_origin, chat_template=chat_template,
                     speculative_ngram=args.speculative_ngram, stream_interval=args.stream_interval,
                     generation_config=args.generation_config)
    state = app.state.llamas

    from .server_http import abort_stalled_connections, guarded_protocol
    from .server_state import RESPONSE_CUT

    def not_a_cut_stream(record: logging.LogRecord) -> bool:
        # A forced stop (a second Ctrl-C) cuts the running streams, as the write timeout cuts a
        # client that stopped reading; uvicorn says so for each ("returned without completing
        # response"), though the request's own log line already does.
        return not (RESPONSE_CUT.get() and record.getMessage() == "ASGI callable returned without completing response.")
    logging.getLogger("uvicorn.error").addFilter(not_a_cut_stream)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.draining = True  # new requests on open connections get 503 while the running ones finish
            if sig == signal.SIGTERM:
                # Graceful: stop listening, let running requests finish, then exit with status 0
                # (uvicorn would re-raise the signal after its shutdown).
                self.should_exit = True
                return
            super().handle_exit(sig, frame)  # Ctrl-C; a second one forces the exit

        async def shutdown(self, sockets=None) -> None:
            watchdog = asyncio.ensure_future(abort_stalled_connections(self.server_state))
            try:
                await super().shutdown(sockets)
            finally:
                watchdog.cancel()

        async def on_tick(self, counter) -> bool:
            # The model loads after the port is bound (so /health can answer 503 meanwhile); a
            # server whose model failed to load can serve nothing, so it stops, as llama-server does.
            if state.load_error is not None and not self.should_exit:
                self.load_failed = True
                self.should_exit = True
            return await super().on_tick(counter)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=None, http=guarded_protocol(),
                            # json: uvicorn's loggers write through ours (its own config prints "INFO:  ...")
                            **({"log_config": None} if args.log_format == "json" else {}))
    server = Server(config)
    # A closed terminal or SSH session (SIGHUP) stops the server as SIGTERM does, draining the
    # running requests; it ended the process at once, cutting every stream without a log line.
    signal.signal(signal.SIGHUP, lambda sig, frame: server.handle_exit(signal.SIGTERM, frame))
    # Everything imported and built so far lives as long as the process: move it out of the
    # collector's view, so a full collection walks only what requests create. With the ~65k
    # objects of fastapi, pydantic, numpy and the model in view, each full collection held the GIL
    # (the event loop and the engine's Python) for 35-75 ms at 16 streaming clients (now ~7 ms).
    gc.freeze()
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits with status 3 when it cannot start (its error is logged above)
        if e.code not in (0, None):
            raise LlamasError(f"[serve] the server could not start on {args.host}:{args.port} "
                              "(the error above says why)") from None
        raise
    finally:
        # A forced stop (a second Ctrl-C) skips the lifespan's drain: end the engine thread before
        # the interpreter does, or its step, finishing after finalization began, aborts the process
        # ("terminate called without an active exception": its thread cannot take the GIL back).
        if state.engine is not None:
            state.engine.shutdown(drain=False, timeout=10.0)
    if getattr(server, "load_failed", False):
        raise LlamasError(f"[serve] the model did not load: {state.load_error}")
    if not server.started:
        return 1
    return 0


def _check_listen(host: str, port: int) -> None:
    """Fails fast, before the model loads, when --host / --port cannot be listened on (an address
    this machine does not have, a port another server holds): uvicorn would only find out after
    the load, and exit with status 3."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise LlamasError(f"[serve] --host {host!r} is not an address of this machine: "
                          f"{getattr(e, 'strerror', None) or e}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as e:
            raise LlamasError(f"[serve] cannot listen on {host}:{port}: {e.strerror or e}") from None
