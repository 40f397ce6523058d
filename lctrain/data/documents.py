"""Documents from local files: plain text, JSONL and Parquet.

    for text in iter_documents(["corpus/", "extra.jsonl", "pkg:email"], text_field="text"): ...

- a folder is read recursively in sorted order (hidden entries and `__pycache__` skipped);
- `*.jsonl` / `*.ndjson`: one JSON object per line, the document is its `text_field` (a string);
- `*.parquet`: one document per row, the column `text_field` (read in record batches with pyarrow);
- any other file is one plain-text document (UTF-8; a file with a NUL byte in its first 8 KiB is binary and
  skipped);
- `pkg:NAME[/SUB/PATH]` is the folder (or file) of the importable package NAME, e.g. `pkg:email` for text
  that ships with Python itself.

Empty documents are skipped. The order is the files' sorted order; nothing downstream depends on it (the
eval split is chosen by document hash, the training order by a seeded permutation).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterator

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


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


def _jsonl(file: Path, text_field: str) -> Iterator[str]:
    with file.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}:{n}: not JSON ({err})") from err
            text = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{file}:{n}: no string field {text_field!r} (set data.text_field / --text-field)")
            yield text


def _parquet(file: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(file)
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"{file}: no column {text_field!r} (columns: {pf.schema_arrow.names}); "
                         "set data.text_field / --text-field")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{file}: column {text_field!r} holds {type(text).__name__}, not text")
            yield text or ""


def _plain(file: Path) -> Iterator[str]:
    raw = file.read_bytes()
    if b"\x00" in raw[:8192]:
        return
    yield raw.decode("utf-8", errors="replace")


def iter_documents(inputs: list[str], text_field: str = "text") -> Iterator[str]:
    """The non-empty documents of `inputs` (files, folders, `pkg:NAME`), in sorted file order."""
    for file in list_files(inputs):
        suffix = file.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            docs = _jsonl(file, text_field)
        elif suffix in PARQUET_SUFFIXES:
            docs = _parquet(file, text_field)
        else:
            docs = _plain(file)
        for text in docs:
            if text:
                yield text
