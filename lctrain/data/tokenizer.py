"""Tokenizers: byte-level by default (256 ids, nothing to download), or a local `tokenizer.json`."""
from __future__ import annotations

from pathlib import Path


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; id 0 (NUL, absent from ordinary text) separates documents."""

    vocab_size = 256
    eos_id = 0
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class FileTokenizer:
    """A Hugging Face `tokenizer.json` read from disk with the `tokenizers` package (never downloaded)."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise ValueError(f"data.tokenizer={path!r} needs the `tokenizers` package (pip install tokenizers), "
                             "or use data.tokenizer=byte") from err
        if not Path(path).is_file():
            raise ValueError(f"tokenizer file {path!r} does not exist")
        self._tok = Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_id = 0
        self.name = str(path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def get_tokenizer(spec: str) -> ByteTokenizer | FileTokenizer:
    """`"byte"` -> ByteTokenizer, otherwise the path of a local tokenizer.json."""
    return ByteTokenizer() if spec == "byte" else FileTokenizer(spec)
