"""Tokenizers: byte-level by default (256 ids, nothing to download), or a local Hugging Face `tokenizer.json`.

A tokenizer here exposes `encode`, `decode`, `vocab_size`, the special ids the data pipeline needs --
`eos_id` (ends every document), `bos_id` (starts every document, or None), `pad_id` (fills the tail of a
packed sequence; never scored) -- and a `fingerprint` of its definition, recorded with prepared data so a
run can check it reads tokens made by the tokenizer it names.

The special ids of a tokenizer.json come from the tokenizer itself, never from a fixed number (id 0 is "!"
in the GPT-2 and Llama-3 vocabularies): the `eos_token` / `bos_token` / `pad_token` of a
`tokenizer_config.json` next to the file when there is one, else the first of the usual names
(`<|endoftext|>`, `<|end_of_text|>`, `</s>`, ...) among its special added tokens, else an explicit
override; a tokenizer with none of these is an error, not a guess.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np

#: Conventional names of the special tokens, most specific first (GPT-2, Llama-3, SentencePiece/Llama-2, Gemma).
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "[BOS]")
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; the NUL byte (absent from ordinary text) ends each document."""

    vocab_size = 256
    eos_id = 0
    bos_id = None
    pad_id = 0
    name = "byte"
    fingerprint = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def encode_batch(self, texts: list[str], raw: list[bytes] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The texts' ids end to end (uint8 view of their UTF-8 bytes, `raw` when the caller has them) and int64
        lengths."""
        raw = [t.encode("utf-8") for t in texts] if raw is None else raw
        lens = np.fromiter(map(len, raw), dtype=np.int64, count=len(raw))
        return np.frombuffer(b"".join(raw), dtype=np.uint8), lens


def _config_token(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # {"content": "</s>", ...} in older tokenizer_config.json files
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class FileTokenizer:
    """A Hugging Face `tokenizer.json` read from disk with the `tokenizers` package (never downloaded).

    Args:
        path: the tokenizer.json file.
        eos_token, bos_token: override the detected special tokens (bos_token="none": no BOS).
    """

    def __init__(self, path: str, eos_token: str | None = None, bos_token: str | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise ValueError(f"data.tokenizer={path!r} needs the `tokenizers` package (pip install tokenizers), "
                             "or use data.tokenizer=byte") from err
        file = Path(path)
        if not file.is_file():
            raise ValueError(f"tokenizer file {path!r} does not exist")
        self._tok = Tokenizer.from_file(str(file))
        self.name = str(path)
        self.fingerprint = "sha256:" + hashlib.sha256(file.read_bytes()).hexdigest()[:16]
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        specials = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        side = file.with_name("tokenizer_config.json")
        config = json.loads(side.read_text()) if side.is_file() else {}

        def find(override: str | None, key: str, names: tuple[str, ...]) -> str | None:
            return override or _config_token(config, key) or next((n for n in names if n in specials), None)

        eos = find(eos_token, "eos_token", EOS_NAMES)
        if eos is None:
            raise ValueError(f"cannot tell the end-of-document token of {path}: no tokenizer_config.json beside it "
                             f"and none of its special tokens {sorted(specials)} is one of {list(EOS_NAMES)}; "
                             "name it with --eos-token")
        self.eos_id = self._id(eos, "end-of-document")
        bos = None if bos_token == "none" else find(bos_token, "bos_token", BOS_NAMES)
        # GPT-2 style tokenizers use one token for both; it then only ends documents.
        self.bos_id = None if bos is None or bos == eos else self._id(bos, "beginning-of-document")
        pad = _config_token(config, "pad_token") or next((n for n in PAD_NAMES if n in specials), None)
        self.pad_id = self.eos_id if pad is None else self._id(pad, "padding")

    def _id(self, token: str, role: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"the {role} token {token!r} is not in the vocabulary of {self.name}")
        return int(i)

    def encode(self, text: str) -> list[int]:
        # Special tokens (BOS/EOS) are added by the data pipeline, once, not by the tokenizer's post-processor.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_batch(self, texts: list[str], raw: list[bytes] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The texts' ids end to end (int64) and int64 lengths, from the batch encoder (`encode_batch_fast`:
        no offsets; threads only when TOKENIZERS_PARALLELISM allows)."""
        enc = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)(texts, add_special_tokens=False)
        ids = [e.ids for e in enc]
        lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lens.sum())), lens


def get_tokenizer(spec: str, eos_token: str | None = None, bos_token: str | None = None) -> ByteTokenizer | FileTokenizer:
    """`"byte"` -> ByteTokenizer, otherwise the path of a local tokenizer.json."""
    if spec == "byte":
        if eos_token or bos_token:
            raise ValueError("the byte tokenizer has fixed special ids (EOS = NUL, no BOS); "
                             "--eos-token/--bos-token need a tokenizer.json")
        return ByteTokenizer()
    return FileTokenizer(spec, eos_token, bos_token)


def tokenizer_fingerprint(spec: str) -> str:
    """What identifies the tokenizer `spec` names (the byte tokenizer, or a hash of the file's content)."""
    if spec == "byte":
        return ByteTokenizer.fingerprint
    file = Path(spec)
    if not file.is_file():
        raise ValueError(f"tokenizer file {spec!r} does not exist")
    return "sha256:" + hashlib.sha256(file.read_bytes()).hexdigest()[:16]
