"""`llamas run-batch`: a file of OpenAI Batch API requests run through the server's own code path
in this process (no HTTP), continuously batched, the results written in the Batch API's format."""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid
from typing import List, Optional, Tuple

from ._C import LlamasError
from .cli_args import add_engine_args, finite_float

URLS = ("/v1/chat/completions", "/v1/completions")


def add_parser(sub, model_help: str) -> None:
    b = sub.add_parser(
        "run-batch", help="run a JSONL file of OpenAI Batch API requests (chat and completions)",
        description="Run every request of an OpenAI Batch API input file (one JSON object a line: "
                    "{\"custom_id\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\" or \"/v1/completions\", "
                    "\"body\"}) through the same validation, continuous batching and response formatting as "
                    "`llamas serve`, and write one result line per request in input order: {\"id\", "
                    "\"custom_id\", \"response\": {\"status_code\", \"request_id\", \"body\"}, \"error\"}. "
                    "A line that is not a valid request gets an error line; the others still run.",
        epilog="Example: llamas run-batch -i requests.jsonl -o results.jsonl --model DIR")
    b.add_argument("-i", "--input", required=True, metavar="FILE", help="the requests (JSONL; - reads standard input)")
    b.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="where the results go (JSONL; - writes standard output)")
    add_engine_args(b, model_help)
    b.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model id request bodies may name (default: the model folder's name)")
    b.add_argument("--prefix-cache-mb", type=finite_float, default=0.0, metavar="MB",
                   help="keep up to MB MiB of finished requests' KV blocks for requests that start the same way "
                        "(default 0: off)")


def read_requests(lines: List[str]) -> List[Tuple[Optional[str], Optional[dict], Optional[str]]]:
    """[(custom_id, request or None, error message or None)] a line each (blank lines skipped)."""
    out = []
    seen = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            req = json.loads(line)
        except ValueError as e:
            out.append((None, None, f"{where} is not JSON: {e}"))
            continue
        if not isinstance(req, dict):
            out.append((None, None, f"{where} is not a JSON object"))
            continue
        cid = req.get("custom_id")
        error = None
        if not isinstance(cid, str) or not cid:
            error, cid = f"{where}: 'custom_id' must be a non-empty string", None
        elif cid in seen:
            error = f"{where}: 'custom_id' {cid!r} is used twice"
        elif req.get("method", "POST") != "POST":
            error = f"{where}: 'method' must be \"POST\""
        elif req.get("url") not in URLS:
            error = f"{where}: 'url' must be one of {', '.join(URLS)}, got {json.dumps(req.get('url'))[:60]}"
        elif not isinstance(req.get("body"), dict):
            error = f"{where}: 'body' must be an object"
        elif req["body"].get("stream"):
            error = f"{where}: a batch request cannot stream ('stream': true)"
        elif set(req) - {"custom_id", "method", "url", "body"}:
            error = f"{where}: unknown field {sorted(set(req) - {'custom_id', 'method', 'url', 'body'})[0]!r}"
        else:
            error = _body_problem(req["body"], where)
        if cid is not None:
            seen.add(cid)
        out.append((cid, None if error else req, error))
    return out


def _body_problem(body: dict, where: str) -> Optional[str]:
    """Why the body cannot be sent as the API's JSON (Python's json reads NaN, 1e400 and lone
    surrogates, which no JSON text may hold), or None."""
    try:
        json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:  # (a ValueError too: first)
        return f"{where}: 'body' holds a lone surrogate (\\ud800-\\udfff), which is not UTF-8 text"
    except ValueError:
        return f"{where}: 'body' holds NaN, Infinity or a number out of range, which JSON does not allow"
    except RecursionError:
        return f"{where}: 'body' nests too deeply"
    return None


def _result(cid, status=None, body=None, error=None) -> str:
    line = {"id": "batch_req_" + uuid.uuid4().hex[:24], "custom_id": cid,
            "response": None if status is None else {"status_code": status, "request_id": (body or {}).get("id"),
                                                     "body": body},
            "error": None if error is None else {"code": "invalid_request", "message": error}}
    return json.dumps(line, ensure_ascii=False)


async def _run(app, requests, out, concurrency: int, progress) -> Tuple[int, int, int]:
    """Posts each request to the app in this process, at most `concurrency` at a time; writes the
    result lines in input order. Returns (done, failed, generated tokens)."""
    import httpx
    slots = asyncio.Semaphore(concurrency)
    results: List[Optional[str]] = [None] * len(requests)
    counts = [0, 0, 0]
    written = 0

    async def one(i, client):
        cid, req, error = requests[i]
        if req is None:
            results[i] = _result(cid, error=error)
            counts[1] += 1
        else:
            try:
                async with slots:
                    r = await client.post(req["url"], json=req["body"])
                body = r.json()
                results[i] = _result(cid, r.status_code, body)
                counts[1] += r.status_code != 200
                counts[2] += (body.get("usage") or {}).get("completion_tokens", 0) if r.status_code == 200 else 0
            except Exception as e:  # one request's failure is its own line, never the batch's end
                results[i] = _result(cid, error=f"the request failed: {type(e).__name__}: {str(e)[:200]}")
                counts[1] += 1
        counts[0] += 1
        progress(*counts)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://run-batch", timeout=None) as client:
        tasks = [asyncio.ensure_future(one(i, client)) for i in range(len(requests))]
        for i, task in enumerate(tasks):
            await task
            while written < len(results) and results[written] is not None:  # input order
                out.write(results[written] + "\n")
                written += 1
            out.flush()
    return tuple(counts)


def run(args, model_path: str) -> int:
    import llamas
    from .cli import read_text
    from .server import create_app
    text = read_text(args.input, "run-batch", "the requests")
    requests = read_requests(text.splitlines())
    try:
        out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    except OSError as e:
        raise LlamasError(f"[run-batch] cannot write {args.output}: {e.strerror or e}") from None
    logging.getLogger("llamas.server").setLevel(logging.WARNING)  # no request log lines: the progress line instead
    if args.threads is not None:
        llamas.set_num_threads(args.threads)
    model = llamas.load(model_path, dtype=args.dtype, kv_dtype=args.kv_dtype, compute_dtype=args.compute_dtype)
    app = create_app(model, model_name=args.model_name, max_batch=args.max_batch, max_queue=4 * args.max_batch,
                     kv_cache_mb=args.kv_cache_mb,
                     max_tokens=args.max_tokens, prefix_cache_mb=args.prefix_cache_mb, max_body_bytes=1 << 26)
    start = time.perf_counter()
    tty = sys.stderr.isatty()
    last = [0.0]

    def progress(done, failed, tokens):
        now = time.perf_counter()
        if done < len(requests) and now - last[0] < (0.2 if tty else 5.0):
            return
        last[0] = now
        rate = tokens / max(now - start, 1e-9)
        line = f"[run-batch] {done}/{len(requests)} requests, {failed} failed, {tokens} tokens ({rate:.1f} tok/s)"
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    try:
        done, failed, tokens = asyncio.run(_run(app, requests, out, 2 * args.max_batch, progress))
    finally:
        app.state.llamas.engine.shutdown(True, 30.0)
        if out is not sys.stdout:
            out.close()
    if tty:
        print(file=sys.stderr)
    elapsed = time.perf_counter() - start
    print(f"[run-batch] {done} requests ({failed} failed) in {elapsed:.1f} s, {tokens} tokens generated "
          f"({tokens / max(elapsed, 1e-9):.1f} tok/s) -> {args.output}", file=sys.stderr)
    return 0  # (a request that failed has its error in the output, as the Batch API reports it)

