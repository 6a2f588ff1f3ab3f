"""A suite whose driver is interrupted (SIGINT, or SIGKILL) finishes with --resume, losing nothing:
finished trials are not re-run, the interrupted one continues from its last checkpoint, and trials Tune
had not created yet are created."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from helpers import suite_env

from rllib_gaze.results import result_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "tune_configs", "maniskill_suite.py")
ITERATIONS, BATCH = 10, 256  # smoke's clutter task: 16 envs x 16 steps per iteration


def _rows(trial_dir) -> list[dict]:
    return result_rows(str(trial_dir / "result.json"))  # the driver may die mid-line: such a line is skipped


def _trial(experiment, arm: str):
    found = [d for d in experiment.glob(f"clutter_{arm}_seed0_*") if d.is_dir()] if experiment.exists() else []
    return found[0] if found else None


def _start_and_interrupt(tmp_path, sig: int, arm: str) -> None:
    """Starts the smoke suite (clutter, ppo then gaze, one trial at a time) in ``tmp_path``/exp and sends
    ``sig`` to its driver once ``arm``'s trial has logged 5 iterations."""
    start = [sys.executable, SUITE, "--preset", "smoke", "--tasks", "clutter", "--arms", "ppo", "gaze",
             "--budget", str(ITERATIONS * BATCH), "--max-concurrent-trials", "1", "--checkpoint-every", "2",
             "--name", "exp", "--storage-path", str(tmp_path)]
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(start, env=suite_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and driver.poll() is None:
                trial = _trial(tmp_path / "exp", arm)
                if trial is not None and len(_rows(trial)) >= 5:
                    break
                time.sleep(0.5)  # polling the running suite's files, not timing anything
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            driver.send_signal(sig)
            driver.wait(timeout=300)
        finally:
            if sig == signal.SIGKILL or driver.poll() is None:  # the machine went down: nothing of it survives
                try:
                    os.killpg(driver.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _resume(tmp_path) -> None:
    resumed = subprocess.run([sys.executable, SUITE, "--resume", "exp", "--storage-path", str(tmp_path)],
                             env=suite_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "[suite] resuming" in resumed.stdout


def test_interrupted_suite_resumes_from_checkpoints_without_rerunning_finished_trials(tmp_path):
    experiment = tmp_path / "exp"
    _start_and_interrupt(tmp_path, signal.SIGINT, "gaze")
    ppo, gaze = _trial(experiment, "ppo"), _trial(experiment, "gaze")
    finished_ppo = (ppo / "result.json").read_bytes()
    assert _rows(ppo)[-1]["training_iteration"] == ITERATIONS
    before = _rows(gaze)
    interrupted_at = before[-1]["training_iteration"]
    assert 5 <= interrupted_at < ITERATIONS
    checkpoints = sorted(int(d.name.split("_")[-1]) for d in gaze.glob("checkpoint_*"))
    assert checkpoints, "no checkpoint before the interruption"

    _resume(tmp_path)

    assert (ppo / "result.json").read_bytes() == finished_ppo  # the finished trial was not re-run
    after = _rows(gaze)[len(before):]
    iterations = [r["training_iteration"] for r in after]
    # continues after the last checkpoint (at most `--checkpoint-every` iterations are redone), never from 1
    assert 1 < iterations[0] <= interrupted_at + 1 and iterations == list(range(iterations[0], ITERATIONS + 1))
    assert [r["num_env_steps_sampled_lifetime"] for r in after] == [i * BATCH for i in iterations]
    assert (experiment / "report.md").exists() and "| gaze | 1 |" in (experiment / "report.md").read_text()


def test_resume_creates_the_trials_tune_had_not_created_before_the_interruption(tmp_path):
    # Tune creates the next trial only when one may start; its stored trial configs hold placeholders
    # that only the original param space resolves (the suite saves its preset at launch to rebuild it).
    # SIGKILL: the machine went down, nothing of the driver survives.
    experiment = tmp_path / "exp"
    _start_and_interrupt(tmp_path, signal.SIGKILL, "ppo")
    assert _trial(experiment, "gaze") is None, "the gaze trial existed before the interruption"
    before = _rows(_trial(experiment, "ppo"))
    assert before[-1]["training_iteration"] < ITERATIONS

    _resume(tmp_path)

    ppo, gaze = _trial(experiment, "ppo"), _trial(experiment, "gaze")
    iterations = [r["training_iteration"] for r in _rows(ppo)[len(before):]]
    assert 1 < iterations[0] <= before[-1]["training_iteration"] + 1  # from its last checkpoint
    assert iterations == list(range(iterations[0], ITERATIONS + 1))
    assert [r["training_iteration"] for r in _rows(gaze)] == list(range(1, ITERATIONS + 1))
    assert (experiment / "report.md").exists() and "| gaze | 1 |" in (experiment / "report.md").read_text()
