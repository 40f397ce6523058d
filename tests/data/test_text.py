"""Prepared corpora: shards + document index round trip, the hash split, packed samples with cu_seqlens."""
import json

import numpy as np
import pytest
import torch

from lctrain.data.cli import main as data_main
from lctrain.data.config import DataConfig
from lctrain.data.sampler import build_dataset, collate, data_vocab_size
from lctrain.data.text import IGNORE_INDEX, TextDataset, doc_hash, eval_threshold, read_index
from lctrain.data.tokenizer import ByteTokenizer, get_tokenizer
from tests.data.corpus import make_docs, make_tokenizer, write_jsonl

SEQ = 32


def _corpus(tmp_path, n=60):
    """A folder with a text file, a JSONL file, a Parquet file, a hidden file and a binary file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    docs = make_docs(n, seed=3)
    (root / "a.txt").write_text("zwei Wörter\n" * 7, encoding="utf-8")
    write_jsonl(root / "sub" / "b.jsonl", docs[: n // 2], field="body")
    pq.write_table(pa.table({"body": docs[n // 2:]}), root / "sub" / "c.parquet")
    (root / ".hidden").write_text("skip me")
    (root / "blob.bin").write_bytes(b"\x00\x01binary")
    return root, ["zwei Wörter\n" * 7] + docs  # sorted file order: a.txt, sub/b.jsonl, sub/c.parquet


def test_prepare_round_trip(tmp_path):
    root, docs = _corpus(tmp_path)
    out = tmp_path / "tokens"
    assert data_main(["prepare", str(root), "--out", str(out), "--shard-tokens", "100", "--text-field", "body"]) == 0
    index = read_index(str(out))
    tok = ByteTokenizer()
    stream = np.concatenate([np.fromfile(out / s["file"], dtype=index["dtype"]) for s in index["shards"]])
    offsets = np.load(out / "doc_offsets.npy")
    assert index["documents"] == len(docs) and len(offsets) == len(docs) + 1 and len(index["shards"]) > 1
    for i, d in enumerate(docs):
        assert stream[offsets[i]:offsets[i + 1]].tolist() == tok.encode(d) + [tok.eos_id]
    assert np.load(out / "doc_hash.npy").tolist() == [doc_hash(d) for d in docs]
    assert index["total_tokens"] == len(stream) == offsets[-1]


def _dataset_docs(ds: TextDataset) -> list[list[int]]:
    """The documents of every sequence of a split, reassembled from inputs and cu_seqlens (padding dropped)."""
    pieces = []
    for k in range(ds.n):
        s = ds.sequence(k)
        cu = s["cu_seqlens"].tolist()
        assert cu[0] == 0 and cu[-1] == ds.seq_len
        for a, e in zip(cu[:-1], cu[1:]):
            ids, labels = s["input_ids"][a:e].tolist(), s["labels"][a:e].tolist()
            if labels == [IGNORE_INDEX] * (e - a) and ids == [ds.pad_id] * (e - a) and e == ds.seq_len and a > 0:
                continue  # the padding document
            assert labels == ids[1:] + [IGNORE_INDEX]  # next token of the same document; the last one unscored
            assert s["loss_mask"][a:e].tolist() == [1.0] * (e - a - 1) + [0.0]
            pieces.append(ids)
    return pieces


@pytest.mark.parametrize("packing", ["best_fit", "greedy", "concat", "pad"])
def test_packed_samples_keep_every_token(tmp_path, packing):
    docs = make_docs(80, seed=5)
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    tok_file = make_tokenizer(tmp_path / "tokenizer.json", docs)
    out = str(tmp_path / "tokens")
    assert data_main(["prepare", str(corpus), "--out", out, "--tokenizer", str(tok_file)]) == 0
    index = read_index(out)
    assert index["eos_id"] == 1 and index["pad_id"] == 2
    stream = np.concatenate([np.fromfile(f"{out}/{s['file']}", dtype=index["dtype"]) for s in index["shards"]])
    offsets = np.load(f"{out}/doc_offsets.npy")
    held = {i for i, d in enumerate(docs) if doc_hash(d) < eval_threshold(0.25)}
    assert 0 < len(held) < len(docs)
    for split in ("train", "eval"):
        ds = TextDataset(out, SEQ, seed=4, split=split, eval_fraction=0.25, packing=packing)
        got = sorted(map(tuple, _dataset_docs(ds)))
        want = []
        for i in range(len(docs)):
            if (i in held) == (split == "eval"):
                d = stream[offsets[i]:offsets[i + 1]].tolist()
                want += [tuple(d[j:j + SEQ]) for j in range(0, len(d), SEQ)]  # long documents in pieces
        if packing == "concat":  # pieces are cut at sequence edges instead: compare the tokens
            assert sorted(t for p in got for t in p) == sorted(t for p in want for t in p)
        else:
            assert got == sorted(want)


def test_split_by_hash_is_stable_and_order_free(tmp_path):
    docs = make_docs(120, seed=9)
    a = write_jsonl(tmp_path / "a.jsonl", docs)
    b = write_jsonl(tmp_path / "b.jsonl", docs[::-1][:90])  # another order, some documents missing
    sets = []
    for name, f in (("ta", a), ("tb", b)):
        data_main(["prepare", str(f), "--out", str(tmp_path / name)])
        ds = TextDataset(str(tmp_path / name), 512, split="eval", eval_fraction=0.2, packing="pad")  # whole documents
        tok = ByteTokenizer()
        sets.append({tok.decode(p[:-1]) for p in _dataset_docs(ds)})
    expect = {d for d in docs if doc_hash(d) < eval_threshold(0.2)}
    assert sets[0] == expect and sets[1] == expect & set(docs[::-1][:90])


def test_shuffle_is_a_permutation_per_epoch_and_deterministic(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(100, seed=1))
    data_main(["prepare", str(corpus), "--out", str(tmp_path / "t")])
    ds = TextDataset(str(tmp_path / "t"), SEQ, seed=2, eval_fraction=0.1)
    n = ds.n
    e0, e1 = [ds.sample_id(i) for i in range(n)], [ds.sample_id(i) for i in range(n, 2 * n)]
    assert sorted(e0) == sorted(e1) == list(range(n)) and e0 != e1
    again = TextDataset(str(tmp_path / "t"), SEQ, seed=2, eval_fraction=0.1)
    assert all(torch.equal(again[i]["input_ids"], ds[i]["input_ids"]) for i in (0, 5, n + 3))
    assert [again.sample_id(i) for i in range(n - 1, -1, -1)] == e0[::-1]  # random access, any order
    other = TextDataset(str(tmp_path / "t"), SEQ, seed=3, eval_fraction=0.1)
    assert [other.sample_id(i) for i in range(n)] != e0


def test_build_dataset_prepares_inputs_with_the_configured_tokenizer(tmp_path):
    docs = make_docs(40, seed=2)
    corpus = write_jsonl(tmp_path / "c.jsonl", docs, field="body")
    tok_file = make_tokenizer(tmp_path / "tokenizer.json", docs)
    cfg = DataConfig(source="text", seq_len=SEQ, path=str(tmp_path / "auto"), inputs=[str(corpus)], text_field="body",
                     tokenizer=str(tok_file), eval_fraction=0.2)
    assert data_vocab_size(cfg) == get_tokenizer(str(tok_file)).vocab_size  # before it is prepared
    ds = build_dataset(cfg, "train")
    index = read_index(str(tmp_path / "auto"))
    assert index["tokenizer_fingerprint"].startswith("sha256:") and index["eos_id"] == 1
    assert data_vocab_size(cfg) == index["vocab_size"]
    batch = collate(ds, [0, 1, 2])
    assert batch["input_ids"].shape == (3, SEQ) and batch["cu_seqlens"][-1] == 3 * SEQ
    with pytest.raises(ValueError, match="prepared with the tokenizer"):
        build_dataset(DataConfig(source="text", seq_len=SEQ, path=str(tmp_path / "auto")), "train")  # byte
    nomask = build_dataset(DataConfig(source="text", seq_len=SEQ, path=str(tmp_path / "auto"), tokenizer=str(tok_file),
                                      eval_fraction=0.2, document_mask=False), "train")
    assert "cu_seqlens" not in nomask[0] and torch.equal(nomask[0]["labels"], ds[0]["labels"])


def test_prepare_errors(tmp_path):
    with pytest.raises(ValueError, match="not a prepared"):
        read_index(str(tmp_path))
    assert data_main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    root, _ = _corpus(tmp_path)
    assert data_main(["prepare", str(root), "--out", str(tmp_path / "o2")]) == 2  # JSONL without a "text" field
    out = tmp_path / "tokens"
    assert data_main(["prepare", str(root / "a.txt"), "--out", str(out)]) == 0
    idx = json.loads((out / "index.json").read_text())
    (out / idx["shards"][0]["file"]).write_bytes(b"\x00")
    with pytest.raises(ValueError, match="truncated"):
        TextDataset(str(out), 8)
    with pytest.raises(ValueError, match="data.packing"):
        DataConfig(source="text", path="x", packing="first_fit").validate()


def test_pkg_inputs_and_bos(tmp_path):
    from lctrain.data.documents import list_files

    assert any(f.name == "decoder.py" for f in list_files(["pkg:json"]))  # text shipped with Python
    with pytest.raises(ValueError, match="no importable package"):
        list_files(["pkg:no_such_package_xyz"])
    docs = make_docs(10, seed=4)
    tok = make_tokenizer(tmp_path / "tokenizer.json", docs, specials=("[UNK]", "<s>", "</s>"))
    out = tmp_path / "t"
    assert data_main(["prepare", str(write_jsonl(tmp_path / "c.jsonl", docs)), "--out", str(out),
                      "--tokenizer", str(tok)]) == 0
    index = read_index(str(out))
    stream = np.fromfile(out / index["shards"][0]["file"], dtype=index["dtype"])
    offsets = np.load(out / "doc_offsets.npy")
    assert (index["bos_id"], index["eos_id"]) == (1, 2)
    assert (stream[offsets[:-1]] == 1).all() and (stream[offsets[1:] - 1] == 2).all()  # [bos] text [eos]
