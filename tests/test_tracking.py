"""W&B logging of the suite (rllib_gaze.tracking), offline: one run per trial, named by its label,
with the trial's config, its metrics and the gaze drawings as images."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image  # matplotlib's dependency
from ray import tune

from rllib_gaze.suite import PRESETS, BudgetStop, param_space, trial_label


def _records(path: Path):
    """The protobuf ``Record``s of a run's transaction log (``run-<id>.wandb``).

    The log is the W&B run itself: what ``wandb sync`` uploads, and in offline mode the only full
    copy (wandb-core writes no ``files/wandb-summary.json`` or ``config.yaml`` offline, and wandb no
    longer ships a Python reader). Its framing is LevelDB's log format: a 7-byte header, then 32 KiB
    blocks of chunks (crc32c, length, type: 1 whole, 2 first, 3 middle, 4 last) that never straddle
    a block, a block's last < 7 bytes being padding. The records are wandb's own protobuf schema.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending = 32 * 1024, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _put(tree: dict, item) -> None:
    """An item ``(key or nested_key, value_json)`` into ``tree``; media are nested (``img/_type``)."""
    *parents, leaf = list(item.nested_key) or [item.key]
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = json.loads(item.value_json)


def _read_run(run_dir: Path) -> dict:
    """Name, group, config and history (one dict per logged step) of an offline run."""
    run = {"config": {}, "history": []}
    for record in _records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["name"], run["group"] = record.run.display_name, record.run.run_group
            for item in record.run.config.update:
                _put(run["config"], item)
        elif kind == "config":  # the logging actor's config updates (trial_id, pid, ...)
            for item in record.config.update:
                _put(run["config"], item)
        elif kind == "history":
            row: dict = {}
            for item in record.history.item:
                _put(row, item)
            run["history"].append(row)
    return run


def _run_dir(tmp_path: Path, trial_id: str) -> Path:
    """The offline run directory of a trial (``offline-run-<time>-<run id>``; the run id is the trial's)."""
    (found,) = (tmp_path / "wandb").glob(f"offline-run-*-{trial_id}")
    return found


@pytest.mark.slow
def test_offline_runs_one_per_trial_with_label_config_metrics_and_gaze_images(ray_session, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from rllib_gaze.tracking import wandb_callback

    # Ray is already up: W&B settings from here on reach the logging actors only through wandb_callback
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    smoke = PRESETS["smoke"]
    clutter = smoke.tasks[0]
    task = dataclasses.replace(clutter, budget=2 * clutter.batch_size(0), eval_episodes=2,
                               gaze={**clutter.gaze, "gaze_image_interval": 1})
    preset = dataclasses.replace(smoke, tasks=(task,), arms=("gaze",), seeds=(0, 1))
    tuner = tune.Tuner(
        "GazePPO", param_space=param_space(preset),
        tune_config=tune.TuneConfig(max_concurrent_trials=2),
        run_config=tune.RunConfig(name="exp", storage_path=str(tmp_path / "ray"), stop=BudgetStop(), verbose=0,
                                  callbacks=[wandb_callback("rllib-gaze-test", "grp")]),
    )
    results = tuner.fit()
    assert not results.errors, results.errors

    runs = sorted((_read_run(d) for d in (tmp_path / "wandb").glob("offline-run-*")), key=lambda r: r["name"])
    expected = sorted(trial_label(r.config) for r in results)
    assert [r["name"] for r in runs] == expected == ["clutter_gaze_seed0", "clutter_gaze_seed1"]
    by_label = {trial_label(r.config): r for r in results}
    for run in runs:
        result = by_label[run["name"]]
        assert run["group"] == "grp"
        config = run["config"]
        assert (config["task"], config["arm"], config["seed"]) == ("clutter", "gaze", result.config["seed"])
        assert config["gaze_image_interval"] == 1 and config["trial_id"]  # the latter: moved from results
        steps = [row["_step"] for row in run["history"] if "_step" in row]
        assert steps == [1, 2]  # one step per training iteration
        last = run["history"][-1]
        assert last["training_iteration"] == 2
        assert last["env_runners/num_env_steps_sampled_lifetime"] == 2 * task.batch_size(0)
        assert "evaluation/env_runners/success_once" in last
        assert any(key.startswith("learners/default_policy/") for key in last)
        assert "config" not in last and "done" not in last
        image = last["gaze_images"]
        assert image["_type"] == "image-file"
        # the last drawing, pixel for pixel: transposed to (H, W, C), not reinterpreted
        png = _run_dir(tmp_path, result.metrics["trial_id"]) / "files" / image["path"]
        drawn = np.asarray(Image.open(png).convert("RGB"))
        np.testing.assert_array_equal(drawn, result.metrics["gaze_images"].transpose(1, 2, 0))


def test_without_wandb_the_error_says_how_to_install_it():
    code = ('import sys; sys.modules["wandb"] = None\n'  # `import wandb` now raises ImportError
            'from rllib_gaze.tracking import wandb_callback\n'
            'wandb_callback("p", "g")')
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert done.returncode != 0
    assert "ImportError" in done.stderr and 'pip install "rllib-gaze[wandb]"' in done.stderr, done.stderr[-2000:]
