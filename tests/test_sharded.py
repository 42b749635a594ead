"""Sharded safetensors checkpoints (model.safetensors.index.json and its shards, as transformers
writes checkpoints over 5 GB): loaded as one model, with clear errors for a broken index."""
import json
import os
import shutil

import numpy as np
import pytest

import llamas
from llamas._C import LlamasError
from llamas.safetensors_io import read_safetensors, write_safetensors

TINY = os.path.join(os.path.dirname(__file__), "fixtures", "gpt2-tiny")
SHARDS = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]


def sharded(tmp_path, drop=None):
    folder = tmp_path / "sharded"
    folder.mkdir()
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(os.path.join(TINY, f), folder / f)
    tensors, _ = read_safetensors(os.path.join(TINY, "model.safetensors"))
    names = sorted(n for n in tensors if n != drop)
    weight_map = {}
    for i, shard in enumerate(SHARDS):
        part = names[i::len(SHARDS)]
        write_safetensors(str(folder / shard), {n: tensors[n] for n in part})
        weight_map.update({n: shard for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sharded_checkpoint_is_the_same_model(tmp_path, dtype):
    ids = np.load(os.path.join(TINY, "expected.npz"))["input_ids"]
    one, many = llamas.load(TINY, dtype=dtype), llamas.load(sharded(tmp_path), dtype=dtype)
    assert np.array_equal(many.forward(ids), one.forward(ids))
    assert many.generate("When shall we", max_new_tokens=10) == one.generate("When shall we", max_new_tokens=10)
    many.save(tmp_path / "saved")                         # written back as one file
    assert np.array_equal(llamas.load(tmp_path / "saved", dtype=dtype).forward(ids), one.forward(ids))


def test_broken_indexes_are_named(tmp_path):
    folder = sharded(tmp_path)
    index = folder / "model.safetensors.index.json"
    good = index.read_text()
    os.remove(folder / SHARDS[1])
    with pytest.raises(LlamasError, match=f"{SHARDS[1]} not found \\(a shard .* names\\)"):
        llamas.load(folder)
    for text, match in (("{", "not valid JSON"), ("[]", "must hold a JSON object"), ("{}", "'weight_map' must map"),
                        (json.dumps({"weight_map": {"a": "../x.safetensors"}}), "'weight_map' must map")):
        index.write_text(text)
        with pytest.raises(LlamasError, match=match):
            llamas.load(folder)
    index.write_text(good)


def test_a_tensor_missing_from_every_shard_is_named(tmp_path):
    folder = sharded(tmp_path, drop="transformer.h.1.mlp.c_fc.weight")
    with pytest.raises(LlamasError, match=r"and 2 other shards\): tensor 'transformer.h.1.mlp.c_fc.weight' is missing"):
        llamas.load(folder)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    # The index puts wte in one shard; a zeroed copy in another was loaded instead, silently.
    folder = sharded(tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    home = index["weight_map"]["transformer.wte.weight"]
    other = next(s for s in SHARDS if s != home)
    tensors, _ = read_safetensors(str(folder / other))
    wte, _ = read_safetensors(str(folder / home))
    tensors["transformer.wte.weight"] = np.zeros_like(wte["transformer.wte.weight"])
    write_safetensors(str(folder / other), tensors)
    with pytest.raises(LlamasError, match="tensor 'transformer.wte.weight' is in both"):
        llamas.load(folder)
