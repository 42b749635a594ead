"""`llamas train` and `llamas eval`: outputs, metrics, exact resume, a kill during a checkpoint
write, and the errors (exit code 2, "llamas: error: ...")."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import llamas
from llamas import cli_train, data
from llamas import train as train_module
from llamas.checkpoint import read_checkpoint
from llamas.cli import main

# Subprocesses import llamas from where this process did (the installed package in CI, the source
# tree's python/ in a development build), never from a source tree without the extension.
PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(llamas.__file__)))
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "jumbo vexing bright sphinx of black quartz judge my vow and then some other "
         "words like river mountain sky cloud silver garden window").split()


pytestmark = pytest.mark.usefixtures("one_engine_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """40 documents of 10 lines each -> tokenizer (vocab 300) -> train/val shards."""
    root = tmp_path_factory.mktemp("cli_data")
    rng = np.random.default_rng(0)
    files = []
    for i in range(40):
        p = root / "corpus" / f"doc{i:02d}.txt"
        p.parent.mkdir(exist_ok=True)
        lines = [" ".join(rng.choice(WORDS, int(rng.integers(4, 12)))).capitalize() + "." for _ in range(10)]
        p.write_text("\n".join(lines), encoding="utf-8")
        files.append(str(p))
    tok, data = str(root / "tok"), str(root / "data")
    assert main(["data", "train-tokenizer", *files, "--vocab-size", "300", "--out", tok]) == 0
    assert main(["data", "prepare", *files, "--tokenizer", tok, "--out", data, "--val-fraction", "0.2"]) == 0
    return {"root": root, "data": data, "tok": tok}


def subprocess_env():
    return dict(os.environ, LLAMAS_NUM_THREADS="1",
                PYTHONPATH=PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))


def train_args(data, out, *extra, steps=8):
    return ["train", "--data", data, "--config", "tiny", "--steps", str(steps), "--batch", "4", "--seq", "16",
            "--eval-every", "4", "--save-every", "4", "--out", str(out), *extra]


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def deterministic(records):
    """The metrics fields that must repeat exactly (not the timings)."""
    keys = ("step", "loss", "lr", "grad_norm", "val_loss")
    return [{k: r[k] for k in keys if k in r} for r in records]


def tmp_files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".tmp"))


@pytest.fixture(scope="module")
def run_a(dataset, tmp_path_factory):
    """8 uninterrupted steps of the tiny preset (the reference run)."""
    out = tmp_path_factory.mktemp("run_a") / "out"
    assert main(train_args(dataset["data"], out)) == 0
    return str(out)


@pytest.fixture(autouse=True)
def no_loss_plot(monkeypatch):
    """Skips drawing loss.png (about a second per run with matplotlib) in every run but run_a's,
    which, being module-scoped, is made before this fixture applies."""
    monkeypatch.setattr(cli_train, "_plot", lambda out, metrics_path: False)


def error_of(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "llamas: error:" in err
    return err


# -- a full run --------------------------------------------------------------------------------
def test_train_writes_model_checkpoint_and_metrics(run_a, dataset, capsys):
    files = set(os.listdir(run_a))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "checkpoint.safetensors", "metrics.jsonl"} <= files
    assert not tmp_files(run_a)
    try:
        import matplotlib  # noqa: F401
        assert "loss.png" in files
    except ImportError:
        assert "loss.png" not in files
    records = read_metrics(run_a)
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
            assert isinstance(r[key], float) and np.isfinite(r[key]) and r[key] > 0, (key, r)
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
    assert records[0]["loss"] == pytest.approx(np.log(300), rel=0.1)
    assert records[-1]["loss"] < records[0]["loss"]

    tensors, state = read_checkpoint(os.path.join(run_a, "checkpoint.safetensors"))
    assert state["steps_done"] == 8 and state["run"]["batch"] == 4 and state["run"]["seq"] == 16
    assert state["config"]["n_embd"] == llamas.PRESETS["tiny"]["n_embd"] and state["config"]["vocab_size"] == 300

    model = llamas.load(run_a)
    assert model.config.vocab_size == 300 and model.config.n_layer == llamas.PRESETS["tiny"]["n_layer"]
    assert model.tokenizer is not None
    # the saved model is the checkpoint's weights
    for name, weight in model._native.named_weights():
        assert np.array_equal(weight, tensors[f"param/{name}"]), name
    assert isinstance(model.generate("the quick", max_new_tokens=5), str)

    capsys.readouterr()
    assert main(["eval", "--model", run_a, "--data", dataset["data"]]) == 0
    out = capsys.readouterr().out
    assert "loss" in out and "perplexity" in out
    loss = float(out.split("loss ")[1].split()[0])
    ppl = float(out.split("perplexity ")[1].split()[0])
    assert ppl == pytest.approx(np.exp(loss), rel=1e-3)
    assert abs(loss - records[-1]["val_loss"]) < 0.5
    assert main(["eval", "--model", run_a, "--data", dataset["data"], "--split", "train", "--seq", "16",
                 "--batch", "2", "--max-batches", "3"]) == 0
    assert "(96 tokens)" in capsys.readouterr().out


def test_resume_is_bit_identical(run_a, dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real_step = train_module.Trainer.step
    calls = {"n": 0}

    def interrupted_step(self, inputs, targets):
        calls["n"] += 1
        if calls["n"] == 5:  # Ctrl-C during step 5, after the step-4 checkpoint
            raise KeyboardInterrupt
        return real_step(self, inputs, targets)

    monkeypatch.setattr(train_module.Trainer, "step", interrupted_step)
    capsys.readouterr()
    assert main(train_args(dataset["data"], out)) == 130
    assert "interrupted at step 4 of 8; the last checkpoint is step 4 in" in capsys.readouterr().err
    monkeypatch.setattr(train_module.Trainer, "step", real_step)
    assert read_checkpoint(str(out / "checkpoint.safetensors"))[1]["steps_done"] == 4
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]

    assert main(train_args(dataset["data"], out, "--resume")) == 0
    assert deterministic(read_metrics(out)) == deterministic(read_metrics(run_a))
    for name in ("model.safetensors", "checkpoint.safetensors"):
        with open(out / name, "rb") as f, open(os.path.join(run_a, name), "rb") as g:
            assert f.read() == g.read(), name


def test_resume_of_a_finished_run_does_nothing(run_a, dataset, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(run_a, out)
    capsys.readouterr()
    assert main(train_args(dataset["data"], out, "--resume")) == 0
    assert "already at step 8 of 8: nothing left to train" in capsys.readouterr().err
    assert read_metrics(out) == read_metrics(run_a)  # nothing trimmed or appended
    for name in ("model.safetensors", "checkpoint.safetensors"):
        with open(out / name, "rb") as f, open(os.path.join(run_a, name), "rb") as g:
            assert f.read() == g.read(), name


def test_kill_during_checkpoint_write(dataset, tmp_path):
    out = tmp_path / "out"
    args = train_args(dataset["data"], out, steps=4)
    args[args.index("--save-every") + 1] = "2"
    script = textwrap.dedent("""
        import os, signal, sys
        import llamas.safetensors_io as sio
        from llamas.cli import main
        count = 0
        def hook(tmp):
            global count
            if os.path.basename(tmp).startswith("checkpoint.safetensors."):
                count += 1
                if count == 2:  # the step-4 checkpoint: die with the new file complete but not renamed
                    os.kill(os.getpid(), signal.SIGKILL)
        sio._before_replace_hook = hook
        sys.exit(main(sys.argv[1:]))
    """)
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr
    ckpt = str(out / "checkpoint.safetensors")
    tensors, state = read_checkpoint(ckpt)
    assert state["steps_done"] == 2
    assert all(np.isfinite(t).all() for t in tensors.values())
    # the killed write leaves at most its own temporary file beside the checkpoint; it is not
    # read by --resume, and the model files of step 2 are complete
    left = tmp_files(out)
    assert len(left) <= 1 and all(f.startswith("checkpoint.safetensors.") for f in left), left
    assert llamas.load(str(out)).config.vocab_size == 300

    assert main(args + ["--resume"]) == 0
    assert read_checkpoint(ckpt)[1]["steps_done"] == 4
    resumed = read_metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]

    # ... and it equals a run that was never killed
    ref = tmp_path / "ref"
    ref_args = list(args)
    ref_args[ref_args.index("--out") + 1] = str(ref)
    assert main(ref_args) == 0
    assert deterministic(resumed) == deterministic(read_metrics(ref))
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()


def test_fine_tune_from_model(run_a, dataset, tmp_path, capsys):
    saved = json.loads(open(os.path.join(run_a, "config.json")).read())
    assert [saved[k] for k in ("embd_pdrop", "attn_pdrop", "resid_pdrop")] == [0.0, 0.0, 0.0]
    out = tmp_path / "ft"
    assert main(["train", "--data", dataset["data"], "--model", run_a, "--steps", "2", "--batch", "2", "--seq", "16",
                 "--schedule", "constant", "--lr", "1e-3", "--out", str(out)]) == 0
    assert "dropout" not in capsys.readouterr().err
    gpt2_like = tmp_path / "gpt2-like"  # a config as GPT-2's own: dropout 0.1 is named, not silently left out
    shutil.copytree(run_a, gpt2_like)
    (gpt2_like / "config.json").write_text(json.dumps(dict(saved, resid_pdrop=0.1, attn_pdrop=0.1)))
    assert main(["train", "--data", dataset["data"], "--model", str(gpt2_like), "--steps", "1", "--batch", "2",
                 "--seq", "16", "--out", str(tmp_path / "ft2")]) == 0
    assert ("asks for dropout (attn_pdrop 0.1, resid_pdrop 0.1); llamas trains without dropout"
            in capsys.readouterr().err)
    before = dict(llamas.load(run_a)._native.named_weights())
    after = dict(llamas.load(str(out))._native.named_weights())
    assert before.keys() == after.keys()
    assert any(not np.array_equal(before[n], after[n]) for n in before)
    assert [r["lr"] for r in read_metrics(out)] == [1e-3, 1e-3]


# -- errors ----------------------------------------------------------------------------------------
def test_error_data_folder_without_meta(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = error_of(capsys, train_args(str(tmp_path / "empty"), tmp_path / "out"))
    assert "meta.json" in err
    err = error_of(capsys, train_args(str(tmp_path / "missing"), tmp_path / "out"))
    assert "does not exist" in err


def test_error_unknown_config_and_a_note_when_seq_grows_the_context(dataset, tmp_path, capsys):
    args = train_args(dataset["data"], tmp_path / "a")
    args[args.index("--config") + 1] = "huge"
    err = error_of(capsys, args)
    assert "--config huge is neither a preset (tiny, small" in err and "nor a config.json file" in err
    args = train_args(dataset["data"], tmp_path / "b", steps=1)
    args[args.index("--seq") + 1] = "200"  # the tiny preset's context is shorter
    assert main(args) == 0
    assert "note: context 200 (preset tiny's is" in capsys.readouterr().err
    assert llamas.load(str(tmp_path / "b")).config.n_positions == 200


def test_io_errors_are_reported_without_a_traceback(dataset, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    capsys.readouterr()
    assert main(train_args(dataset["data"], blocker)) == 1  # --out names a file
    assert "llamas: error: File exists: " in capsys.readouterr().err
    if os.path.exists("/dev/full"):  # stdout on a full disk
        r = subprocess.run([sys.executable, "-m", "llamas", "generate", "hi", "--max-new-tokens", "3"],
                           stdout=open("/dev/full", "w"), stderr=subprocess.PIPE, text=True, timeout=60,
                           env=subprocess_env())
        assert r.returncode == 1 and "No space left on device" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_run_is_not_overwritten_without_resume(run_a, dataset, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(run_a, out)
    err = error_of(capsys, train_args(dataset["data"], out, steps=2))
    assert "already holds a training run" in err and "--resume continues it" in err
    assert read_checkpoint(str(out / "checkpoint.safetensors"))[1]["steps_done"] == 8
    assert read_metrics(out) == read_metrics(run_a)


def test_data_of_another_tokenizer_is_refused(dataset, tmp_path, capsys):
    # The bundled model (4,096 tokens) and data tokenized with the tests' 300-token tokenizer: the
    # vocabulary fits, the ids mean other text.
    bundled = llamas.model.default_model_path()
    err = error_of(capsys, ["train", "--data", dataset["data"], "--model", bundled, "--steps", "1", "--batch", "2",
                            "--seq", "16", "--out", str(tmp_path / "out")])
    assert "the data was tokenized with another tokenizer than the model's" in err
    err = error_of(capsys, ["eval", "--model", bundled, "--data", dataset["data"], "--seq", "16", "--batch", "2"])
    assert err.startswith("llamas: error: [eval] the data was tokenized with another tokenizer")


def test_error_resume_without_checkpoint(dataset, tmp_path, capsys):
    err = error_of(capsys, train_args(dataset["data"], tmp_path / "out", "--resume"))
    assert "--resume" in err and "checkpoint.safetensors not found" in err
    args = train_args(dataset["data"], tmp_path / "out", "--resume")
    i = args.index("--config")
    args[i:i + 2] = ["--model", str(tmp_path)]  # (checked before anything is loaded)
    err = error_of(capsys, args)
    assert "leave out --model" in err


def test_error_resume_of_a_damaged_checkpoint(run_a, tmp_path, dataset, capsys):
    out = tmp_path / "out"
    shutil.copytree(run_a, out)
    ckpt = out / "checkpoint.safetensors"
    with open(ckpt, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    header = json.loads(ckpt.read_bytes()[8:8 + header_len])
    assert set(json.loads(header["__metadata__"]["crc32"])) == {k for k in header if k != "__metadata__"}
    name = max((k for k in header if k.startswith("exp_avg_sq/")),
               key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])
    start = 8 + header_len + header[name]["data_offsets"][0] + 1001
    with open(ckpt, "r+b") as f:  # one flipped bit in one optimizer moment
        f.seek(start)
        byte = f.read(1)[0]
        f.seek(start)
        f.write(bytes([byte ^ 0x10]))
    err = error_of(capsys, train_args(dataset["data"], out, "--resume"))
    assert f"tensor {name!r} is damaged" in err and "crc32" in err
    with open(ckpt, "r+b") as f:  # restored, it resumes
        f.seek(start)
        f.write(bytes([byte]))
    assert main(train_args(dataset["data"], out, "--resume")) == 0, capsys.readouterr().err


def test_error_resume_with_other_settings(run_a, dataset, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(run_a, out)
    args = train_args(dataset["data"], out, "--resume")
    args[args.index("--config") + 1] = "small"
    err = error_of(capsys, args)
    assert "different config" in err
    args = train_args(dataset["data"], out, "--resume")
    args[args.index("--batch") + 1] = "2"
    err = error_of(capsys, args)
    assert "batch" in err and "same flags" in err
    args = train_args(dataset["data"], out, "--resume", "--lr", "0.5")
    err = error_of(capsys, args)
    assert "lr: checkpoint" in err  # a changed schedule would silently change the losses
    # --warmup given as the default it stands for is the same run (8 steps: 10% is 0 steps)
    assert main(train_args(dataset["data"], out, "--resume", "--warmup", "0")) == 0
    assert "nothing left to train" in capsys.readouterr().err
    err = error_of(capsys, train_args(dataset["data"], out, "--resume", "--warmup", "2"))
    assert "warmup: checkpoint 0, now 2" in err
    # the same number of tokens, other tokens: data prepared again from other text
    other = tmp_path / "other-data"
    shutil.copytree(dataset["data"], other)
    shard = str(other / json.loads((other / "meta.json").read_text())["splits"]["train"]["shards"][0])
    tokens = np.array(data.read_shard(shard))
    data.write_shard(shard, np.roll(tokens, 1), width=tokens.dtype.itemsize)
    err = error_of(capsys, train_args(str(other), out, "--resume"))
    assert "data_crc32: checkpoint" in err and "same flags and data" in err
    # nothing was changed by the refused resumes
    assert read_checkpoint(str(out / "checkpoint.safetensors"))[1]["steps_done"] == 8
    assert read_metrics(out) == read_metrics(run_a)


def test_error_seq_longer_than_context(run_a, dataset, tmp_path, capsys):
    err = error_of(capsys, train_args(dataset["data"], tmp_path / "a", "--n-positions", "8"))
    assert "--seq 16 exceeds the model's context 8" in err
    ctx = llamas.load(run_a).config.n_positions
    err = error_of(capsys, ["train", "--data", dataset["data"], "--model", run_a, "--steps", "1",
                            "--seq", str(ctx + 1), "--out", str(tmp_path / "b")])
    assert f"exceeds the model's context {ctx}" in err
    err = error_of(capsys, ["eval", "--model", run_a, "--data", dataset["data"], "--seq", str(ctx + 1)])
    assert f"exceeds the model's context {ctx}" in err


def test_error_fine_tune_vocab_too_small(dataset, tmp_path, capsys):
    small = llamas.create(llamas.GPT2Config(vocab_size=280, n_positions=32, n_embd=32, n_layer=1, n_head=2,
                                            bos_token_id=0, eos_token_id=0), seed=0)
    small.save(str(tmp_path / "small"))
    err = error_of(capsys, ["train", "--data", dataset["data"], "--model", str(tmp_path / "small"), "--steps", "1",
                            "--seq", "16", "--out", str(tmp_path / "out")])
    assert "300 tokens" in err and "280" in err
    err = error_of(capsys, ["eval", "--model", str(tmp_path / "small"), "--data", dataset["data"], "--seq", "16"])
    assert "300 tokens" in err and "280" in err


def test_error_nan_from_huge_learning_rate(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    args = train_args(dataset["data"], out, "--lr", "1e30", "--schedule", "constant")
    args[args.index("--save-every") + 1] = "1"
    err = error_of(capsys, args)
    # step 1 moves every weight by ~1e30; step 2's loss is not finite and the step is refused
    assert "at step 2" in err and "not updated" in err
    assert f"the last good checkpoint is {out / 'checkpoint.safetensors'}" in err
    assert read_checkpoint(str(out / "checkpoint.safetensors"))[1]["steps_done"] == 1
    assert [r["step"] for r in read_metrics(out)] == [1]


def test_error_nan_keeps_previous_checkpoint(dataset, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real_step = train_module.Trainer.step

    def poisoned_step(self, inputs, targets):
        if self.steps_done == 5:  # step 6: a NaN weight makes the gradient norm NaN
            self._native.tensor("param", "transformer.h.0.mlp.c_fc.weight")[0, 0] = np.nan
        return real_step(self, inputs, targets)

    monkeypatch.setattr(train_module.Trainer, "step", poisoned_step)
    args = train_args(dataset["data"], out)
    err = error_of(capsys, args)
    assert "at step 6" in err and "not updated" in err and "last good checkpoint" in err
    assert str(out / "checkpoint.safetensors") in err
    tensors, state = read_checkpoint(str(out / "checkpoint.safetensors"))
    assert state["steps_done"] == 4
    assert all(np.isfinite(t).all() for t in tensors.values())
    assert not tmp_files(out)
    # the step-4 checkpoint resumes to the same run as one that never failed
    monkeypatch.setattr(train_module.Trainer, "step", real_step)
    assert main(args + ["--resume"]) == 0
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 9))


def test_error_no_checkpoint_yet(dataset, tmp_path, capsys):
    args = train_args(dataset["data"], tmp_path / "out", "--lr", "1e30", "--schedule", "constant")
    err = error_of(capsys, args)
    assert "at step 2" in err and "no checkpoint was written yet" in err


def test_bad_flag_values_exit_2(dataset, tmp_path, capsys):
    for flag, value in (("--steps", "0"), ("--lr", "-1"), ("--lr", "nan"), ("--batch", "x"),
                        ("--schedule", "linear"), ("--eval-every", "-1")):
        args = train_args(dataset["data"], tmp_path / "out")
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2, (flag, value)
        assert flag in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", dataset["data"], "--config", "tiny", "--model", "x", "--steps", "1", "--out", "o"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err
    err = error_of(capsys, ["train", "--data", dataset["data"], "--config", "nonexistent.json", "--steps", "1",
                            "--out", str(tmp_path / "o")])
    assert "nonexistent.json" in err


# -- help --------------------------------------------------------------------------------------
TRAIN_FLAGS = ["--data", "--model", "--config", "--out", "--steps", "--batch", "--seq", "--micro-batch", "--lr",
               "--schedule", "--warmup", "--min-lr-ratio", "--weight-decay", "--beta1", "--beta2", "--grad-clip",
               "--eval-every", "--eval-batches", "--save-every", "--seed", "--n-positions", "--resume",
               "--threads", "--profile"]
EVAL_FLAGS = ["--model", "--data", "--file", "--split", "--batch", "--seq", "--stride", "--max-batches", "--max-tokens",
              "--dtype", "--kv-dtype", "--threads"]


@pytest.mark.parametrize("command, flags", [("train", TRAIN_FLAGS), ("eval", EVAL_FLAGS)])
def test_help_mentions_every_flag(command, flags, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in flags:
        assert flag in text, flag
    if command == "train":
        for preset in llamas.PRESETS:
            assert preset in text


def test_help_in_a_subprocess():
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-m", "llamas", "train", "--help"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--resume" in proc.stdout, proc.stderr


def test_train_profile_prints_op_and_layer_tables(dataset, tmp_path, capsys):
    assert main(train_args(dataset["data"], tmp_path / "prof", "--profile", steps=2)) == 0
    err = capsys.readouterr().err
    for text in ("mean us", "layer type", "adamw", "mlp.fc backward", "attn.core backward", "optimizer", "loss"):
        assert text in err, text
