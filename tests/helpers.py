"""Test helpers: small configs on the clutter env and a context manager for a built Algorithm."""

from __future__ import annotations

import contextlib

from rllib_gaze import GazePPOConfig


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
