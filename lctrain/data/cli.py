"""`lctrain data prepare INPUT... --out DIR [--tokenizer byte|PATH] [--shard-tokens N]`."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lctrain data", description="Prepare training data.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="tokenize text files/folders into memory-mapped shards")
    prep.add_argument("inputs", nargs="+", help="text files or folders (read recursively)")
    prep.add_argument("--out", required=True, help="output directory (use it as data.path with data.source=text)")
    prep.add_argument("--tokenizer", default="byte", help="'byte' (default) or a local tokenizer.json")
    prep.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard file")
    args = parser.parse_args(argv)
    from lctrain.data.text import prepare_text

    try:
        index = prepare_text(args.inputs, args.out, args.tokenizer, args.shard_tokens)
    except ValueError as err:
        print(f"lctrain data prepare: {err}", file=sys.stderr)
        return 2
    print(f"wrote {index['total_tokens']} tokens from {index['documents']} documents in "
          f"{len(index['shards'])} shard(s) to {args.out}")
    return 0
