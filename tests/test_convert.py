"""`llamas convert`: PyTorch checkpoints (pytorch_model.bin) read without torch and written as
model.safetensors. The fixtures in tests/fixtures/torch-bin were written by torch.save itself
(tools/make_torch_fixtures.py)."""
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import llamas
from llamas._C import LlamasError
from llamas.torch_checkpoint import convert_folder, read_torch_checkpoint

HERE = os.path.dirname(__file__)
BIN = os.path.join(HERE, "fixtures", "torch-bin")
TINY = os.path.join(HERE, "fixtures", "gpt2-tiny")


@pytest.mark.parametrize("name", ["mixed.bin", "mixed-legacy.bin"])
def test_reader_returns_what_torch_saved(name):
    want = np.load(os.path.join(BIN, "mixed.npz"))
    got = read_torch_checkpoint(os.path.join(BIN, name))
    assert sorted(got) == sorted(want.files)
    for key in want.files:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert np.array_equal(got[key], want[key]), key


def test_reader_refuses_a_pickle_that_names_code():
    with pytest.raises(LlamasError, match="refers to (posix|os|nt).system.*refusing to unpickle"):
        read_torch_checkpoint(os.path.join(BIN, "evil.bin"))


def damaged(tmp_path, src, mutate):
    dst = tmp_path / "damaged.bin"
    data = bytearray(open(os.path.join(BIN, src), "rb").read())
    dst.write_bytes(bytes(mutate(data)))
    return str(dst)


@pytest.mark.parametrize("src, mutate, match", [
    ("mixed-legacy.bin", lambda d: d[: len(d) - 40], "truncated|ends before"),
    ("mixed-legacy.bin", lambda d: d[:20], "not a readable torch.save file"),
    ("mixed.bin", lambda d: d[: len(d) // 2], "damaged zip|not a torch.save|cannot read"),
    ("mixed.bin", lambda d: b"garbage" * 10, "not a readable torch.save file|neither"),
])
def test_reader_reports_damaged_files(tmp_path, src, mutate, match):
    with pytest.raises(LlamasError, match=match):
        read_torch_checkpoint(damaged(tmp_path, src, mutate))


def crafted_zip(tmp_path, monkeypatch, size, stride, numel=4, view=None):
    """A torch.save-shaped zip written without torch (fake torch modules for the pickle's names):
    one float32 tensor of this size and stride over a storage of numel elements (and view)."""
    import pickle
    import types
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    storage_type = type("FloatStorage", (), {"__module__": "torch"})

    def rebuild(*args):
        return None
    rebuild.__module__, rebuild.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    torch.FloatStorage, utils._rebuild_tensor_v2, torch._utils = storage_type, rebuild, utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)

    class Storage:
        pass

    class Tensor:
        def __reduce__(self):
            return rebuild, (Storage(), 0, size, stride, False, {})

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", storage_type, "0", "cpu", numel) + ((view,) if view is not None else ())
            return None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"w": Tensor()})
    path = tmp_path / "crafted.bin"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/data/0", np.zeros(max(numel, 0), np.float32).tobytes())
    return str(path)


@pytest.mark.parametrize("size, stride, numel, view, match", [
    ((2 ** 40, 2 ** 40), (0, 0), 4, None, "would take .* elements from a storage of 4"),  # was numpy's "too big"
    ((2 ** 31, 4), (0, 0), 4, None, "would take"),                                        # was a 32 GiB allocation
    ((2, 2), (2, 1), 4, 7, "a storage view that is not"),                                 # was a TypeError
    ((2, 2), (2, 1), 4, ("k", 1), "a storage view that is not"),                          # was a ValueError
    ((2, 2), (2, 1), -3, None, "a storage of -3 elements"),
])
def test_reader_refuses_crafted_tensors(tmp_path, monkeypatch, size, stride, numel, view, match):
    with pytest.raises(LlamasError, match=match):
        read_torch_checkpoint(crafted_zip(tmp_path, monkeypatch, size, stride, numel, view))
    ok = read_torch_checkpoint(crafted_zip(tmp_path, monkeypatch, (2, 2), (2, 1)))  # the same, well formed
    assert ok["w"].shape == (2, 2)


def test_reader_refuses_a_zip_without_a_pickle(tmp_path):
    path = tmp_path / "x.bin"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a/other.txt", "hi")
    with pytest.raises(LlamasError, match="without one <name>/data.pkl"):
        read_torch_checkpoint(str(path))


def bin_folder(tmp_path):
    folder = tmp_path / "gpt2-tiny-bin"
    folder.mkdir()
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(os.path.join(TINY, f), folder / f)
    shutil.copy(os.path.join(BIN, "gpt2-tiny.bin"), folder / "pytorch_model.bin")
    return folder


def test_converted_checkpoint_loads_as_the_same_model(tmp_path):
    folder = bin_folder(tmp_path)
    with pytest.raises(LlamasError, match="run `llamas convert"):
        llamas.load(folder)
    lines = []
    out = convert_folder(str(folder), progress=lines.append)
    assert out == str(folder / "model.safetensors")
    assert "dropped 4 attention-mask buffers" in lines[-1] and "dropped lm_head.weight" in lines[-1]
    converted, original = llamas.load(folder), llamas.load(TINY)
    ids = np.load(os.path.join(TINY, "expected.npz"))["input_ids"]
    assert np.array_equal(converted.forward(ids), original.forward(ids))  # the same float32 weights
    assert converted.generate("When shall we", max_new_tokens=12) == original.generate("When shall we",
                                                                                     max_new_tokens=12)
    with pytest.raises(LlamasError, match="already exists"):
        convert_folder(str(folder))
    convert_folder(str(folder), force=True)


def test_convert_reads_shards(tmp_path):
    # torch.save'd shards are not available without torch: two copies of whole checkpoints serve,
    # and the index says which tensors each one contributes.
    folder = bin_folder(tmp_path)
    names = list(read_torch_checkpoint(str(folder / "pytorch_model.bin")))
    os.remove(folder / "pytorch_model.bin")
    shutil.copy(os.path.join(BIN, "gpt2-tiny.bin"), folder / "pytorch_model-00001-of-00002.bin")
    shutil.copy(os.path.join(BIN, "mixed.bin"), folder / "pytorch_model-00002-of-00002.bin")
    weight_map = {name: "pytorch_model-00001-of-00002.bin" for name in names}
    weight_map["bool"] = weight_map["bf16"] = "pytorch_model-00002-of-00002.bin"
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    convert_folder(str(folder))
    assert np.array_equal(llamas.load(folder).forward([[1, 2, 3]]), llamas.load(TINY).forward([[1, 2, 3]]))
    from llamas.safetensors_io import read_safetensors
    written, _ = read_safetensors(str(folder / "model.safetensors"))
    assert "bool" in written and "f16" not in written          # only what the index names
    weight_map["missing"] = "pytorch_model-00002-of-00002.bin"
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(LlamasError, match="puts missing in pytorch_model-00002-of-00002.bin, which does not hold it"):
        convert_folder(str(folder), force=True)
    (folder / "pytorch_model.bin.index.json").write_text("{}")
    with pytest.raises(LlamasError, match="not a shard index with a weight_map"):
        convert_folder(str(folder), force=True)
    for outside in ("/etc/passwd", "../pytorch_model.bin", "sub/x.bin"):
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": outside}}))
        with pytest.raises(LlamasError, match="names a shard outside its folder"):
            convert_folder(str(folder), force=True)


def test_convert_cli(tmp_path):
    folder = bin_folder(tmp_path)
    run = lambda *a: subprocess.run([sys.executable, "-m", "llamas", "convert", *a], capture_output=True, text=True,
                                    timeout=120)
    r = run(str(folder))
    assert r.returncode == 0 and "[convert] wrote" in r.stderr, r.stderr
    assert llamas.load(folder).generate("When shall we", max_new_tokens=5)
    r = run(str(folder))
    assert r.returncode == 2 and "already exists (--force replaces it)" in r.stderr
    r = run(str(tmp_path / "nope"))
    assert r.returncode == 2 and "is not a folder" in r.stderr
    r = run(str(tmp_path))
    assert r.returncode == 2 and "has no pytorch_model.bin" in r.stderr
    r = run("--help")
    assert r.returncode == 0 and "without torch" in r.stdout
