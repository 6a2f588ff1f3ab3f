"""A trial that raises is restarted by Tune from its last checkpoint (FailureConfig(max_failures=2)),
through the real suite command line; one that raises every time ends failed, named on the console
and in the report. One suite run holds both (one Ray start instead of two)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import suite_env

from rllib_gaze.results import result_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERATIONS, BATCH = 4, 256  # smoke's clutter task: 16 envs x 16 steps per iteration
# The suite's command line, with GazePPOConfig's test-only _fail_at_iteration set on two trials: the
# gaze trial fails once, the gaze-rl trial after every restore too.
SUITE = """
import sys
import rllib_gaze.suite as suite
from rllib_gaze.cli import main

real = suite.trial_config
def trial_config(task, arm, seed, preset):
    config = real(task, arm, seed, preset)
    if arm in ("gaze", "gaze-rl"):
        config.update_from_dict({"_fail_at_iteration": 3, "_fail_after_restore": arm == "gaze-rl"})
    return config
suite.trial_config = trial_config
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def failing_suite(tmp_path_factory):
    """The finished suite's console and its storage path."""
    tmp_path = tmp_path_factory.mktemp("restart")
    command = [sys.executable, "-c", SUITE, "--preset", "smoke", "--tasks", "clutter", "--arms", "ppo", "gaze",
               "gaze-rl", "--budget", str(ITERATIONS * BATCH), "--max-concurrent-trials", "1",
               "--checkpoint-every", "2", "--storage-path", str(tmp_path), "--name", "exp"]
    proc = subprocess.run(command, env=suite_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    return proc, tmp_path


def _trial(tmp_path, arm: str):
    (trial,) = [d for d in (tmp_path / "exp").glob(f"clutter_{arm}_seed0_*") if d.is_dir()]
    return trial


def _rows(tmp_path, arm: str) -> list[dict]:
    return result_rows(str(_trial(tmp_path, arm) / "result.json"))


def test_the_suite_finishes_the_others_and_exits_nonzero_naming_the_failed_trial(failing_suite):
    proc, tmp_path = failing_suite
    console = proc.stdout + proc.stderr
    assert proc.returncode == 1, console[-3000:]
    assert "[suite] finished: 2/3 trials done, 1 failed" in console, console[-3000:]
    assert "[suite] failed trial clutter_gaze-rl_seed0: RuntimeError: _fail_at_iteration=3" in console, console[-3000:]
    assert _rows(tmp_path, "ppo")[-1]["training_iteration"] == ITERATIONS


def test_a_trial_that_fails_once_is_restarted_from_its_checkpoint_and_finishes(failing_suite):
    _, tmp_path = failing_suite
    errors = (_trial(tmp_path, "gaze") / "error.txt").read_text()  # Tune's record of the trial's failures
    assert "Failure # 1" in errors and "Failure # 2" not in errors and "_fail_at_iteration=3" in errors
    rows = _rows(tmp_path, "gaze")
    iterations = [r["training_iteration"] for r in rows]
    # 1, 2 (checkpoint), the failure at 3, then 3, 4 after the restore: never from 1 again
    assert iterations == [1, 2, 3, 4], iterations
    assert [r["num_env_steps_sampled_lifetime"] for r in rows] == [i * BATCH for i in iterations]
    report = (tmp_path / "exp" / "report.md").read_text()
    assert f"- {_trial(tmp_path, 'gaze').name}: finished after 1 restart(s): " in report, report
    assert "_fail_at_iteration=3" in report.split("Trials that raised")[1]


def test_a_trial_that_fails_every_time_ends_failed_and_the_report_says_why(failing_suite):
    _, tmp_path = failing_suite
    assert _rows(tmp_path, "gaze-rl")[-1]["training_iteration"] == 2  # three tries, each failing after the checkpoint
    report = (tmp_path / "exp" / "report.md").read_text()  # the report names it too, and why
    assert f"- {_trial(tmp_path, 'gaze-rl').name}: failed 3 time(s), stopped at iteration 2 of 4: " in report, report
    assert "RuntimeError: _fail_at_iteration=3" in report.split("Trials that raised")[1]
