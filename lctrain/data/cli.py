"""`lctrain data prepare INPUT... --out DIR [--tokenizer byte|PATH] ...` and `lctrain data pack DIR --seq-len N ...`."""
from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lctrain data", description="Prepare training data.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="tokenize documents into memory-mapped shards plus a document index")
    prep.add_argument("inputs", nargs="+", help="files or folders (read recursively): plain text, .jsonl, .parquet; "
                                                "or pkg:NAME (an installed package's files)")
    prep.add_argument("--out", required=True, help="output directory (use it as data.path with data.source=text)")
    prep.add_argument("--tokenizer", default="byte", help="'byte' (default) or a local tokenizer.json")
    prep.add_argument("--text-field", default="text", help="JSONL field / Parquet column with the text")
    prep.add_argument("--eos-token", default=None, help="end-of-document token (default: from the tokenizer)")
    prep.add_argument("--bos-token", default=None, help="beginning-of-document token, or 'none' "
                                                        "(default: from the tokenizer)")
    prep.add_argument("--shard-tokens", type=int, default=1 << 24, help="at most this many tokens per shard file")
    prep.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="tokenising processes on this node (default: one per core)")
    prep.add_argument("--num-nodes", type=int, default=int(os.environ.get("SLURM_NNODES", 1)),
                      help="nodes preparing together on a shared filesystem (default: $SLURM_NNODES or 1)")
    prep.add_argument("--node-rank", type=int, default=int(os.environ.get("SLURM_NODEID", 0)),
                      help="this node's index (default: $SLURM_NODEID or 0); node 0 publishes")
    prep.add_argument("--job-id", default=None, help="shared by the nodes of one preparation "
                                                     "(default: $LCTRAIN_JOB_ID or $SLURM_JOB_ID)")
    prep.add_argument("--part-bytes", type=int, default=None, help="input bytes per unit of work "
                                                                   "(default: from the corpus size, <= 256 MiB)")
    prep.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="progress bar (default: when stderr is a terminal)")
    pack = sub.add_parser("pack", help="pack a prepared corpus into sequences (done on first use otherwise)")
    pack.add_argument("path", help="a directory written by `lctrain data prepare`")
    pack.add_argument("--seq-len", type=int, required=True)
    pack.add_argument("--packing", default="best_fit", help="best_fit | greedy | concat | pad")
    pack.add_argument("--eval-fraction", type=float, default=0.01)
    pack.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from lctrain.data.packing import load_pack
    from lctrain.data.text import prepare_text, read_index

    try:
        if args.cmd == "prepare":
            index = prepare_text(args.inputs, args.out, args.tokenizer, args.shard_tokens, args.text_field,
                                 args.eos_token, args.bos_token, workers=args.workers, node_rank=args.node_rank,
                                 num_nodes=args.num_nodes, job_id=args.job_id, part_bytes=args.part_bytes,
                                 progress=args.progress)
            print(f"wrote {index['total_tokens']} tokens from {index['documents']} documents in "
                  f"{len(index['shards'])} shard(s) to {args.out} (eos id {index['eos_id']}, "
                  f"bos id {index['bos_id']}, pad id {index['pad_id']})")
            return 0
        index = read_index(args.path)
        for split in ("train", "eval"):
            t0 = time.perf_counter()
            _, _, meta = load_pack(args.path, index, args.seq_len, args.packing, args.eval_fraction, args.seed, split)
            slots = meta["sequences"] * args.seq_len
            print(f"{split}: {meta['documents']} documents -> {meta['sequences']} sequences of {args.seq_len} "
                  f"({meta['pad_tokens'] / max(slots, 1):.1%} padding), {time.perf_counter() - t0:.1f} s")
    except (ValueError, TimeoutError) as err:
        print(f"lctrain data {args.cmd}: {err}", file=sys.stderr)
        return 2
    return 0
