"""Documents from local files: plain text, JSONL and Parquet, each optionally gzip- or zstd-compressed, streamed.

    for text in iter_documents(["corpus/", "extra.jsonl.zst", "pkg:email"], text_field="text"): ...
    parts = plan_parts(list_files(inputs), part_bytes)     # the same documents, cut into independent work units

- a folder is read recursively in sorted order (hidden entries and `__pycache__` skipped);
- `*.jsonl` / `*.ndjson` (also `.gz` / `.zst`): one JSON object per line, the document is its `text_field`;
- `*.parquet`: one document per row, the column `text_field` (read in record batches with pyarrow);
- any other file is one plain-text document (UTF-8, `.gz` / `.zst` decompressed; a file with a NUL byte in its
  first 8 KiB is binary and skipped);
- `pkg:NAME[/SUB/PATH]` is the folder (or file) of the importable package NAME, e.g. `pkg:email` for text
  that ships with Python itself.

Everything is streamed: a JSONL file is read line by line, a Parquet file by record batch, so memory does not grow
with the corpus. A *part* (`plan_parts`) is a byte range of an uncompressed JSONL file (a line belongs to the part
its first byte is in), a range of Parquet row groups, a whole compressed JSONL file, or a run of plain-text files;
the parts of a corpus depend only on its files and their sizes, never on how many processes read them, so a
corpus prepared by any number of nodes and workers is the same. Empty documents are skipped. The order is the
files' sorted order, then the order inside each file.
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSED_SUFFIXES = (".gz", ".zst")


def resolve_input(item: str) -> Path:
    """The path an input names: a file or folder, or `pkg:NAME[/SUB]` (an installed package's folder)."""
    if not item.startswith("pkg:"):
        return Path(item)
    name, _, sub = item[4:].partition("/")
    spec = importlib.util.find_spec(name) if name else None
    if spec is None:
        raise ValueError(f"input {item!r}: no importable package {name!r}")
    if spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0])
    elif spec.origin:
        root = Path(spec.origin)
    else:
        raise ValueError(f"input {item!r}: package {name!r} has no files on disk")
    return root / sub if sub else root


def list_files(inputs: list[str]) -> list[Path]:
    """Every file the inputs name, folders expanded recursively and sorted."""
    files: list[Path] = []
    for item in inputs:
        p = resolve_input(item)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file()
                            and not any(part.startswith(".") or part == "__pycache__"
                                        for part in f.relative_to(p).parts))
        else:
            raise ValueError(f"input {item!r} is neither a file nor a directory")
    if not files:
        raise ValueError(f"no input files found in {inputs}")
    return files


def file_kind(file: Path) -> tuple[str, str]:
    """(kind, compression): kind jsonl | parquet | text, compression "" | ".gz" | ".zst"."""
    suffixes = [s.lower() for s in file.suffixes[-2:]]
    comp = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES else ""
    base = (suffixes[-2] if comp and len(suffixes) > 1 else "") if comp else (suffixes[-1] if suffixes else "")
    if base in JSONL_SUFFIXES:
        return "jsonl", comp
    if base in PARQUET_SUFFIXES and not comp:
        return "parquet", comp
    return "text", comp


def open_binary(file: Path, compression: str) -> IO[bytes]:
    """The file's (decompressed) bytes as a stream."""
    if compression == ".gz":
        return gzip.open(file, "rb")
    if compression == ".zst":
        try:
            import zstandard
        except ImportError as err:
            raise ValueError(f"{file}: reading .zst needs the `zstandard` package (pip install zstandard)") from err
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(file, "rb"), closefd=True))
    return open(file, "rb")


@dataclass(frozen=True)
class Part:
    """An independent unit of documents: `files` read whole, or a byte range / row-group range of one file."""

    kind: str
    """jsonl | parquet | text."""
    files: tuple[str, ...]
    start: int = 0
    """jsonl: first byte (uncompressed files); parquet: first row group."""
    stop: int = -1
    """jsonl: end byte; parquet: end row group; -1: to the end."""
    nbytes: int = 0
    """Input bytes it covers (on disk), for progress."""


def plan_parts(files: list[Path], part_bytes: int) -> list[Part]:
    """Cut `files` into parts of about `part_bytes` input bytes each, in document order."""
    if part_bytes < 1:
        raise ValueError(f"part_bytes must be >= 1, got {part_bytes}")
    parts: list[Part] = []
    texts: list[str] = []
    text_bytes = 0

    def close_texts() -> None:
        nonlocal texts, text_bytes
        if texts:
            parts.append(Part("text", tuple(texts), nbytes=text_bytes))
            texts, text_bytes = [], 0

    for f in files:
        kind, comp = file_kind(f)
        size = f.stat().st_size
        if kind == "text":
            texts.append(str(f))
            text_bytes += size
            if text_bytes >= part_bytes:
                close_texts()
            continue
        close_texts()
        if kind == "jsonl" and not comp:
            for a in range(0, max(size, 1), part_bytes):
                parts.append(Part("jsonl", (str(f),), a, min(a + part_bytes, size), min(part_bytes, size - a)))
        elif kind == "jsonl":
            parts.append(Part("jsonl", (str(f),), 0, -1, size))
        else:
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(f).metadata
            first, acc = 0, 0
            for g in range(meta.num_row_groups):
                acc += meta.row_group(g).total_byte_size
                if acc >= part_bytes or g == meta.num_row_groups - 1:
                    parts.append(Part("parquet", (str(f),), first, g + 1, acc))
                    first, acc = g + 1, 0
            if meta.num_row_groups == 0:
                parts.append(Part("parquet", (str(f),), 0, 0, size))
    close_texts()
    return parts


def _jsonl_lines(part: Part) -> Iterator[tuple[int, bytes]]:
    """(line number or byte offset, raw line) of a JSONL part."""
    file = Path(part.files[0])
    _, comp = file_kind(file)
    with open_binary(file, comp) as f:
        if part.stop < 0:
            for n, line in enumerate(f, start=1):
                yield n, line
            return
        pos = part.start
        if pos > 0:
            f.seek(pos - 1)
            pos += len(f.readline()) - 1  # the rest of the line holding byte start-1: it belongs to the part before
        for line in f:
            if pos >= part.stop:
                break
            yield pos, line
            pos += len(line)


def _jsonl(part: Part, text_field: str) -> Iterator[str]:
    where = "line" if part.stop < 0 else "byte"
    for n, line in _jsonl_lines(part):
        if line.isspace():  # stops at the first other byte: O(1) for a JSON line
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{part.files[0]} ({where} {n}): not JSON ({err})") from err
        text = obj.get(text_field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{part.files[0]} ({where} {n}): no string field {text_field!r} "
                             "(set data.text_field / --text-field)")
        yield text


def _parquet(part: Part, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(part.files[0])
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"{part.files[0]}: no column {text_field!r} (columns: {pf.schema_arrow.names}); "
                         "set data.text_field / --text-field")
    groups = list(range(part.start, part.stop if part.stop >= 0 else pf.metadata.num_row_groups))
    if not groups:
        return
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024, row_groups=groups):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{part.files[0]}: column {text_field!r} holds {type(text).__name__}, not text")
            yield text or ""


def _plain(part: Part) -> Iterator[str]:
    for name in part.files:
        file = Path(name)
        with open_binary(file, file_kind(file)[1]) as f:
            raw = f.read()
        if b"\x00" in raw[:8192]:
            continue
        yield raw.decode("utf-8", errors="replace")


def part_documents(part: Part, text_field: str = "text") -> Iterator[str]:
    """The non-empty documents of one part, in order."""
    docs = _jsonl(part, text_field) if part.kind == "jsonl" else (
        _parquet(part, text_field) if part.kind == "parquet" else _plain(part))
    for text in docs:
        if text:
            yield text


def iter_documents(inputs: list[str], text_field: str = "text") -> Iterator[str]:
    """The non-empty documents of `inputs` (files, folders, `pkg:NAME`), in sorted file order."""
    for part in plan_parts(list_files(inputs), 1 << 62):
        yield from part_documents(part, text_field)
