"""Start-up, corpus preparation and packing budgets (issue 24), in one run: `lctrain launch ... --dry-run` in <= 2x
`import torch`; 200K JSONL documents prepared in <= 4x the time of merely parsing their JSON with RSS <= 1.5 GB;
10M documents packed (best fit) in <= 60 s with RSS <= 2 GB.

    python benchmarks/bench_prepare.py                     # byte tokenizer (the default), 200K docs, 10M packed
    python benchmarks/bench_prepare.py --tokenizer wordlevel --skip-pack    # a tokenizer.json (word level)
    python benchmarks/bench_prepare.py --tokenizer bpe --docs 20000 --skip-pack   # byte-level BPE, 8K merges

Each measured step runs in a fresh subprocess, so its peak RSS (getrusage ru_maxrss) is its own: the JSON
baseline (one process: read the file line by line, json.loads, take the text field), `lctrain data prepare`
(--workers = cores; RSS = the main process's peak + workers x the largest worker's peak, an upper bound) and
`build_pack` of a synthetic prepared index with 10M lognormal document lengths (offsets and hashes only: packing
reads nothing else). The corpus: random words (a 20K-word vocabulary), lognormal lengths (median 150 words).
Timings depend on the machine's load; the script prints the 1-minute load average before each step.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_corpus(path: Path, n: int, seed: int = 0) -> list[str]:
    g = random.Random(seed)
    words = ["".join(g.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(g.randint(1, 10))) for _ in range(20000)]
    sample = []
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            text = " ".join(g.choices(words, k=min(4000, max(5, int(g.lognormvariate(5.0, 1.0))))))
            f.write(json.dumps({"id": i, "text": text}) + "\n")
            if i < 5000:
                sample.append(text)
    return sample


def make_tokenizer(kind: str, sample: list[str], path: Path) -> str:
    if kind == "byte":
        return "byte"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(sample, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|endoftext|>"]))
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return str(path)


def child(step: str, args: list[str]) -> dict:
    """Run one step in a fresh interpreter; its JSON result plus wall time."""
    print(f"  {step}: load average {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    out = subprocess.run([sys.executable, __file__, "--step", step, *args], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    if out.returncode:
        raise SystemExit(f"{step} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0


def startup(repeats: int = 3) -> dict:
    """Best of `repeats` fresh interpreters: `import torch` vs `lctrain launch ... --dry-run` (2 nodes x 8)."""
    dry = [sys.executable, "-m", "lctrain", "launch", "configs/cluster-demo.yaml", "run.out_dir=/runs/bench",
           "--nodes", "2", "--procs-per-node", "8", "--dry-run"]
    times: dict[str, list[float]] = {"import_torch": [], "dry_run": []}
    for _ in range(repeats):
        for key, cmd in (("import_torch", [sys.executable, "-c", "import torch"]), ("dry_run", dry)):
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
            times[key].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def step_parse(corpus: str) -> dict:
    t0 = time.perf_counter()
    n = chars = 0
    with open(corpus, "rb") as f:
        for line in f:
            chars += len(json.loads(line)["text"])
            n += 1
    return {"seconds": time.perf_counter() - t0, "documents": n, "chars": chars, "rss_mb": rss_mb(resource.RUSAGE_SELF)}


def step_prepare(corpus: str, out: str, tokenizer: str, workers: int) -> dict:
    from lctrain.data.prepare import prepare

    t0 = time.perf_counter()
    index = prepare([corpus], out, tokenizer, workers=workers)
    took = time.perf_counter() - t0
    main, worker = rss_mb(resource.RUSAGE_SELF), rss_mb(resource.RUSAGE_CHILDREN)
    return {"seconds": took, "documents": index["documents"], "tokens": index["total_tokens"],
            "shards": len(index["shards"]), "parts": index["parts"], "workers": workers, "rss_main_mb": main,
            "rss_worker_max_mb": worker, "rss_bound_mb": main + workers * worker}


def step_pack(n_docs: int, seq_len: int, method: str) -> dict:
    import numpy as np

    from lctrain.data.packing import build_pack

    with tempfile.TemporaryDirectory(prefix="bench-pack-") as tmp:
        rng = np.random.default_rng(0)
        lengths = np.maximum(1, rng.lognormal(np.log(600), 1.2, size=n_docs)).astype(np.int64)
        offsets = np.zeros(n_docs + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(Path(tmp) / "doc_offsets.npy", offsets)
        np.save(Path(tmp) / "doc_hash.npy", rng.integers(0, 2 ** 63, size=n_docs, dtype=np.int64).view(np.uint64))
        del lengths, offsets
        before = rss_mb(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        d = build_pack(tmp, {}, seq_len, method, 0.01, 0, "train")
        took = time.perf_counter() - t0
        meta = json.loads((d / "meta.json").read_text())
    return {"seconds": took, "method": method, "seq_len": seq_len, "documents": meta["documents"],
            "sequences": meta["sequences"], "padding": meta["pad_tokens"] / (meta["sequences"] * seq_len),
            "rss_mb": rss_mb(resource.RUSAGE_SELF), "rss_before_build_mb": before}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--docs", type=int, default=200_000)
    p.add_argument("--tokenizer", choices=["byte", "wordlevel", "bpe"], default="byte")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--pack-docs", type=int, default=10_000_000)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--methods", default="best_fit,greedy")
    p.add_argument("--skip-pack", action="store_true")
    p.add_argument("--skip-prepare", action="store_true")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.step == "parse":
        print(json.dumps(step_parse(*a.rest)))
        return 0
    if a.step == "prepare":
        print(json.dumps(step_prepare(a.rest[0], a.rest[1], a.rest[2], int(a.rest[3]))))
        return 0
    if a.step == "pack":
        print(json.dumps(step_pack(int(a.rest[0]), int(a.rest[1]), a.rest[2])))
        return 0
    results = {"cores": os.cpu_count()}
    print(f"  startup: load average {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    st = results["startup"] = startup()
    print(f"start-up: lctrain launch --dry-run {st['dry_run']:.2f} s = {st['dry_run'] / st['import_torch']:.2f}x "
          f"import torch ({st['import_torch']:.2f} s; best of 3; budget 2x)")
    if not a.skip_prepare:
        with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
            corpus = Path(tmp) / "corpus.jsonl"
            sample = make_corpus(corpus, a.docs)
            tok = make_tokenizer(a.tokenizer, sample, Path(tmp) / "tokenizer.json")
            mb = corpus.stat().st_size / 1e6
            parse = child("parse", [str(corpus)])
            prep = child("prepare", [str(corpus), str(Path(tmp) / "out"), tok, str(a.workers)])
            ratio = prep["seconds"] / parse["seconds"]
            results.update(corpus_mb=mb, parse=parse, prepare=prep, ratio=ratio)
            print(f"prepare {a.docs} JSONL documents ({mb:.0f} MB, tokenizer {a.tokenizer}, {a.workers} workers): "
                  f"{prep['seconds']:.1f} s = {ratio:.2f}x JSON parsing ({parse['seconds']:.1f} s); "
                  f"{prep['tokens']:,} tokens, {prep['tokens'] / prep['seconds']:,.0f} tokens/s, {prep['shards']} "
                  f"shards; RSS main {prep['rss_main_mb']:.0f} MB + {a.workers} x {prep['rss_worker_max_mb']:.0f} MB "
                  f"= {prep['rss_bound_mb']:.0f} MB (budget 4x, 1536 MB)")
    if not a.skip_pack:
        for method in a.methods.split(","):
            pk = child("pack", [str(a.pack_docs), str(a.seq_len), method])
            results[f"pack_{method}"] = pk
            print(f"pack {pk['documents']:,} documents ({method}, seq_len {a.seq_len}): {pk['seconds']:.1f} s, "
                  f"{pk['sequences']:,} sequences, {pk['padding']:.2%} padding, peak RSS {pk['rss_mb']:.0f} MB "
                  f"(budget 60 s, 2048 MB)")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
