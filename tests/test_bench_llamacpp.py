"""bench/compare_llamacpp.py: its parsing of both benchmarks' output and its refusals of bad flags,
against a stand-in llama-bench (a script printing llama-bench's JSON) and the real `llamas bench` on
the tiny fixture."""
import json
import os
import stat
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)
SCRIPT = os.path.join(HERE, "..", "bench", "compare_llamacpp.py")
TINY = os.path.join(HERE, "fixtures", "gpt2-tiny")
sys.path.insert(0, os.path.join(HERE, "..", "bench"))

import compare_llamacpp  # noqa: E402


def fake_llama_bench(tmp_path, pp=900.0, tg=170.0, fail=False):
    """An executable that answers as llama-bench -o json does (or fails)."""
    rows = [{"n_prompt": 512, "n_gen": 0, "avg_ts": pp, "stddev_ts": 1.0},
            {"n_prompt": 0, "n_gen": 128, "avg_ts": tg, "stddev_ts": 1.0}]
    path = tmp_path / "llama-bench"
    body = "echo 'model not found' >&2; exit 1" if fail else f"cat <<'EOF'\n{json.dumps(rows)}\nEOF"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300)


def test_parses_llama_bench_json(tmp_path):
    rates = compare_llamacpp.llama_bench(fake_llama_bench(tmp_path), "m.gguf", 2, 512, 128, 1)
    assert rates == {"pp": 900.0, "tg": 170.0}
    with pytest.raises(RuntimeError, match="llama-bench failed.*model not found"):
        compare_llamacpp.llama_bench(fake_llama_bench(tmp_path, fail=True), "m.gguf", 2, 512, 128, 1)


def test_runs_both_engines_and_prints_ratios(tmp_path):
    gguf = tmp_path / "tiny-q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    r = run("--llama-bench", fake_llama_bench(tmp_path, pp=100.0, tg=10.0), "--model", TINY,
            "--gguf", f"int8={gguf}", "-p", "8", "-n", "4", "-r", "1", "--rounds", "1")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| engine | pp8 tok/s | tg4 tok/s")
    labels = [line.split("|")[1].strip() for line in lines[1:]]
    assert labels == ["llama.cpp tiny-q8_0.gguf", "llamas int8", "llamas int8, bfloat16 compute",
                      "llamas int8, int8 compute"]
    assert lines[1].split("|")[4].strip() == "1.00x"
    for line in lines[2:]:  # llamas' measured rates against the stand-in's 100 and 10 tok/s
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert float(cells[1]) > 0 and abs(float(cells[3][:-1]) - float(cells[1]) / 100) < 0.01


def test_refuses_bad_flags(tmp_path):
    r = run("--llama-bench", str(tmp_path / "missing"), "--model", TINY, "--gguf", "int8=x.gguf")
    assert r.returncode == 2 and "is not an executable file" in r.stderr
    exe = fake_llama_bench(tmp_path)
    r = run("--llama-bench", exe, "--model", TINY, "--gguf", "int4=x.gguf")
    assert r.returncode == 2 and "expected DTYPE=FILE with DTYPE one of float32, bfloat16, int8" in r.stderr
    r = run("--llama-bench", exe, "--model", TINY, "--gguf", f"int8={tmp_path / 'nope.gguf'}")
    assert r.returncode == 2 and "is not a file" in r.stderr
    r = run("--llama-bench", exe, "--model", TINY)
    assert r.returncode == 2 and "give at least one --gguf" in r.stderr


def fake_batched_bench(tmp_path, s_tg=450.0):
    """An executable that prints llama-batched-bench's table for whatever -npl it is given."""
    path = tmp_path / "llama-batched-bench"
    path.write_text(f"""#!/bin/sh
npl=1
while [ $# -gt 0 ]; do [ "$1" = "-npl" ] && npl=$2; shift; done
echo "|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |"
echo "|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|"
echo "|     1 |      4 | $npl |     80 |    0.010 |   100.00 |    0.100 |   {s_tg} |    0.110 |   400.00 |"
""")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_batched_decode_column(tmp_path):
    assert compare_llamacpp.llama_batched_bench(fake_batched_bench(tmp_path), "m.gguf", 2, 4, 16) == 450.0
    gguf = tmp_path / "tiny-f32.gguf"
    gguf.write_bytes(b"GGUF")
    r = run("--llama-bench", fake_llama_bench(tmp_path, pp=100.0, tg=10.0), "--batched-bench",
            fake_batched_bench(tmp_path, s_tg=20.0), "--batch", "3", "--model", TINY, "--gguf", f"float32={gguf}",
            "-p", "8", "-n", "4", "-r", "1", "--rounds", "1")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| engine | pp8 tok/s | tg4 tok/s | tg4 x3 tok/s |")
    base = [c.strip() for c in lines[1].split("|")[1:-1]]
    assert base[0] == "llama.cpp tiny-f32.gguf" and base[3] == "20.0" and base[6] == "1.00x"
    ours = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert ours[0] == "llamas float32" and float(ours[3]) > 0
    r = run("--llama-bench", fake_llama_bench(tmp_path), "--batched-bench", str(tmp_path / "nope"),
            "--model", TINY, "--gguf", f"float32={gguf}")
    assert r.returncode == 2 and "--batched-bench" in r.stderr and "is not an executable file" in r.stderr
    r = run("--llama-bench", fake_llama_bench(tmp_path), "--batch", "0", "--model", TINY, "--gguf", f"float32={gguf}")
    assert r.returncode == 2 and "--batch must be at least 1, got 0" in r.stderr
