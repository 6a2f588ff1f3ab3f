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


def test_profile_runs_the_gaze_arm_once_per_neighbours_setting_side_by_side(capsys):
    bench.main(["profile", "--device", "cpu", "--image", "48", "--batch", "64", "--minibatch", "32", "--epochs", "2",
                "--memory", "64", "--neighbours", "per_minibatch", "per_update"])
    out = capsys.readouterr().out
    calls = {}
    for arm in ("per_minibatch", "per_update"):
        part = out[out.index(f"\ngaze@{arm}:"):]
        part = part[:part.index("\n\n", 1)]
        calls[arm] = {m.group(1).strip(): (int(m.group(2)), int(m.group(3)))
                      for m in re.finditer(r"^  (contrastive: [a-z ,()_]+?)\s+(\d+)\s+\d+\s+(\d+)", part, re.M)}
    # 2 epochs of 2 minibatches: the search runs in all 4, or in the first epoch's 2 and the cache serves the others
    assert calls["per_minibatch"]["contrastive: neighbour search"][0] == 4
    assert calls["per_update"]["contrastive: neighbour search"][0] == 2
    assert calls["per_update"]["contrastive: cached neighbours (per_update)"] == (2, 0)
    assert all(syncs == 0 for arm in calls.values() for _, syncs in arm.values()), calls
