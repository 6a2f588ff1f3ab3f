"""Test helpers: small GazePPO and GazeSAC configs on the clutter env, a context manager for a built
Algorithm, the benchmark scripts loaded as modules, and the environment of a suite subprocess."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from rllib_gaze import GazePPOConfig, GazeSACConfig


@contextlib.contextmanager
def running(config: GazePPOConfig):
    """The Algorithm built from ``config``, stopped (its actors released) however the block ends."""
    algo = config.build_algo()
    try:
        yield algo
    finally:
        algo.stop()


def tiny_config(attention: str = "foveal", contrastive: bool = True, **gaze) -> GazePPOConfig:
    """A GazePPO config that trains in about a second per iteration on 2 CPU cores."""
    return (
        GazePPOConfig()
        .environment("clutter", env_config={"image_size": 48, "num_distractors": 3, "seed": 0})
        .env_runners(num_env_runners=0, num_envs_per_env_runner=8, rollout_fragment_length=16,
                     gym_env_vectorize_mode="vector_entry_point")
        .training(train_batch_size_per_learner=128, minibatch_size=64, num_epochs=2)
        .rl_module(model_config={"conv_filters": ((16, 8, 4), (32, 4, 2), (32, 3, 1)),
                                 "head_hidden": 64, "image_feature_dim": 64})
        .gaze(**{"attention": attention, "contrastive": contrastive, "contrastive_num_anchors": 32,
                 "contrastive_memory_capacity": 512, "contrastive_k": 8, **gaze})
        .debugging(seed=0)
    )


def tiny_sac_config(attention: str = "foveal", contrastive: bool = True, **gaze) -> GazeSACConfig:
    """A GazeSAC config on the clutter env (48 px: a 3x3 map before the last pooling, + state) with
    small heads and batches of 32 rows, 4 gradient steps per 32 sampled env steps."""
    return (
        GazeSACConfig()
        .environment("clutter", env_config={"image_size": 48, "num_distractors": 3, "seed": 0,
                                            "include_state": True})
        .env_runners(num_env_runners=0, num_envs_per_env_runner=4, rollout_fragment_length=8,
                     gym_env_vectorize_mode="vector_entry_point")
        .training(train_batch_size_per_learner=32, num_steps_sampled_before_learning_starts=32,
                  training_intensity=4.0, replay_buffer_config={"type": "EpisodeReplayBuffer", "capacity": 2000})
        .reporting(min_time_s_per_iteration=0, min_sample_timesteps_per_iteration=32)
        .rl_module(model_config={"actor_hidden": (32,), "q_hidden": (32,), "image_feature_dim": 32})
        .gaze(**{"attention": attention, "contrastive": contrastive, "contrastive_num_anchors": 16,
                 "contrastive_memory_capacity": 256, "contrastive_k": 4, **gaze})
        .debugging(seed=0)
    )


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` as a module (benchmarks/ is a folder of scripts, not a
    package), whatever the working directory."""
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def suite_env() -> dict[str, str]:
    """This process's environment for a suite subprocess: a local Ray of its own (no RAY_ADDRESS)
    without token files in ~/.ray."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return env
