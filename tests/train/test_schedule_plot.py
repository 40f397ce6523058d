"""LR schedule shape and `lctrain plot`."""
import json
import math

from lctrain.train.plot import main as plot_main
from lctrain.train.schedule import lr_at


def test_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, 0.1, 4, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert math.isclose(lr_at(12, 1.0, 0.1, 4, 20), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(lr_at(20, 1.0, 0.1, 4, 20), 0.1)


def test_plot_writes_png(tmp_path):
    rows = [{"step": s, "loss": 5.0 / s, "tokens": 10 * s, "tokens_per_s": 1.0} for s in range(1, 6)]
    rows[-1].update(eval_loss=1.2, eval_acc=0.5)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_main([str(tmp_path)]) == 0
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_main([str(tmp_path / "empty")]) == 2
