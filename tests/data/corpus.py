"""Small corpora and tokenizers generated inside the tests (nothing is downloaded)."""
from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the cat dog sat ran on a mat log red blue big small fast slow and then it was not very "
         "one two three four five six seven eight nine ten").split()


def make_docs(n: int, seed: int = 0, max_words: int = 40) -> list[str]:
    """`n` documents of 1 .. max_words words with long-tailed lengths (distinct texts)."""
    g = random.Random(seed)
    docs = []
    for i in range(n):
        k = min(max_words, 1 + int(g.lognormvariate(1.5, 1.0)))
        docs.append(" ".join([f"doc{i}"] + [g.choice(WORDS) for _ in range(k - 1)]))
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def make_tokenizer(path: Path, docs: list[str], specials=("[UNK]", "<|endoftext|>", "<pad>")) -> Path:
    """A word-level tokenizer.json trained on `docs`; with the default specials EOS is id 1 and padding id 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(docs, trainers.WordLevelTrainer(special_tokens=list(specials)))
    tok.save(str(path))
    return path
