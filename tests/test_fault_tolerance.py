"""An env runner actor killed mid-training: RLlib restarts it and training goes on, counted."""

from __future__ import annotations

import os
import signal

from helpers import running, tiny_config


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
