"""An env runner actor killed mid-training, or whose env raises: RLlib restarts it and training goes
on, counted; an env that raises every time stops the trial after max_num_env_runner_restarts."""

from __future__ import annotations

import os
import signal
import time

import pytest
from helpers import running, tiny_config, tiny_sac_config

from rllib_gaze import GazePPOConfig, GazeSACConfig


def _runner_pids(algo) -> list[int]:
    return algo.env_runner_group.foreach_env_runner(lambda runner: os.getpid(), local_env_runner=False)


def test_killed_env_runner_is_restarted_and_counters_stay_consistent(ray_session):
    config = tiny_config().env_runners(num_env_runners=2, num_envs_per_env_runner=4)
    assert config.restart_failed_env_runners  # GazePPOConfig's default, as the suite uses it
    with running(config) as algo:
        first = algo.train()
        assert first["num_env_steps_sampled_lifetime"] >= 128
        victim = _runner_pids(algo)[0]
        os.kill(victim, signal.SIGKILL)

        results = []
        while len(results) < 10:  # Ray restarts the actor in the background; RLlib probes and re-adds it
            results.append(algo.train())
            if results[-1]["fault_tolerance"]["num_healthy_workers"] == 2:
                break
        assert [r["training_iteration"] for r in results] == list(range(2, 2 + len(results)))
        steps = [first["num_env_steps_sampled_lifetime"]] + [r["num_env_steps_sampled_lifetime"] for r in results]
        assert all(b > a for a, b in zip(steps, steps[1:]))  # never restarts from zero, never stalls
        assert steps[-1] == sum(r["env_runners"]["num_env_steps_sampled"] for r in [first, *results])
        # the fault is in the results, and the runner is back (a new process)
        faults = results[-1]["fault_tolerance"]
        assert faults["num_remote_worker_restarts"] == 1 and faults["num_healthy_workers"] == 2
        assert victim not in _runner_pids(algo) and len(_runner_pids(algo)) == 2


def _env_fault_config(**fault) -> object:
    """One remote env runner whose clutter env raises at its 20th step (in the second iteration),
    restarted 0.5 s after a failure (RLlib's default waits 60 s)."""
    env_config = {"image_size": 48, "num_distractors": 3, "seed": 0, "fail_at_step": 20, **fault}
    return (tiny_config().environment("clutter", env_config=env_config)
            .env_runners(num_env_runners=1, num_envs_per_env_runner=8)
            .fault_tolerance(delay_between_env_runner_restarts_s=0.5, max_num_env_runner_restarts=2))


def _train_until_it_raises(algo, limit_s: float = 600.0) -> None:
    """Trains until an iteration raises. Iterations without a healthy runner take no time, and each
    restart waits for a new runner process to start (tens of seconds on a loaded 2-core machine), so
    a fixed number of iterations would test the machine's speed: the bound is time instead."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        algo.train()
    raise AssertionError(f"still training after {limit_s:.0f} s ({algo.iteration} iterations)")


def _runner_logs() -> str:
    import glob

    import ray

    logs = ray._private.worker._global_node.get_logs_dir_path()  # no public API names it
    return "".join(open(f, errors="replace").read() for f in glob.glob(os.path.join(logs, "worker-*.err")))


def test_env_raising_in_a_remote_runner_once_restarts_the_runner_and_training_goes_on(ray_session, tmp_path):
    with running(_env_fault_config(fail_once_file=str(tmp_path / "failed"))) as algo:
        results = [algo.train() for _ in range(2)]  # the env raises in the second iteration
        deadline = time.monotonic() + 600  # the restarted runner's process starts meanwhile (see below)
        while time.monotonic() < deadline and results[-1]["fault_tolerance"]["num_healthy_workers"] == 0:
            results.append(algo.train())
        results += [algo.train() for _ in range(2)]
    assert (tmp_path / "failed").exists()  # the fault happened
    assert results[-1]["fault_tolerance"]["num_remote_worker_restarts"] == 1
    assert results[-1]["fault_tolerance"]["num_healthy_workers"] == 1
    steps = [r["num_env_steps_sampled_lifetime"] for r in results]
    assert steps[-1] > steps[0] and steps == sorted(steps)  # sampling went on after the restart
    assert "clutter env: fail_at_step=20 reached" in _runner_logs()  # the env's own error, in Ray's logs


def test_env_raising_in_a_remote_runner_every_time_stops_the_trial(ray_session):
    config = _env_fault_config()
    assert GazePPOConfig().max_num_env_runner_restarts == 20  # bounded (RLlib's default: 1000, 60 s apart)
    with running(config) as algo:
        with pytest.raises(RuntimeError, match="max_num_env_runner_restarts=2"):
            _train_until_it_raises(algo)
    assert "clutter env: fail_at_step=20 reached" in _runner_logs()


def test_gaze_sac_also_stops_when_its_env_raises_every_time(ray_session):
    env_config = {"image_size": 48, "num_distractors": 3, "seed": 0, "include_state": True, "fail_at_step": 20}
    config = (tiny_sac_config().environment("clutter", env_config=env_config)
              .env_runners(num_env_runners=1, num_envs_per_env_runner=4)
              .fault_tolerance(delay_between_env_runner_restarts_s=0.5, max_num_env_runner_restarts=2))
    assert GazeSACConfig().max_num_env_runner_restarts == 20
    with running(config) as algo:
        with pytest.raises(RuntimeError, match="max_num_env_runner_restarts=2"):
            _train_until_it_raises(algo)
