"""`llamas run-batch`: an OpenAI Batch API input file through the server's code path in one process:
results in input order, in the Batch API's format, equal to the same requests made one by one;
bad lines get error lines and the rest still run."""
import json
import os
import subprocess
import sys

import llamas

TINY = os.path.join(os.path.dirname(__file__), "fixtures", "gpt2-tiny")


def run_batch(lines, *extra, input_path=None, output="-"):
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    args = [sys.executable, "-m", "llamas", "run-batch", "--model", TINY, "-i", input_path or "-", "-o", output, *extra]
    return subprocess.run(args, input=None if input_path else text, capture_output=True, text=True, timeout=180)


def request(cid, url, body):
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


def test_results_in_order_and_equal_to_direct_generation():
    prompts = [f"prompt number {i}" for i in range(20)]
    lines = [request(f"r{i}", "/v1/completions", {"prompt": p, "max_tokens": 10, "temperature": 0})
             for i, p in enumerate(prompts)]
    lines.insert(3, request("chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                              "max_tokens": 6, "seed": 1}))
    r = run_batch(lines, "--max-batch", "4")
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["custom_id"] for o in out] == [line["custom_id"] for line in lines]
    assert "[run-batch] 21 requests (0 failed)" in r.stderr
    model = llamas.load(TINY)
    greedy = dict(max_new_tokens=10, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    for o in out:
        assert o["error"] is None and o["response"]["status_code"] == 200 and o["id"].startswith("batch_req_")
        body = o["response"]["body"]
        assert o["response"]["request_id"] == body["id"]
        if o["custom_id"].startswith("r"):
            i = int(o["custom_id"][1:])
            assert body["choices"][0]["text"] == model.generate(prompts[i], **greedy)  # batch-invariant
        else:
            assert body["object"] == "chat.completion"


def test_bad_lines_get_error_lines_and_the_rest_runs(tmp_path):
    lines = [request("ok", "/v1/completions", {"prompt": "x", "max_tokens": 3}),
             "not json", "[1, 2]",
             {"method": "POST", "url": "/v1/completions", "body": {}},
             request("ok", "/v1/completions", {"prompt": "y"}),
             request("u", "/v1/embeddings", {"input": "x"}),
             request("b", "/v1/completions", "prompt"),
             request("s", "/v1/completions", {"prompt": "x", "stream": True}),
             {**request("m", "/v1/completions", {"prompt": "x"}), "method": "GET"},
             {**request("e", "/v1/completions", {"prompt": "x"}), "extra": 1},
             request("t", "/v1/completions", {"prompt": "x", "temperature": 9}),
             request("g", "/v1/completions", {"prompt": "x", "max_tokens": 20, "guided_regex": "[a-c]{3}"}),
             # Python's json reads these; no JSON text may hold them (each once ended the whole batch)
             '{"custom_id": "nan", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", '
             '"temperature": NaN}}',
             '{"custom_id": "big", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", '
             '"max_tokens": 1e400}}',
             '{"custom_id": "sur", "method": "POST", "url": "/v1/completions", "body": {"prompt": "\\ud800"}}',
             request("last", "/v1/completions", {"prompt": "z", "max_tokens": 2})]
    path = tmp_path / "in.jsonl"
    path.write_text("\n\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines))
    r = run_batch([], input_path=str(path), output=str(tmp_path / "out.jsonl"))
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == len(lines)
    errors = [o["error"]["message"] if o["error"] else None for o in out]
    assert errors[0] is None and out[0]["response"]["status_code"] == 200
    for i, fragment in ((1, "is not JSON"), (2, "is not a JSON object"), (3, "'custom_id' must be a non-empty"),
                        (4, "'ok' is used twice"), (5, "'url' must be one of"), (6, "'body' must be an object"),
                        (7, "cannot stream"), (8, "'method' must be \"POST\""), (9, "unknown field 'extra'")):
        assert fragment in errors[i] and out[i]["response"] is None, (i, errors[i])
    assert out[10]["error"] is None and out[10]["response"]["status_code"] == 400
    assert "'temperature'" in out[10]["response"]["body"]["error"]["message"]
    assert out[11]["response"]["body"]["choices"][0]["text"] in {a + b + c for a in "abc" for b in "abc" for c in "abc"}
    assert "NaN, Infinity or a number out of range" in errors[12] and "out of range" in errors[13]
    assert "lone surrogate" in errors[14]
    assert out[15]["error"] is None and out[15]["response"]["status_code"] == 200
    assert "(13 failed)" in r.stderr and "Traceback" not in r.stderr


def test_bad_files_are_clear_errors(tmp_path):
    r = run_batch([], input_path=str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "cannot read the requests" in r.stderr and "Traceback" not in r.stderr
    good = tmp_path / "in.jsonl"
    good.write_text(json.dumps(request("a", "/v1/completions", {"prompt": "x"})) + "\n")
    r = run_batch([], input_path=str(good), output=str(tmp_path / "no" / "such" / "dir.jsonl"))
    assert r.returncode == 2 and "cannot write" in r.stderr and "Traceback" not in r.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = run_batch([], input_path=str(empty))
    assert r.returncode == 0 and r.stdout == "" and "0 requests" in r.stderr
