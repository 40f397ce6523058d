"""Corpus preparation at scale: parts cut anywhere read the same documents, compressed inputs stream, two nodes
preparing at once publish byte-for-byte the corpus one process prepares alone, non-leader ranks only wait, and
the vectorised best-fit packing equals best-fit decreasing done one piece at a time."""
import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lctrain.data.documents import iter_documents, list_files, part_documents, plan_parts
from lctrain.data.packing import _best_fit, best_fit_reference, pack_pieces
from lctrain.data.prepare import prepare
from lctrain.data.text import leader_or_wait, read_index
from lctrain.data.tokenizer import ByteTokenizer
from tests.data.corpus import make_docs, make_tokenizer, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def _corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    """JSONL (plain, with blank lines; gzip), Parquet with several row groups, and plain-text files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "corpus"
    root.mkdir()
    docs = make_docs(400, seed=11, max_words=60)
    write_jsonl(root / "a.jsonl", docs[:150])
    with (root / "a.jsonl").open("a") as f:
        f.write("\n\n")
    with gzip.open(root / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write((root / "a.jsonl").read_text().replace('"doc', '"gz doc'))
    pq.write_table(pa.table({"text": docs[150:300]}), root / "c.parquet", row_group_size=20)
    for i, d in enumerate(docs[300:]):
        (root / f"t{i:03d}.txt").write_text(d)
    want = docs[:150] + [d.replace("doc", "gz doc", 1) for d in docs[:150]] + docs[150:]
    return root, want


@pytest.mark.parametrize("part_bytes", [1, 7, 100, 1000, 1 << 30])
def test_parts_read_every_document_once_wherever_cut(tmp_path, part_bytes):
    root, want = _corpus(tmp_path)
    parts = plan_parts(list_files([str(root)]), part_bytes)
    assert [d for p in parts for d in part_documents(p)] == want == list(iter_documents([str(root)]))
    if part_bytes == 100:
        kinds = [p.kind for p in parts]
        assert kinds.count("jsonl") > 10 and kinds.count("parquet") > 1 and kinds.count("text") > 1


def test_zstd_jsonl_streams(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    docs = make_docs(50, seed=2)
    raw = write_jsonl(tmp_path / "d.jsonl", docs).read_bytes()
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    assert list(iter_documents([str(tmp_path / "z")])) == docs


def _files(d: Path) -> dict[str, bytes]:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


def test_two_nodes_at_once_equal_one_alone(tmp_path):
    root, want = _corpus(tmp_path)
    alone = tmp_path / "alone"
    index = prepare([str(root)], str(alone), shard_tokens=3000, part_bytes=2000)
    assert index["parts"] > 10 and len(index["shards"]) > index["parts"] // 2
    cmd = [sys.executable, "-m", "lctrain", "data", "prepare", str(root), "--out", str(tmp_path / "two"),
           "--shard-tokens", "3000", "--part-bytes", "2000", "--num-nodes", "2", "--job-id", "job42", "--workers", "2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    nodes = [subprocess.Popen(cmd + ["--node-rank", str(k)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in (1, 0)]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs
    assert "tokens/s" in outs[1][1] and "shard(s)" in outs[1][1]  # the summary
    assert _files(tmp_path / "two") == _files(alone)
    assert not list(tmp_path.glob(".two.tmp-*")) and not list(tmp_path.glob(".alone.tmp-*"))
    # and the content is the documents, in order, each [text] + [eos]
    idx = read_index(str(alone))
    stream = np.concatenate([np.fromfile(alone / s["file"], dtype=idx["dtype"]) for s in idx["shards"]])
    offsets = np.load(alone / "doc_offsets.npy", mmap_mode="r")
    assert idx["documents"] == len(want) and offsets[-1] == len(stream) == idx["total_tokens"]
    tok = ByteTokenizer()
    for i in (0, 149, 150, 299, 300, 449, len(want) - 1):
        assert stream[offsets[i]:offsets[i + 1]].tolist() == tok.encode(want[i]) + [tok.eos_id]


def test_worker_pool_and_bos_eos_with_a_tokenizer_file(tmp_path):
    docs = make_docs(300, seed=6)
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    tok_file = make_tokenizer(tmp_path / "tokenizer.json", docs, specials=("[UNK]", "<s>", "</s>"))
    one = prepare([str(corpus)], str(tmp_path / "one"), str(tok_file), part_bytes=500)
    pool = prepare([str(corpus)], str(tmp_path / "pool"), str(tok_file), part_bytes=500, workers=2)
    assert one == pool and _files(tmp_path / "one") == _files(tmp_path / "pool")
    from lctrain.data.tokenizer import get_tokenizer

    tok = get_tokenizer(str(tok_file))
    stream = np.concatenate([np.fromfile(tmp_path / "one" / s["file"], dtype=one["dtype"]) for s in one["shards"]])
    offsets = np.load(tmp_path / "one" / "doc_offsets.npy")
    for i in (0, 17, 299):
        assert stream[offsets[i]:offsets[i + 1]].tolist() == [tok.bos_id] + tok.encode(docs[i]) + [tok.eos_id]


def test_several_nodes_need_a_job_id_and_ranks_wait(tmp_path, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(5))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("LCTRAIN_JOB_ID", raising=False)
    with pytest.raises(ValueError, match="job id"):
        prepare([str(corpus)], str(tmp_path / "o"), num_nodes=2, node_rank=1)
    # a node that fails tells the others: node 1 stops waiting for node 0 with node 0's reason
    import threading

    got = {}

    def node1():
        try:
            prepare([str(corpus)], str(tmp_path / "o"), num_nodes=2, node_rank=1, job_id="j1", wait_timeout_s=60)
        except ValueError as err:
            got["err"] = str(err)

    t = threading.Thread(target=node1)
    t.start()
    while not list(tmp_path.glob(".o.tmp-j1-*")):
        t.join(0.05)
    (next(tmp_path.glob(".o.tmp-j1-*")) / "error.0.txt").write_text("node 0 failed: boom")
    t.join(30)
    assert "node 0 failed: boom" in got.get("err", ""), got
    built = []
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LCTRAIN_DATA_WAIT_S", "1.5")
    with pytest.raises(TimeoutError, match="rank 0 builds it"):
        leader_or_wait(lambda: False, lambda: built.append(1), "the thing")
    leader_or_wait(lambda: True, lambda: built.append(1), "the thing")
    monkeypatch.setenv("RANK", "0")
    leader_or_wait(lambda: False, lambda: built.append(1), "the thing")
    assert built == [1]  # only rank 0 builds, and only when it is missing


@pytest.mark.parametrize("seq_len", [16, 100, 4096])
def test_vectorised_best_fit_equals_one_piece_at_a_time(seq_len):
    rng = np.random.default_rng(seq_len)
    lengths = np.maximum(1, rng.lognormal(np.log(seq_len / 6), 1.0, size=3000).astype(np.int64))
    _, _, _, plen = pack_pieces(lengths, seq_len, "pad")  # the pieces, cut at seq_len
    order, seq_of = _best_fit(plen, seq_len)
    ref = best_fit_reference(plen, seq_len)
    got: list[list[int]] = [[] for _ in range(len(ref))]
    for i, b in zip(order.tolist(), seq_of.tolist()):
        got[b].append(i)
    assert got == ref  # the same pieces in the same sequences, in the same order
    assert max(int(plen[b].sum()) for b in ref) <= seq_len
