"""End to end: a JSONL corpus and a tokenizer.json made in the test -> `lctrain data prepare` -> `lctrain data pack`
-> `lctrain train --nproc 2` on packed batches -> stop -> resume, with the same losses as an uninterrupted run.

Slow (three 2-rank training runs as subprocesses, ~1 min each on a loaded 2-core machine).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lctrain.data.cli import main as data_main
from lctrain.data.text import read_index
from tests.data.corpus import make_docs, make_tokenizer, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {
    "model": {"vocab_size": 256, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2,
              "ffn_hidden_size": 64, "layer_pattern": "LA"},
    "parallel": {"tp": 1, "cp": 1},
    "train": {"steps": 4, "seed": 7, "global_batch_size": 4, "micro_batch_size": 1, "lr": 3.0e-3, "warmup": 1,
              "eval_batches": 1, "progress": False},
    "data": {"source": "text", "seq_len": 32, "eval_fraction": 0.2, "packing": "best_fit"},
    "checkpoint": {"every": 2},
}


def _train(cfg: Path, out: Path, *overrides: str) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "lctrain", "train", str(cfg), "--nproc", "2", f"run.out_dir={out}",
                           *overrides], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_prepare_pack_train_resume(tmp_path):
    docs = make_docs(200, seed=1)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    tok = make_tokenizer(tmp_path / "tokenizer.json", docs)
    tokens = tmp_path / "tokens"
    assert data_main(["prepare", str(corpus), "--out", str(tokens), "--tokenizer", str(tok)]) == 0
    assert read_index(str(tokens))["eos_id"] == 1  # from the tokenizer, not a fixed 0
    assert data_main(["pack", str(tokens), "--seq-len", "32", "--eval-fraction", "0.2", "--seed", "0"]) == 0
    cfg = dict(CONFIG, data=dict(CONFIG["data"], tokenizer=str(tok), path=str(tokens)))
    (tmp_path / "packed.yaml").write_text(yaml.safe_dump(cfg))

    straight = _train(tmp_path / "packed.yaml", tmp_path / "straight")
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    first = _train(tmp_path / "packed.yaml", tmp_path / "resumed", "train.exit_after=2")
    second = _train(tmp_path / "packed.yaml", tmp_path / "resumed")  # the same command resumes at step 2
    assert [r["step"] for r in second] == [1, 2, 3, 4] and first == second[:2]
    assert [r["loss"] for r in second] == [r["loss"] for r in straight]  # bit for bit
    assert "eval_loss" in second[-1] and second[-1]["eval_loss"] == straight[-1]["eval_loss"]
