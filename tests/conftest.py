"""Shared fixtures: one local Ray for the tests that need it, small configs on the clutter env."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token files in CI's home for a local test Ray

import rllib_gaze  # noqa: E402,F401  (registers GazePPO and the envs)
from rllib_gaze import GazePPOConfig  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@contextlib.contextmanager
def running(config: GazePPOConfig):
    """The Algorithm built from ``config``, stopped (its actors released) however the block ends."""
    algo = config.build_algo()
    try:
        yield algo
    finally:
        algo.stop()


def load_suite_script():
    """``tune_configs/maniskill_suite.py`` as a module (it is a script, not part of the package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tune_configs", "maniskill_suite.py")
    spec = importlib.util.spec_from_file_location("maniskill_suite", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
                 "contrastive_buffer_capacity": 512, "contrastive_k": 8, **gaze})
        .debugging(seed=0)
    )
