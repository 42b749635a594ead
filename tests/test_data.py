"""Data pipeline: cleaning, tokenizer training, token shards, dataset and loader, CLI."""
import json
import os
import struct

import numpy as np
import pytest

from llamas import LlamasError, data
from llamas.cli import main
from llamas.tokenizer import Tokenizer

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "jumbo vexing bright sphinx of black quartz judge my vow").split()


def synthetic_docs(n, seed=0, words=(30, 80)):
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        k = int(rng.integers(*words))
        lines = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))
                 for _ in range(max(1, k // 8))]
        docs.append(f"Document {i}.\n" + "\n".join(lines))
    return docs


def write_files(folder, docs, prefix="doc"):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, d in enumerate(docs):
        p = folder / f"{prefix}{i:03d}.txt"
        p.write_text(d, encoding="utf-8")
        paths.append(str(p))
    return paths


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory):
    """A byte-level BPE tokenizer with vocabulary 300, trained on the synthetic corpus."""
    root = tmp_path_factory.mktemp("tiny_tok")
    files = write_files(root / "corpus", synthetic_docs(20, seed=1))
    out = str(root / "tok")
    data.train_tokenizer(files, vocab_size=300, out=out, min_frequency=2)
    return out


def split_docs(tokens, eos):
    """Token stream -> list of per-document token lists (each ending at eos)."""
    docs, cur = [], []
    for t in tokens.tolist():
        cur.append(t)
        if t == eos:
            docs.append(cur)
            cur = []
    assert not cur, "stream does not end with eos"
    return docs


def all_tokens(folder, split):
    return np.concatenate([np.asarray(s) for s in data.TokenDataset(folder, split).shards])


# -- prepare / round trip -------------------------------------------------------------------
def test_round_trip_all_train(tmp_path, tiny_tok):
    docs = synthetic_docs(12)
    files = write_files(tmp_path / "in", docs)
    meta = data.prepare(files, tiny_tok, str(tmp_path / "out"), val_fraction=0)
    tok = Tokenizer.from_folder(tiny_tok)
    expected = np.concatenate([tok.encode(d) + [tok.eos_token_id] for d in docs])
    got = all_tokens(str(tmp_path / "out"), "train")
    assert got.dtype == np.uint16 and np.array_equal(got, expected)
    assert meta["splits"]["val"] == {"shards": [], "tokens": 0, "documents": 0}
    assert meta["splits"]["train"]["documents"] == 12 and meta["token_width"] == 2
    on_disk = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert on_disk == meta and meta["format"] == "llamas-tokens" and meta["vocab_size"] == 300
    assert sorted(os.listdir(tmp_path / "out" / "tokenizer")) == [
        "merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    with pytest.raises(LlamasError, match="no shards for split 'val'") as e:
        data.TokenDataset(str(tmp_path / "out"), "val")
    assert str(tmp_path / "out") in str(e.value)


def test_val_split_by_document_keeps_order(tmp_path, tiny_tok):
    docs = synthetic_docs(40, seed=3)
    files = write_files(tmp_path / "in", docs)
    out = str(tmp_path / "out")
    meta = data.prepare(files, tiny_tok, out, val_fraction=0.25)
    tok = Tokenizer.from_folder(tiny_tok)
    encoded = [tok.encode(d) + [tok.eos_token_id] for d in docs]
    train = split_docs(all_tokens(out, "train"), tok.eos_token_id)
    val = split_docs(all_tokens(out, "val"), tok.eos_token_id)
    assert 0 < len(val) < 40 and len(train) + len(val) == 40
    assert meta["splits"]["val"]["documents"] == len(val)
    # every document lands whole in exactly one split, each split in source order
    it_t, it_v = iter(train), iter(val)
    nt, nv = next(it_t, None), next(it_v, None)
    for enc in encoded:
        if enc == nt:
            nt = next(it_t, None)
        else:
            assert enc == nv
            nv = next(it_v, None)
    assert nt is None and nv is None
    # the split is a stable function of the text: a rerun gives the same shards
    meta2 = data.prepare(files, tiny_tok, str(tmp_path / "out2"), val_fraction=0.25)
    assert meta2["splits"] == meta["splits"]


def test_val_never_empty(tmp_path, tiny_tok):
    tok = Tokenizer.from_folder(tiny_tok)
    docs = synthetic_docs(5, seed=4)
    files = write_files(tmp_path / "multi", docs)
    meta = data.prepare(files, tiny_tok, str(tmp_path / "o1"), val_fraction=0.0001)
    assert meta["splits"]["val"]["documents"] >= 1 and meta["splits"]["train"]["documents"] >= 1
    val = all_tokens(str(tmp_path / "o1"), "val")
    assert val.tolist() == tok.encode(docs[-1]) + [tok.eos_token_id]  # the last document
    # a single document: its last val_fraction of tokens goes to val
    one = write_files(tmp_path / "single", docs[:1])
    meta = data.prepare(one, tiny_tok, str(tmp_path / "o2"), val_fraction=0.2)
    full = tok.encode(docs[0]) + [tok.eos_token_id]
    train, val = all_tokens(str(tmp_path / "o2"), "train"), all_tokens(str(tmp_path / "o2"), "val")
    assert train.tolist() + val.tolist() == full
    assert len(val) == round(0.2 * len(full)) and meta["splits"]["val"]["tokens"] == len(val)


def test_cleaning_newlines_bom_empty_dedup_separator(tmp_path, tiny_tok):
    tok = Tokenizer.from_folder(tiny_tok)
    eos = tok.eos_token_id
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_bytes(b"\xef\xbb\xbf\n\nfox one\r\njumps\rover  \r\n\t \n")
    (d / "b.txt").write_bytes(b"  \n\r\n\t")
    (d / "c.txt").write_bytes(b"fox one\njumps\nover")  # same document as a.txt once cleaned
    files = [str(d / n) for n in ("a.txt", "b.txt", "c.txt")]
    meta = data.prepare(files, tiny_tok, str(tmp_path / "o1"), val_fraction=0)
    doc = "fox one\njumps\nover"
    assert all_tokens(str(tmp_path / "o1"), "train").tolist() == 2 * (tok.encode(doc) + [eos])
    assert meta["dropped_empty"] == 1 and meta["dropped_duplicates"] == 0
    meta = data.prepare(files, tiny_tok, str(tmp_path / "o2"), val_fraction=0, dedup=True)
    assert all_tokens(str(tmp_path / "o2"), "train").tolist() == tok.encode(doc) + [eos]
    assert meta["dropped_empty"] == 1 and meta["dropped_duplicates"] == 1
    assert meta["splits"]["train"]["documents"] == 1
    # documents separated inside one file
    (d / "s.txt").write_text("first doc\n@@\nsecond doc\n@@\n\n@@\nthird", encoding="utf-8")
    meta = data.prepare([str(d / "s.txt")], tiny_tok, str(tmp_path / "o3"), val_fraction=0,
                        doc_separator="@@")
    expect = [tok.encode(t) + [eos] for t in ("first doc", "second doc", "third")]
    assert split_docs(all_tokens(str(tmp_path / "o3"), "train"), eos) == expect
    assert meta["dropped_empty"] == 1 and meta["splits"]["train"]["documents"] == 3


def test_invalid_utf8_and_missing_input(tmp_path, tiny_tok):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff world")
    with pytest.raises(LlamasError, match=r"bad\.txt is not valid UTF-8: byte offset 6"):
        data.prepare([str(bad)], tiny_tok, str(tmp_path / "o"))
    with pytest.raises(LlamasError, match="nope.txt does not exist"):
        data.prepare([str(tmp_path / "nope.txt")], tiny_tok, str(tmp_path / "o"))
    good = write_files(tmp_path / "in", ["some text"])
    with pytest.raises(LlamasError, match="val_fraction"):
        data.prepare(good, tiny_tok, str(tmp_path / "o"), val_fraction=1.0)


def test_shard_splitting_and_gpt2_tokenizer(tmp_path, fixtures_dir):
    gpt2 = str(fixtures_dir / "gpt2-tokenizer")
    docs = synthetic_docs(6, seed=5)
    files = write_files(tmp_path / "in", docs)
    out = str(tmp_path / "out")
    meta = data.prepare(files, gpt2, out, val_fraction=0, shard_tokens=64)
    tok = Tokenizer.from_folder(gpt2)
    expected = np.concatenate([tok.encode(d) + [50256] for d in docs])
    names = meta["splits"]["train"]["shards"]
    assert names == [f"train_{i:06d}.bin" for i in range(-(-len(expected) // 64))]
    sizes = [data.read_shard(os.path.join(out, n)).size for n in names]
    assert all(s == 64 for s in sizes[:-1]) and 0 < sizes[-1] <= 64
    assert meta["eos_token_id"] == 50256 and meta["vocab_size"] == 50257 and meta["token_width"] == 2
    assert np.array_equal(all_tokens(out, "train"), expected)
    # a rerun with bigger shards leaves no stale shard files behind
    data.prepare(files, gpt2, out, val_fraction=0, shard_tokens=10**6)
    assert sorted(n for n in os.listdir(out) if n.endswith(".bin")) == ["train_000000.bin"]


def test_tokenizer_truncation_ignored(tmp_path, tiny_tok):
    import tokenizers
    backend = tokenizers.Tokenizer.from_file(os.path.join(tiny_tok, "tokenizer.json"))
    ids = backend.encode("the quick brown fox jumps over a lazy dog").ids
    backend.enable_truncation(max_length=3)
    (tmp_path / "tok").mkdir()
    backend.save(str(tmp_path / "tok" / "tokenizer.json"))
    files = write_files(tmp_path / "in", ["the quick brown fox jumps over a lazy dog"])
    data.prepare(files, str(tmp_path / "tok"), str(tmp_path / "out"), val_fraction=0)
    assert all_tokens(str(tmp_path / "out"), "train").tolist() == ids + [0]


# -- shard format -----------------------------------------------------------------------------
def test_shard_header_and_widths(tmp_path):
    p = str(tmp_path / "w4.bin")
    vals = np.array([0, 65535, 65536, 100_000, 7], dtype=np.int64)
    data.write_shard(p, vals, width=4)
    raw = open(p, "rb").read()
    magic, version, width, count, crc = struct.unpack("<8sIIQQ", raw[:32])
    assert (magic, version, width, count) == (b"LLMSTOK\0", 1, 4, 5) and len(raw) == 32 + 20
    import zlib
    assert crc == zlib.crc32(raw[32:])
    arr = data.read_shard(p)
    assert isinstance(arr, np.memmap) and arr.dtype == np.dtype("<u4") and arr.tolist() == vals.tolist()
    data.write_shard(str(tmp_path / "w2.bin"), [1, 2, 3], width=2)
    assert os.path.getsize(tmp_path / "w2.bin") == 32 + 6
    assert data.read_shard(str(tmp_path / "w2.bin")).dtype == np.dtype("<u2")
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-2], "truncated"),
    (lambda b: b + b"\0\0", "extra bytes"),
    (lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:], "checksum mismatch"),
    (lambda b: b"NOTTOKS\0" + b[8:], "not a llamas token shard"),
    (lambda b: b[:8] + struct.pack("<I", 2) + b[12:], "unsupported shard version 2"),
    (lambda b: b[:12] + struct.pack("<I", 3) + b[16:], "invalid token width 3"),
    (lambda b: b[:10], "truncated"),
])
def test_corrupt_shards_refused(tmp_path, damage, message):
    p = tmp_path / "shard_x.bin"
    data.write_shard(str(p), np.arange(100), width=2)
    p.write_bytes(damage(p.read_bytes()))
    with pytest.raises(LlamasError, match=message) as e:
        data.read_shard(str(p))
    assert "shard_x.bin" in str(e.value)


def make_dataset(folder, lengths, vocab_size=70000, width=4):
    """A dataset folder whose tokens are 0, 1, 2, ... across shards (easy to check windows)."""
    folder.mkdir(parents=True, exist_ok=True)
    names, start = [], 0
    for i, n in enumerate(lengths):
        name = f"train_{i:06d}.bin"
        data.write_shard(str(folder / name), np.arange(start, start + n) % vocab_size, width=width)
        names.append(name)
        start += n
    meta = {"format": "llamas-tokens", "version": 1, "tokenizer": "tokenizer", "vocab_size": vocab_size,
            "eos_token_id": 0, "token_width": width,
            "splits": {"train": {"shards": names, "tokens": start, "documents": 1},
                       "val": {"shards": [], "tokens": 0, "documents": 0}},
            "sources": [], "dropped_empty": 0, "dropped_duplicates": 0}
    (folder / "meta.json").write_text(json.dumps(meta))
    return str(folder)


def test_dataset_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlamasError, match="has no meta.json") as e:
        data.TokenDataset(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(e.value)
    with pytest.raises(LlamasError, match="does not exist"):
        data.TokenDataset(str(tmp_path / "missing"))
    folder = make_dataset(tmp_path / "big", [50], vocab_size=40)  # ids 0..49 wrap to < 40: fine
    assert data.TokenDataset(folder).num_tokens == 50
    data.write_shard(os.path.join(folder, "train_000000.bin"), [1, 2, 45], width=4)
    with pytest.raises(LlamasError, match="token id 45 >= vocab_size 40"):
        data.TokenDataset(folder)
    os.remove(os.path.join(folder, "train_000000.bin"))
    with pytest.raises(LlamasError, match="train_000000.bin listed in meta.json is missing"):
        data.TokenDataset(folder)


# -- loader -----------------------------------------------------------------------------------
def test_loader_windows_and_targets(tmp_path):
    ds = data.TokenDataset(make_dataset(tmp_path / "d", [41, 30, 3, 0, 6]))  # 80 tokens: 9 windows at T=8
    assert ds.tokenizer_dir == os.path.join(str(tmp_path / "d"), "tokenizer")
    loader = data.DataLoader(ds, batch_size=3, seq_len=8, shuffle=False)
    assert loader.num_windows == 9 and len(loader) == loader.batches_per_epoch == 3
    x, y = loader.next_batch()
    assert x.dtype == np.int32 and y.dtype == np.int32 and x.shape == y.shape == (3, 8)
    assert x.flags["C_CONTIGUOUS"] and y.flags["C_CONTIGUOUS"]
    assert np.array_equal(x[:, 1:], y[:, :-1])
    assert x[1].tolist() == list(range(8, 16)) and y[1].tolist() == list(range(9, 17))
    stream = np.concatenate([np.asarray(s) for s in ds.shards])
    windows = [np.concatenate([x[:, :1], y], axis=1) for x, y in loader.eval_batches(include_partial=True)]
    # eval pass: every window once, in order, the shards read as one stream: windows 5 and 8 run
    # over a shard's end (tokens 40-48; 64-72 over the 3-token and the empty shard)
    assert np.array_equal(np.concatenate(windows), np.stack([stream[i * 8:i * 8 + 9] for i in range(9)]))
    assert loader.epoch == 0 and loader.batch_index == 1  # eval does not move the training position
    partial = list(data.DataLoader(ds, batch_size=4, seq_len=8).eval_batches(include_partial=True))
    assert [b[0].shape[0] for b in partial] == [4, 4, 1]


def test_loader_determinism_and_resume(tmp_path):
    ds = data.TokenDataset(make_dataset(tmp_path / "d", [300, 200]))
    def run(seed, n):
        loader = data.DataLoader(ds, batch_size=4, seq_len=10, seed=seed)
        return [loader.next_batch()[0] for _ in range(n)]
    a, b, c = run(0, 6), run(0, 6), run(1, 6)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))
    # epoch e follows PCG64([seed, e]) permutations; remainder windows are dropped
    loader = data.DataLoader(ds, batch_size=4, seq_len=10, seed=3)
    assert loader.num_windows == 49 and loader.batches_per_epoch == 12
    full = [loader.next_batch() for _ in range(30)]  # crosses two epoch boundaries
    assert loader.epoch == 2 and loader.batch_index == 6
    seen = sorted(int(r[0]) for xb, _ in full[:12] for r in xb)
    assert len(set(seen)) == 48  # one epoch: 48 distinct windows
    # resume mid-epoch and just before an epoch boundary
    for cut in (5, 11, 12, 20):
        first = data.DataLoader(ds, batch_size=4, seq_len=10, seed=3)
        for _ in range(cut):
            first.next_batch()
        state = json.loads(json.dumps(first.state_dict()))
        resumed = data.DataLoader(ds, batch_size=4, seq_len=10, seed=3)
        resumed.load_state_dict(state)
        for k in range(cut, 30):
            x, y = resumed.next_batch()
            assert np.array_equal(x, full[k][0]) and np.array_equal(y, full[k][1])
    old_state = {k: v for k, v in state.items() if k != "layout"}  # windows that stopped at shard ends
    with pytest.raises(LlamasError, match="windows stopped at each shard's end.*Start the run again"):
        data.DataLoader(ds, batch_size=4, seq_len=10, seed=3).load_state_dict(old_state)
    one_shard = data.TokenDataset(make_dataset(tmp_path / "one", [500]))  # the same windows then
    data.DataLoader(one_shard, batch_size=4, seq_len=10, seed=3).load_state_dict(old_state)
    for kwargs, key in (({"batch_size": 2}, "batch_size"), ({"seq_len": 9}, "seq_len"), ({"seed": 4}, "seed")):
        other = data.DataLoader(ds, **{"batch_size": 4, "seq_len": 10, "seed": 3, **kwargs})
        with pytest.raises(LlamasError, match=f"saved loader state has {key}="):
            other.load_state_dict(state)


def test_loader_too_small(tmp_path):
    ds = data.TokenDataset(make_dataset(tmp_path / "d", [50]))
    with pytest.raises(LlamasError, match=r"has 50 tokens = 1 windows.*batch_size <= 1.*seq_len <= 12"):
        data.DataLoader(ds, batch_size=4, seq_len=32)
    with pytest.raises(LlamasError, match="batch_size must be a positive integer"):
        data.DataLoader(ds, batch_size=0, seq_len=4)


# -- tokenizer training and CLI ---------------------------------------------------------------
def test_train_tokenizer_loads(tiny_tok):
    tok = Tokenizer.from_folder(tiny_tok)
    assert tok.vocab_size == 300 and tok.eos_token_id == 0
    text = "the quick brown fox\njumps over"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text)
    cfg = json.load(open(os.path.join(tiny_tok, "tokenizer_config.json")))
    assert cfg["eos_token"] == "<|endoftext|>" and cfg["tokenizer_class"] == "GPT2Tokenizer"
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2TokenizerFast.from_pretrained(tiny_tok)
    assert hf.encode(text) == ids and hf.eos_token_id == 0


def test_cli_end_to_end(tmp_path, capsys):
    files = write_files(tmp_path / "in", synthetic_docs(8, seed=7))
    tok, out = str(tmp_path / "tok"), str(tmp_path / "out")
    assert main(["data", "train-tokenizer", *files, "--vocab-size", "280", "--out", tok,
                 "--min-frequency", "2"]) == 0
    assert os.path.exists(os.path.join(tok, "tokenizer.json"))
    assert main(["data", "prepare", *files, "--tokenizer", tok, "--out", out, "--val-fraction", "0.2",
                 "--dedup", "--shard-tokens", "200"]) == 0
    captured = capsys.readouterr()
    assert "train" in captured.out and "shards" in captured.out and "documents" in captured.err
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert all(os.path.exists(os.path.join(out, n)) for s in meta["splits"].values() for n in s["shards"])
    assert meta["splits"]["val"]["tokens"] > 0 and len(meta["splits"]["train"]["shards"]) > 1
    assert main(["data", "prepare", str(tmp_path / "missing.txt"), "--tokenizer", tok, "--out", out]) == 2
    assert "llamas: error: [data]" in capsys.readouterr().err
    assert main(["data", "prepare", *files, "--tokenizer", tok, "--out", out, "--val-fraction", "1.5"]) == 2
    assert "llamas: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: unknown flag
        main(["data", "prepare", *files, "--tokenizer", tok, "--out", out, "--bogus"])
    assert e.value.code == 2 and "llamas: error: unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.parametrize("tokenizer", ["tiny", "gpt2"])
def test_long_documents_are_encoded_in_pieces_exactly(tmp_path, tiny_tok, fixtures_dir, tokenizer):
    # Documents past 8 kB are cut at lone newlines for parallel encoding; the ids must equal
    # encoding the whole document, including around runs of spaces, blank lines and tabs.
    rng = np.random.default_rng(7)
    words = ["thou", "art", "Romeo", "  ", "\t", "sweet", "O", "Juliet!", "'tis", "2", "é"]
    lines = []
    for i in range(1500):
        line = " ".join(rng.choice(words, int(rng.integers(1, 9))))
        lines.append(line + ("  " if i % 7 == 0 else "") + ("\n" if i % 11 == 0 else ""))
    doc = "\n".join(lines).strip()
    assert len(doc) > 20000
    files = write_files(tmp_path / "in", [doc])
    tok_dir = tiny_tok if tokenizer == "tiny" else str(fixtures_dir / "gpt2-tokenizer")
    data.prepare(files, tok_dir, str(tmp_path / "out"), val_fraction=0)
    tok = Tokenizer.from_folder(tok_dir)
    assert np.array_equal(all_tokens(str(tmp_path / "out"), "train"), tok.encode(doc) + [tok.eos_token_id])


def test_a_line_without_spaces_trains_in_pieces(tmp_path):
    # BPE trains on whole words: a 400 KB word took 73 s. Cut into 256-character pieces, it takes
    # about a second; text of ordinary words trains as before.
    from llamas.data import _training_texts
    word = "".join(np.random.default_rng(0).choice(list("abcdefghij"), 3000))
    texts = list(_training_texts([f"plain words here {word} and after", "short doc"]))
    assert texts[0] == "plain words here " and texts[-2] == " and after" and texts[-1] == "short doc"
    assert "".join(texts[1:-2]) == word and max(len(t) for t in texts[1:-2]) == 256
    f = tmp_path / "long.txt"
    f.write_text(word * 40 + "\n")
    out = data.train_tokenizer([str(f)], 300, str(tmp_path / "tok"))
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
