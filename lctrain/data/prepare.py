"""Corpus preparation at scale: documents -> token shards + a memory-mapped document index, once per corpus.

    prepare(inputs, out_dir, tokenizer, workers=16)                       # one node, a pool of 16 processes
    prepare(inputs, out_dir, tokenizer, node_rank=k, num_nodes=N, job_id=J)   # node k of N (shared filesystem)

As Megatron's `preprocess_data.py` / indexed datasets: the input is cut into parts (documents.plan_parts: byte
ranges of JSONL files, Parquet row groups, runs of text files; gzip / zstd streamed), independent of how many
nodes and workers read them. Part i goes to node i mod N, and inside a node to a pool of worker processes. A
worker streams its part, tokenises it in batches with the tokenizer's batch encoder (Hugging Face tokenizers'
`encode_batch_fast`; the byte tokenizer is a view of the UTF-8 bytes), adds `[bos] ... [eos]`, and writes

    shard_PPPPP_KKK.bin   the part's token stream (uint8 / uint16 / uint32), at most shard_tokens tokens per file
    part_PPPPP.len.npy    int64 tokens per document        part_PPPPP.hash.npy  uint64 content hash per document
    part_PPPPP.json       written last: the part is done (a rerun of the same job skips it)

into the job's temporary directory `.NAME.tmp-KEY` beside the output, KEY = the job id (given, or SLURM_JOB_ID /
LCTRAIN_JOB_ID; a random one for a single node) plus a hash of the settings: unique per job, shared by its nodes,
never a PID. A node that fails leaves `error.NODE.txt` there, which ends the others' waits with its reason.
Node 0 waits for every part, joins the per-part arrays into `doc_offsets.npy` (int64 [n_docs + 1])
and `doc_hash.npy` (uint64 [n_docs]) chunk by chunk through memory-mapped output (O(1) memory beyond one part),
writes index.json last and publishes the directory with one rename. The other nodes wait for that rename (the
barrier): after it, every rank only reads. The result is byte-identical whatever the number of nodes or workers.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lctrain.data.documents import Part, list_files, part_documents, plan_parts

INDEX = "index.json"
FORMAT = "lctrain-tokens-v3"
MIN_PART_BYTES, MAX_PART_BYTES = 1 << 20, 256 << 20
BATCH_DOCS = 1024
"""Documents per tokenizer batch."""
WAIT_POLL_S = 1.0


def part_bytes_for(total_bytes: int) -> int:
    """Part size: ~256 parts for small corpora (load balance across workers), at most 256 MiB for large ones.
    A function of the corpus size only, so every node and worker count cuts the same parts."""
    return int(min(MAX_PART_BYTES, max(MIN_PART_BYTES, total_bytes // 256)))


def doc_hash(text: str | bytes) -> int:
    """64-bit content hash of a document (blake2b of its UTF-8 text); chooses its split."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id (uint8 for the byte tokenizer)."""
    return np.dtype(np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def encode_batch(tok, texts: list[str], dtype: np.dtype, raw: list[bytes] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`[bos] + encode(text) + [eos]` for each text: (the tokens end to end, int64 length per document).
    `raw`: the texts' UTF-8 bytes, when the caller has them (the byte tokenizer then needs no second encode)."""
    body, lens = tok.encode_batch(texts, raw)
    head = 0 if tok.bos_id is None else 1
    total = lens + head + 1
    ends = np.cumsum(total)
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    keep = np.ones(len(out), dtype=bool)
    keep[ends - 1] = False
    out[ends - 1] = tok.eos_id
    if head:
        keep[ends - total] = False
        out[ends - total] = tok.bos_id
    out[keep] = body
    return out, total


class _ShardWriter:
    """A part's token stream cut into files of at most `shard_tokens` tokens."""

    def __init__(self, tmp: Path, part: int, shard_tokens: int):
        self.tmp, self.part, self.cap = tmp, part, shard_tokens
        self.shards: list[dict] = []
        self._f, self._n = None, 0

    def write(self, tokens: np.ndarray) -> None:
        at = 0
        while at < len(tokens):
            if self._f is None or self._n == self.cap:
                self._close()
                name = f"shard_{self.part:05d}_{len(self.shards):03d}.bin"
                self.shards.append({"file": name, "tokens": 0})
                self._f, self._n = open(self.tmp / name, "wb"), 0
            take = min(len(tokens) - at, self.cap - self._n)
            tokens[at:at + take].tofile(self._f)
            self._n += take
            self.shards[-1]["tokens"] = self._n
            at += take

    def _close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def close(self) -> list[dict]:
        self._close()
        return self.shards


_WORKER: dict = {}


def _init_worker(tokenizer: str, eos: str | None, bos: str | None) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process: the pool is the parallelism
    from lctrain.data.tokenizer import get_tokenizer

    _WORKER["tok"] = get_tokenizer(tokenizer, eos, bos)


def _write_atomic(path: Path, data: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(data)
    os.replace(tmp, path)


def process_part(args: tuple) -> dict:
    """Tokenise part `i` into the job directory `tmp`; returns its summary (also written as part_i.json, last)."""
    i, part, tmp, text_field, shard_tokens, dtype = args
    tmp = Path(tmp)
    done = tmp / f"part_{i:05d}.json"
    if done.is_file():  # an earlier attempt of this job finished it
        return json.loads(done.read_text())
    tok = _WORKER["tok"]
    writer = _ShardWriter(tmp, i, shard_tokens)
    lens, hashes, batch = [], [], []

    def flush() -> None:
        raw = [t.encode("utf-8") for t in batch]  # once, for the hash and the byte tokenizer
        tokens, total = encode_batch(tok, batch, np.dtype(dtype), raw)
        writer.write(tokens)
        lens.append(total)
        hashes.append(np.fromiter(map(doc_hash, raw), dtype=np.uint64, count=len(raw)))
        batch.clear()

    for text in part_documents(Part(**part), text_field):
        batch.append(text)
        if len(batch) == BATCH_DOCS:
            flush()
    if batch:
        flush()
    shards = writer.close()
    lengths = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    np.save(tmp / f"part_{i:05d}.len.npy", lengths)
    np.save(tmp / f"part_{i:05d}.hash.npy", np.concatenate(hashes) if hashes else np.zeros(0, np.uint64))
    summary = {"part": i, "documents": int(len(lengths)), "tokens": int(lengths.sum()), "shards": shards,
               "bytes": int(part["nbytes"])}
    _write_atomic(done, json.dumps(summary))
    return summary


def _job_key(job_id: str | None, settings: dict, num_nodes: int) -> str:
    job_id = job_id or os.environ.get("LCTRAIN_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        if num_nodes > 1:
            raise ValueError("preparing on several nodes needs a job id shared by them (--job-id, LCTRAIN_JOB_ID "
                             "or SLURM_JOB_ID) to name their common temporary directory")
        job_id = uuid.uuid4().hex[:12]
    digest = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=6).hexdigest()
    return f"{job_id}-{digest}"


def _wait(condition, what: str, timeout_s: float, tmp: Path | None = None) -> None:
    """Poll `condition`; a node's failure note in `tmp` (error.NODE.txt) ends the wait with its reason."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        failed = sorted(tmp.glob("error.*.txt")) if tmp is not None and tmp.is_dir() else []
        if failed:
            raise ValueError(f"while waiting for {what}: {failed[0].read_text().strip()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s:.0f} s waiting for {what}")
        time.sleep(WAIT_POLL_S)


def _finalize(tmp: Path, n_parts: int, index: dict) -> dict:
    """Join the parts' arrays into doc_offsets.npy / doc_hash.npy (chunk by chunk, memory-mapped) and write
    index.json (last); the per-part files are removed."""
    summaries = [json.loads((tmp / f"part_{i:05d}.json").read_text()) for i in range(n_parts)]
    n_docs = sum(s["documents"] for s in summaries)
    if n_docs == 0:
        raise ValueError("no non-empty documents in the inputs")
    offsets = np.lib.format.open_memmap(tmp / "doc_offsets.npy", mode="w+", dtype=np.int64, shape=(n_docs + 1,))
    hashes = np.lib.format.open_memmap(tmp / "doc_hash.npy", mode="w+", dtype=np.uint64, shape=(n_docs,))
    offsets[0], at, total = 0, 0, 0
    for i, s in enumerate(summaries):
        lens = np.load(tmp / f"part_{i:05d}.len.npy")
        offsets[at + 1:at + 1 + len(lens)] = total + np.cumsum(lens)
        hashes[at:at + len(lens)] = np.load(tmp / f"part_{i:05d}.hash.npy")
        at, total = at + len(lens), total + int(lens.sum())
    offsets.flush()
    hashes.flush()
    del offsets, hashes
    for i in range(n_parts):
        for suffix in (".len.npy", ".hash.npy", ".json"):
            (tmp / f"part_{i:05d}{suffix}").unlink()
    index = dict(index, total_tokens=total, documents=n_docs, shards=[sh for s in summaries for sh in s["shards"]])
    _write_atomic(tmp / INDEX, json.dumps(index, indent=1))
    return index


def publish(tmp: Path, out: Path, replace: bool) -> bool:
    """Move the finished directory `tmp` to `out` with one rename; with replace=False an existing `out` (written
    meanwhile by another job from the same inputs) is kept and `tmp` dropped. Returns whether `tmp` was moved."""
    if out.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:12]}")
        out.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:
        if replace or not out.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True


def prepare(inputs: list[str], out_dir: str, tokenizer: str = "byte", shard_tokens: int = 1 << 24,
            text_field: str = "text", eos_token: str | None = None, bos_token: str | None = None,
            replace: bool = True, workers: int = 1, node_rank: int = 0, num_nodes: int = 1,
            job_id: str | None = None, part_bytes: int | None = None, progress: bool | None = None,
            wait_timeout_s: float = 7 * 24 * 3600.0) -> dict:
    """Tokenise `inputs` into `out_dir` (see the module docstring); returns the index (index.json's content).

    Args:
        inputs: files, folders (recursive) and `pkg:NAME` entries.
        out_dir: output directory; must not exist yet or hold an earlier index.json (replaced if `replace`).
        tokenizer: "byte" or the path of a local tokenizer.json.
        shard_tokens: at most this many tokens per shard file.
        text_field: the JSONL field / Parquet column holding a document's text.
        eos_token, bos_token: override the tokenizer's detected special tokens.
        replace: replace an existing prepared directory (False: keep one published meanwhile).
        workers: processes on this node (1: in this process).
        node_rank, num_nodes: this node's share of the parts (every node must see the same filesystem).
        job_id: names the temporary directory the nodes of one job share (default: LCTRAIN_JOB_ID / SLURM_JOB_ID).
        part_bytes: input bytes per part (default: part_bytes_for(corpus size)).
        progress: show a progress bar (default: when stderr is a terminal).
    """
    from lctrain.data.tokenizer import get_tokenizer

    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if workers < 1 or num_nodes < 1 or not 0 <= node_rank < num_nodes:
        raise ValueError(f"need workers >= 1 and 0 <= node_rank < num_nodes, got {workers}, {node_rank}, {num_nodes}")
    out = Path(out_dir)
    if out.exists() and not (out / INDEX).is_file():
        raise ValueError(f"{out_dir!r} exists and is not a prepared token directory; refusing to overwrite it")
    tok = get_tokenizer(tokenizer, eos_token, bos_token)
    dtype = token_dtype(tok.vocab_size)
    files = list_files(inputs)
    total_bytes = sum(f.stat().st_size for f in files)
    parts = plan_parts(files, part_bytes or part_bytes_for(total_bytes))
    index = {"format": FORMAT, "dtype": dtype.name, "tokenizer": tok.name, "tokenizer_fingerprint": tok.fingerprint,
             "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "bos_id": tok.bos_id, "pad_id": tok.pad_id,
             "text_field": text_field, "shard_tokens": shard_tokens, "parts": len(parts)}
    settings = dict(index, parts=[asdict(p) for p in parts], out=str(out.resolve()))
    tmp = out.with_name(f".{out.name}.tmp-{_job_key(job_id, settings, num_nodes)}")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / f"error.{node_rank}.txt").unlink(missing_ok=True)  # a failure note of an earlier attempt of this job
    mine = [i for i in range(len(parts)) if i % num_nodes == node_rank]
    jobs = [(i, asdict(parts[i]), str(tmp), text_field, shard_tokens, dtype.name) for i in mine]
    t0 = time.perf_counter()
    bar = None
    if progress or (progress is None and sys.stderr.isatty()):
        from tqdm import tqdm

        bar = tqdm(total=sum(parts[i].nbytes for i in mine), unit="B", unit_scale=True, desc="prepare", file=sys.stderr)
    try:
        final, done = _run_node(jobs, parts, tmp, out, index, tokenizer, eos_token, bos_token, workers, node_rank,
                                num_nodes, replace, wait_timeout_s, bar)
    except Exception as err:
        if tmp.is_dir():  # tell the other nodes, so they stop waiting with the reason
            _write_atomic(tmp / f"error.{node_rank}.txt", f"node {node_rank} failed: {err}")
        raise
    took = time.perf_counter() - t0
    docs, toks = sum(s["documents"] for s in done), sum(s["tokens"] for s in done)
    print(f"[lctrain data prepare] node {node_rank}/{num_nodes}: {docs} documents, {toks} tokens in "
          f"{len(done)} part(s), {took:.1f} s, {toks / max(took, 1e-9):,.0f} tokens/s; corpus: "
          f"{final['documents']} documents, {final['total_tokens']} tokens, {len(final['shards'])} shard(s)",
          file=sys.stderr, flush=True)
    return final


def _run_node(jobs, parts, tmp, out, index, tokenizer, eos_token, bos_token, workers, node_rank, num_nodes, replace,
              wait_timeout_s, bar) -> tuple[dict, list[dict]]:
    """This node's parts through the pool, then (node 0) join and publish, or (others) wait for the publication."""
    done: list[dict] = []
    if workers == 1 or len(jobs) <= 1:
        _init_worker(tokenizer, eos_token, bos_token)
        results = map(process_part, jobs)
        pool = None
    else:
        pool = mp.get_context("spawn").Pool(min(workers, len(jobs)), _init_worker, (tokenizer, eos_token, bos_token))
        results = pool.imap_unordered(process_part, jobs)
    try:
        for s in results:
            done.append(s)
            if bar is not None:
                bar.update(s["bytes"])
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if bar is not None:
            bar.close()
    if node_rank == 0:
        _wait(lambda: all((tmp / f"part_{i:05d}.json").is_file() for i in range(len(parts))),
              f"the other {num_nodes - 1} node(s) to finish their parts in {tmp}", wait_timeout_s, tmp)
        final = _finalize(tmp, len(parts), index)
        publish(tmp, out, replace)
    else:  # the barrier: node 0 publishes with one rename
        _wait(lambda: not tmp.exists() and (out / INDEX).is_file(), f"node 0 to publish {out}", wait_timeout_s, tmp)
        final = json.loads((out / INDEX).read_text())
    return final, done
