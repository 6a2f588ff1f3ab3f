"""Environments, registered with Tune under names usable from any config.

Batched envs here are whole ``gymnasium.vector.VectorEnv`` objects: configure RLlib with
``config.env_runners(gym_env_vectorize_mode="vector_entry_point")`` so one env object serves all
``num_envs_per_env_runner`` sub-envs.
"""

from __future__ import annotations

from ray import tune

from rllib_gaze.envs.clutter import ClutterEnv

CLUTTER = "clutter"


def make_clutter(env_config: dict) -> ClutterEnv:
    """Tune env creator for ``"clutter"``; RLlib passes ``num_envs`` in vector_entry_point mode."""
    cfg = dict(env_config)
    if "num_envs" not in cfg:
        raise ValueError(
            f"env {CLUTTER!r} is a batched VectorEnv: set "
            "config.env_runners(gym_env_vectorize_mode='vector_entry_point') so RLlib passes num_envs")
    return ClutterEnv(**cfg)


tune.register_env(CLUTTER, make_clutter)

__all__ = ["CLUTTER", "ClutterEnv", "make_clutter"]
