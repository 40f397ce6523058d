"""`lctrain bench sp` runs a tiny sweep on spawned ranks and prints one table row per method and length."""
from lctrain.bench import METHODS, main


def test_bench_sp_prints_a_markdown_row_per_method_and_length(capsys):
    assert main(["sp", "--world", "2", "--seq", "16", "32", "--heads", "2", "--dim", "4", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(rows) == 2 * len(METHODS), out
    ring32 = next(r for r in rows if r.startswith("| ring | 32 |"))
    # CP=2, zigzag: one K/V block of 16 tokens x 2 heads x 4 dims x 2 tensors x 4 bytes = 1 KiB forward.
    assert ring32.split("|")[3].strip() == "1.0", ring32
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        method, calls_fwd, calls_bwd, first_objects, syncs, saved, backend = (cells[0], cells[4], cells[5], cells[6],
                                                                               cells[7], float(cells[8]), cells[11])
        assert syncs == "0" and saved > 0 and backend, row  # no host syncs; what a layer keeps; who ran
        assert first_objects == "1" and "object" not in calls_fwd + calls_bwd, row  # one agreement, then none
        if method == "lasp2":
            assert calls_fwd == calls_bwd == "all_gather 1" and backend == "chunk", row
        if method == "allgather":
            assert (calls_fwd, calls_bwd) == ("all_gather 1", "all_gather 1, reduce_scatter 1"), row


def test_bench_rejects_bad_arguments(capsys):
    assert main([]) == 2
    try:
        main(["sp", "--world", "3", "--seq", "10"])
    except SystemExit as err:
        assert "not divisible by 6" in str(err)
    else:
        raise AssertionError("expected SystemExit")
