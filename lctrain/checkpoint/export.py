"""`lctrain export RUN_DIR|CHECKPOINT --out DIR [--format safetensors|hf] [--dtype bf16|fp32]`.

Streams a sharded DCP checkpoint (any TP/CP/DP/ZeRO layout: DCP stores global tensors, see
lctrain.checkpoint.state) into safetensors files of at most `max_shard_bytes` (5 GB) with a
`model.safetensors.index.json` and a `config.json`. Only the model's fp32 masters are exported (not the optimizer).

Memory: the output files are planned from the checkpoint's metadata alone (names, shapes, dtypes), so each file's
safetensors header is written first and the tensors follow one at a time: a tensor is read from the checkpoint
(DCP reads only the byte ranges of its boxes), converted, written and dropped before the next. The peak is one
source tensor plus its converted copy, never a whole file or the model (measured by allocation:
benchmarks/bench_checkpoint.py --export). The file format is safetensors' own (8-byte header length, JSON header,
raw little-endian data), read back with the safetensors library in the tests.

Formats:
- `safetensors`: lctrain's own names (`layers.0.mixer.qkv.proj.weight`, ...), every parameter once (a tied output
  layer is the embedding, stored once), in the checkpoint's global shapes: a parameter with more than two
  dimensions (a short convolution's `[channels, 1, width]`) is stored as `[d0, prod(rest)]`, as in checkpoints.
  `config.json` holds lctrain's model config (`lctrain_model`). Any layer pattern (hybrids included);
  `lctrain train ... --init-from DIR` loads it back bit-exactly (:func:`load_export_into`).
- `hf`: a Hugging Face Llama checkpoint (`LlamaForCausalLM.from_pretrained(DIR)`), for all-softmax models only
  (layer_pattern of "A"s): the fused GQA-grouped qkv is split into q/k/v_proj, the fused gate_up into
  gate/up_proj; RoPE (rotate-half), RMSNorm and SwiGLU are Llama's.
"""
from __future__ import annotations

import argparse
import json
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lctrain.checkpoint.store import CheckpointError, find_latest, load_tensors, read_meta, stored_tensors

#: Largest output file (bytes of tensor data), as Hugging Face's default `max_shard_size="5GB"`.
MAX_SHARD_BYTES = 5 * 10**9
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
_HF_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}
INDEX = "model.safetensors.index.json"


@dataclass
class Entry:
    """One exported tensor: `name` of `shape`, made from stored tensor `source` by `take` (a view of it)."""

    name: str
    source: str
    shape: tuple[int, ...]
    take: Callable[[torch.Tensor], torch.Tensor] = lambda t: t


def resolve_source(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory's newest complete checkpoint of its current lineage."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    if (path / "checkpoints").is_dir():
        found = find_latest(path / "checkpoints")
        if found is None:
            raise CheckpointError(f"run directory {str(path)!r} has no complete checkpoint")
        return found
    raise CheckpointError(f"{str(path)!r} is neither a checkpoint (no meta.json) nor a run directory "
                          "(no checkpoints/)")


def native_entries(stored: dict[str, tuple[torch.Size, torch.dtype]]) -> list[Entry]:
    """lctrain's own names: every stored `model/<param>` once, in the checkpoint's global shape."""
    return [Entry(k[len("model/"):], k, tuple(v[0])) for k, v in stored.items() if k.startswith("model/")]


def hf_entries(model: dict, stored: dict[str, tuple[torch.Size, torch.dtype]]) -> list[Entry]:
    """Llama's names and shapes for an all-softmax lctrain model (ValueError for anything else)."""
    layers, pattern = int(model["num_layers"]), str(model["layer_pattern"])
    mixers = (pattern * -(-layers // len(pattern)))[:layers]
    if set(mixers) != {"A"}:
        raise ValueError(f"--format hf needs an all-softmax model (layer_pattern of 'A's); this one has "
                         f"{pattern!r}. Export it with --format safetensors (lctrain's names, loads back with "
                         "lctrain train --init-from)")
    h, hkv, hidden = int(model["num_heads"]), int(model["num_kv_heads"]), int(model["hidden_size"])
    d, ffn, qpg = hidden // h, int(model["ffn_hidden_size"]), h // hkv

    def qkv_part(lo: int, hi: int, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
        # rows are laid out group by group: qpg query heads, then the key head, then the value head
        return lambda t: t.view(hkv, qpg + 2, d, hidden)[:, lo:hi].reshape(rows, hidden)

    out = [Entry("model.embed_tokens.weight", "model/embed.weight", (int(model["vocab_size"]), hidden))]
    for i in range(layers):
        src, dst = f"model/layers.{i}.", f"model.layers.{i}."
        out += [
            Entry(dst + "input_layernorm.weight", src + "mixer_norm.weight", (hidden,)),
            Entry(dst + "self_attn.q_proj.weight", src + "mixer.qkv.proj.weight", (h * d, hidden),
                  qkv_part(0, qpg, h * d)),
            Entry(dst + "self_attn.k_proj.weight", src + "mixer.qkv.proj.weight", (hkv * d, hidden),
                  qkv_part(qpg, qpg + 1, hkv * d)),
            Entry(dst + "self_attn.v_proj.weight", src + "mixer.qkv.proj.weight", (hkv * d, hidden),
                  qkv_part(qpg + 1, qpg + 2, hkv * d)),
            Entry(dst + "self_attn.o_proj.weight", src + "mixer.out.weight", (hidden, h * d)),
            Entry(dst + "post_attention_layernorm.weight", src + "mlp_norm.weight", (hidden,)),
            Entry(dst + "mlp.gate_proj.weight", src + "mlp.gate_up.weight", (ffn, hidden), lambda t: t[:ffn]),
            Entry(dst + "mlp.up_proj.weight", src + "mlp.gate_up.weight", (ffn, hidden), lambda t: t[ffn:]),
            Entry(dst + "mlp.down_proj.weight", src + "mlp.down.weight", (hidden, ffn)),
        ]
    out.append(Entry("model.norm.weight", "model/norm.weight", (hidden,)))
    if not model.get("tie_embeddings", False):
        out.append(Entry("lm_head.weight", "model/output.weight", (int(model["vocab_size"]), hidden)))
    missing = sorted({e.source for e in out} - set(stored))
    if missing:
        raise CheckpointError(f"the checkpoint lacks {missing[:3]} for the Llama mapping (a different model?)")
    return out


def hf_config(model: dict, dtype: str) -> dict:
    """Hugging Face LlamaConfig fields for an lctrain model config."""
    h = int(model["num_heads"])
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(model["vocab_size"]), "hidden_size": int(model["hidden_size"]),
        "intermediate_size": int(model["ffn_hidden_size"]), "num_hidden_layers": int(model["num_layers"]),
        "num_attention_heads": h, "num_key_value_heads": int(model["num_kv_heads"]),
        "head_dim": int(model["hidden_size"]) // h, "hidden_act": "silu", "rms_norm_eps": float(model["norm_eps"]),
        "rope_theta": float(model["rope_theta"]),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(model["rope_theta"])},
        "max_position_embeddings": int(model.get("max_position_embeddings", 131072)),
        "tie_word_embeddings": bool(model.get("tie_embeddings", False)), "attention_bias": False, "mlp_bias": False,
        "torch_dtype": _HF_DTYPE[dtype], "dtype": _HF_DTYPE[dtype],
        "initializer_range": float(model.get("init_std", 0.02)),
    }


def plan_files(entries: list[Entry], dtype: torch.dtype, max_bytes: int) -> list[list[Entry]]:
    """Consecutive entries grouped into files of at most `max_bytes` (a larger tensor gets a file of its own)."""
    files: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        n = math.prod(e.shape) * dtype.itemsize
        if files[-1] and size + n > max_bytes:
            files.append([])
            size = 0
        files[-1].append(e)
        size += n
    return [f for f in files if f]


def _header(entries: list[Entry], dtype: torch.dtype, metadata: dict[str, str]) -> bytes:
    head: dict = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        n = math.prod(e.shape) * dtype.itemsize
        head[e.name] = {"dtype": _ST_DTYPE[dtype], "shape": list(e.shape), "data_offsets": [offset, offset + n]}
        offset += n
    body = json.dumps(head, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # the data start 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(body)) + body


class _SourceCache:
    """The last stored tensor read (q, k and v come from one qkv tensor: read it once)."""

    def __init__(self, path: Path):
        self.path, self.name, self.tensor = path, None, None

    def get(self, name: str) -> torch.Tensor:
        if name != self.name:
            self.name, self.tensor = None, None  # drop the previous one before reading the next
            self.tensor = load_tensors(self.path, [name])[name]
            self.name = name
        return self.tensor


def write_file(path: Path, entries: list[Entry], dtype: torch.dtype, source: _SourceCache,
               metadata: dict[str, str]) -> int:
    """Stream `entries` into one safetensors file; returns its data bytes."""
    written = 0
    with open(path, "wb") as f:
        f.write(_header(entries, dtype, metadata))
        for e in entries:
            t = e.take(source.get(e.source)).to(dtype).contiguous()
            if tuple(t.shape) != e.shape:
                raise CheckpointError(f"{e.source} -> {e.name}: shape {tuple(t.shape)}, {e.shape} expected")
            f.write(t.view(torch.uint8).numpy().data)
            written += t.numel() * t.element_size()
            del t
    return written


def export(src: str | Path, out: str | Path, fmt: str = "safetensors", dtype: str = "fp32",
           max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Export the checkpoint at `src` (or a run directory's newest) to `out`; returns a summary.

    Raises:
        ValueError: a bad format/dtype, or `--format hf` for a model that is not all-softmax.
        CheckpointError: `src` is not a complete checkpoint.
    """
    if fmt not in ("safetensors", "hf"):
        raise ValueError(f"--format must be safetensors or hf, got {fmt!r}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    path = resolve_source(src)
    meta = read_meta(path, verify=True)
    model = meta["config"]["model"]
    stored = stored_tensors(path)
    entries = hf_entries(model, stored) if fmt == "hf" else native_entries(stored)
    tdtype = DTYPES[dtype]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = plan_files(entries, tdtype, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    source = _SourceCache(path)
    metadata = {"format": "pt", "lctrain_checkpoint": str(path), "lctrain_step": str(meta["step"])}
    total, weight_map = 0, {}
    for name, group in zip(names, groups):
        total += write_file(out / name, group, tdtype, source, metadata)
        weight_map.update({e.name: name for e in group})
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = hf_config(model, dtype) if fmt == "hf" else {"lctrain_model": model, "torch_dtype": _HF_DTYPE[dtype],
                                                          "lctrain_step": meta["step"]}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return {"checkpoint": str(path), "files": names, "tensors": len(entries), "bytes": total}


def load_export_into(engine, mesh, path: str | Path) -> int:
    """Initialise a freshly built engine's fp32 masters (every layout) from an lctrain-format export at `path`.

    Each rank reads only the boxes it owns (`safe_open(...).get_slice`) and writes them into DeepSpeed's masters,
    as a checkpoint load does; the moments stay zero and the step count 0. Returns the number of tensors read.

    Raises:
        CheckpointError: a missing tensor or a shape that differs from the model's (naming the export).
    """
    from safetensors import safe_open

    from lctrain.checkpoint.state import Shards, finish_load, prepare_load, sharded_state

    path = Path(path)
    index = path / INDEX
    if not index.is_file():
        raise CheckpointError(f"--init-from {str(path)!r}: no {INDEX} (not an `lctrain export` directory)")
    weight_map = json.loads(index.read_text())["weight_map"]
    prepare_load(engine, 0)
    state = sharded_state(engine, mesh, 0, for_load=True)
    handles: dict[str, object] = {}
    count = 0
    try:
        for key, value in state.items():
            if not key.startswith("model/") or not isinstance(value, Shards):
                continue
            name = key[len("model/"):]
            if name not in weight_map:
                raise CheckpointError(f"--init-from {str(path)!r} lacks {name!r} (exported from another model, or "
                                      "with --format hf? --init-from takes --format safetensors)")
            f = handles.setdefault(weight_map[name], safe_open(str(path / weight_map[name]), framework="pt"))
            sl = f.get_slice(name)
            if tuple(sl.get_shape()) != tuple(value.shape):
                raise CheckpointError(f"--init-from {str(path)!r}: {name} has shape {tuple(sl.get_shape())}, this "
                                      f"model needs {tuple(value.shape)}")
            with torch.no_grad():
                for offsets, view in value.boxes:
                    index_ = tuple(slice(o, o + n) for o, n in zip(offsets, view.shape))
                    view.copy_(sl[index_].to(view.dtype))
            count += 1
    finally:
        handles.clear()
    finish_load(engine)
    return count


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lctrain export", description="Export a checkpoint to safetensors / Hugging Face.")
    p.add_argument("source", help="a checkpoint directory, or a run directory (its newest complete checkpoint)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "hf"],
                   help="safetensors: lctrain's names, any model (loads back with --init-from); hf: Llama, "
                        "all-softmax models")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--max-shard-gb", type=float, default=MAX_SHARD_BYTES / 1e9, help="largest file (default 5)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        info = export(args.source, args.out, args.format, args.dtype, int(args.max_shard_gb * 1e9))
    except (ValueError, OSError) as err:
        print(f"lctrain export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {info['checkpoint']}: {info['tensors']} tensors, {info['bytes']} bytes in "
          f"{len(info['files'])} file(s) -> {args.out}")
    return 0
