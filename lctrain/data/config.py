"""Data configuration: which task or corpus, how long the samples are, and the data-order seed."""
from __future__ import annotations

from dataclasses import dataclass, field

SOURCES = ("mqar", "passkey", "text")
PACKINGS = ("best_fit", "greedy", "concat", "pad")


@dataclass
class DataConfig:
    """Where samples come from and how long they are."""

    source: str = "mqar"
    """mqar | passkey | text."""
    seq_len: int = 256
    """Tokens per sample (the model sees seq_len inputs and seq_len next-token labels)."""
    seed: int = 0
    """Seed of the data order / generated samples (its own generator, never the global RNG)."""
    tokenizer: str = "byte"
    """"byte" (256 ids, no downloads) or the path of a local tokenizer.json (needs the `tokenizers` package).
    text: tokenizes data.inputs, and must be the tokenizer data.path was prepared with (checked)."""
    path: str = ""
    """text: the directory written by `lctrain data prepare` (or prepared there from data.inputs)."""
    inputs: list[str] = field(default_factory=list)
    """text: corpus files/folders (plain text, .jsonl, .parquet, `pkg:NAME`) prepared into data.path with
    data.tokenizer when data.path holds no prepared corpus yet."""
    text_field: str = "text"
    """text: the JSONL field / Parquet column holding a document (for data.inputs)."""
    packing: str = "best_fit"
    """text: how documents fill sequences: best_fit | greedy | concat | pad (one per sequence; see packing.py)."""
    document_mask: bool = True
    """text: attention, RoPE positions and the loss stay within each document (batches carry cu_seqlens);
    false: documents of a sequence see each other (positions run over the whole sequence)."""
    eval_fraction: float = 0.01
    """text: the fraction of documents held out for evaluation, chosen by a hash of each document's text."""
    mqar_num_kv_pairs: int = 8
    """mqar: key-value pairs written at the start of each sample (each is queried once later)."""
    mqar_vocab_size: int = 256
    """mqar: token ids used (keys from the lower half, values from the upper half; 0 is the filler)."""
    mqar_power_a: float = 0.01
    """mqar: query positions are drawn with probability ~ gap^(a-1) (Zoology's power law; small a = near)."""
    passkey_digits: int = 5
    """passkey: digits of the pass key."""

    def validate(self) -> None:
        """Raise ValueError for a setting that can't work (no I/O, no communication)."""
        if self.source not in SOURCES:
            raise ValueError(f"data.source must be one of {SOURCES}, got {self.source!r}")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if self.source == "text" and not self.path:
            raise ValueError("data.source=text needs data.path (a directory written by `lctrain data prepare`)")
        if self.packing not in PACKINGS:
            raise ValueError(f"data.packing must be one of {PACKINGS}, got {self.packing!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.source == "mqar":
            if self.mqar_num_kv_pairs < 1:
                raise ValueError(f"data.mqar_num_kv_pairs must be >= 1, got {self.mqar_num_kv_pairs}")
            if self.seq_len < 4 * self.mqar_num_kv_pairs:
                raise ValueError(
                    f"data.seq_len={self.seq_len} is too short for {self.mqar_num_kv_pairs} MQAR pairs "
                    f"(needs >= 4 * mqar_num_kv_pairs: the pairs, then a query region at least as long)"
                )
            half = self.mqar_vocab_size // 2
            if half - 1 < self.mqar_num_kv_pairs:
                raise ValueError(f"data.mqar_vocab_size={self.mqar_vocab_size} has too few keys for "
                                 f"{self.mqar_num_kv_pairs} distinct pairs")
