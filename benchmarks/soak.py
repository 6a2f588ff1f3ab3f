"""Soak: does any process of a training run grow in memory over many iterations?

    python benchmarks/soak.py [--task clutter|PushCube-v1] [--arm gaze] [--iterations 400] [--every 20]

Trains one suite trial (the smoke preset's version of ``--task``, with one remote env runner so the
sampling process is measured apart from the learner) and prints, every ``--every`` iterations, the
resident memory (RSS) of the trainer process and of the env runner, then each one's slope over the
second half of the run (MB per 1,000 iterations; the first half holds the warm-up: the contrastive
memory filling, allocator pools growing). A slope near 0 is a flat line; ManiSkill's tracker reports
host RAM growing linearly during GPU PPO on ManiSkill 3.0.1, which is what this watches for.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import numpy as np
import psutil
import ray

from rllib_gaze.arms import ARMS
from rllib_gaze.suite import PRESETS, trial_config


def slope_mb_per_1000(iterations: list[int], rss_mb: list[float]) -> float:
    """Least-squares slope of RSS against iteration over the second half of the samples."""
    half = len(iterations) // 2
    x, y = np.array(iterations[half:], float), np.array(rss_mb[half:], float)
    return float(np.polyfit(x, y, 1)[0] * 1000) if len(x) >= 2 else float("nan")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python benchmarks/soak.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = {t.name: t for t in PRESETS["smoke"].tasks}
    p.add_argument("--task", default="clutter", choices=list(tasks))
    p.add_argument("--arm", default="gaze", choices=list(ARMS))
    p.add_argument("--iterations", type=int, default=400)
    p.add_argument("--every", type=int, default=20)
    args = p.parse_args(argv)

    preset = dataclasses.replace(PRESETS["smoke"], num_env_runners=1)
    task = tasks[args.task]
    config = trial_config(task, args.arm, 0, preset).evaluation(evaluation_interval=None)
    if task.env == "maniskill":
        config = config.environment(env_config={**config.env_config, "sim_backend": "physx_cpu"})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    algo = config.build_algo()
    processes = {"trainer": psutil.Process(os.getpid())}
    runner_pids = algo.env_runner_group.foreach_env_runner(lambda runner: os.getpid(), local_env_runner=False)
    processes |= {f"env runner {i}": psutil.Process(pid) for i, pid in enumerate(runner_pids)}
    samples: dict[str, list[float]] = {name: [] for name in processes}
    at: list[int] = []
    print(f"soak: {args.task}, arm {args.arm}, {args.iterations} iterations of {task.batch_size(1)} env steps; "
          f"RSS in MB every {args.every}", flush=True)
    print("iteration  " + "  ".join(f"{name:>14s}" for name in processes), flush=True)
    try:
        for i in range(1, args.iterations + 1):
            algo.train()
            if i % args.every == 0:
                at.append(i)
                for name, process in processes.items():
                    samples[name].append(process.memory_info().rss / 2**20)
                print(f"{i:9d}  " + "  ".join(f"{samples[n][-1]:14.1f}" for n in processes), flush=True)
    finally:
        algo.stop()
        ray.shutdown()
    print("slope over the second half, MB per 1,000 iterations: "
          + ", ".join(f"{name} {slope_mb_per_1000(at, values):+.1f}" for name, values in samples.items()))


if __name__ == "__main__":
    main()
