"""benchmarks/bench.py profile at a tiny size: it runs, and its counts say what issue 22 asks."""

import re

from helpers import load_benchmark

bench = load_benchmark("bench")


def test_profile_counts_no_host_sync_in_the_contrastive_path(capsys):
    bench.main(["profile", "--device", "cpu", "--image", "48", "--batch", "64", "--minibatch", "32",
                "--memory", "64"])
    out = capsys.readouterr().out
    full = out[out.index("\ngaze:"):]
    rows = {m.group(1).strip(): int(m.group(2))
            for m in re.finditer(r"^  (contrastive: [a-z ,]+?|gradient norms \(first minibatch\))\s+\d+\s+\d+\s+(\d+)",
                                 full, re.M)}
    assert {"contrastive: neighbour search", "contrastive: similarity and loss",
            "contrastive: labels and selection"} <= set(rows), rows
    assert all(syncs == 0 for syncs in rows.values()), rows
    assert re.search(r"return-to-go labels of 64 rows .*: \d+ ops, 0 host syncs", out), out[-300:]
