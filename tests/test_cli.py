"""The suite's command line as a user meets it: a quiet console by default, everything with --verbose."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import suite_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "tune_configs", "maniskill_suite.py")


def run_suite(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, SUITE, "--preset", "smoke", "--tasks", "clutter", "--arms", "ppo", "gaze",
               "--storage-path", str(tmp_path), "--name", "exp", *flags]
    return subprocess.run(command, env=suite_env(), capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_console_shows_progress_and_the_report_and_little_else(tmp_path):
    proc = run_suite(tmp_path)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    lines = console.splitlines()
    assert len(lines) < 60, console           # 2 trials; the full smoke preset (8 trials) stays under 100
    assert "Traceback" not in console
    assert "Warning" not in console and "WARNING" not in console, console
    assert any(line.startswith("[suite] finished: 2/2 trials done") for line in lines)
    assert "| gaze | 1 |" in console          # the report's table
    assert (tmp_path / "exp" / "report.md").exists()


def test_wandb_without_the_package_fails_before_anything_starts(tmp_path):
    # sys.modules[name] = None makes Python treat the package as not installed
    code = ("import sys; sys.modules['wandb'] = None; from rllib_gaze.cli import parse_args; "
            "parse_args(['--preset', 'smoke', '--wandb', 'myproject'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--wandb myproject" in proc.stderr and 'pip install "rllib-gaze[wandb]"' in proc.stderr


@pytest.mark.parametrize("uri", [False, True], ids=["path", "file-uri"])
def test_the_experiment_keeps_its_preset_for_resume_locally_and_behind_a_uri(tmp_path, uri):
    from rllib_gaze.cli import save_preset, saved_preset
    from rllib_gaze.suite import PRESETS

    folder = f"file://{tmp_path}/exp" if uri else str(tmp_path / "exp")
    assert saved_preset(folder) is None
    save_preset(folder, PRESETS["local"])
    assert saved_preset(folder) == PRESETS["local"]


def test_resume_without_a_saved_preset_takes_the_algorithm_from_a_written_trial(tmp_path):
    from rllib_gaze.cli import _experiment_algo

    (tmp_path / "a_sac_seed0").mkdir()   # the driver was killed while Tune created this trial
    (tmp_path / "a_sac_seed0" / "params.json").write_text("")
    (tmp_path / "b_sac_seed1").mkdir()
    (tmp_path / "b_sac_seed1" / "params.json").write_text('{"arm": "sac"}')
    assert _experiment_algo(str(tmp_path), None, "ppo") == "sac"
