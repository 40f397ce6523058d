"""`lctrain data prepare` round trip: shards hold the tokenized documents, packing and splits are exact."""
import json

import numpy as np
import pytest

from lctrain.data.cli import main as data_main
from lctrain.data.text import TextDataset, read_index
from lctrain.data.tokenizer import ByteTokenizer


def _corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    docs = {"a.txt": "hello world\n", "sub/b.md": "zwei Wörter\n" * 7, "sub/c.txt": "x" * 50}
    for name, text in docs.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / ".hidden").write_text("skip me")
    return root, docs


def test_prepare_round_trip(tmp_path):
    root, docs = _corpus(tmp_path)
    out = tmp_path / "tokens"
    assert data_main(["prepare", str(root), "--out", str(out), "--shard-tokens", "16"]) == 0
    index = read_index(str(out))
    tok = ByteTokenizer()
    expected = []
    for name in sorted(docs):
        expected += tok.encode(docs[name]) + [tok.eos_id]
    stream = np.concatenate([np.fromfile(out / s["file"], dtype=index["dtype"]) for s in index["shards"]])
    assert stream.tolist() == expected
    assert index["total_tokens"] == len(expected) and index["documents"] == 3
    assert all(s["tokens"] <= 16 for s in index["shards"]) and len(index["shards"]) > 1

    seq = 8
    train = TextDataset(str(out), seq, seed=1, split="train", eval_fraction=0.2)
    ev = TextDataset(str(out), seq, seed=1, split="eval", eval_fraction=0.2)
    n = (len(expected) - 1) // seq
    assert train.n_train + train.n_eval == n and train.n_eval == max(1, int(n * 0.2))
    ids = [train.sample_id(i) for i in range(train.n_train)]
    assert sorted(ids) == list(range(train.n_train))
    assert [train.sample_id(i) for i in range(train.n_train, 2 * train.n_train)] != ids
    for i in range(train.n_train):
        s = train[i]
        k = train.sample_id(i)
        assert s["input_ids"].tolist() == expected[k * seq:(k + 1) * seq]
        assert s["labels"].tolist() == expected[k * seq + 1:(k + 1) * seq + 1]
    assert ev.sample_id(0) == train.n_train
    again = TextDataset(str(out), seq, seed=1, split="train", eval_fraction=0.2)
    assert [again.sample_id(i) for i in range(train.n_train)] == ids


def test_prepare_errors(tmp_path):
    with pytest.raises(ValueError, match="not a prepared"):
        read_index(str(tmp_path))
    assert data_main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    root, _ = _corpus(tmp_path)
    out = tmp_path / "tokens"
    data_main(["prepare", str(root), "--out", str(out)])
    idx = json.loads((out / "index.json").read_text())
    (out / idx["shards"][0]["file"]).write_bytes(b"\x00")
    with pytest.raises(ValueError, match="truncated"):
        TextDataset(str(out), 8)
