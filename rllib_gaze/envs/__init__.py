"""Environments, registered with Tune under names usable from any config.

Batched envs here are whole ``gymnasium.vector.VectorEnv`` objects: configure RLlib with
``config.env_runners(gym_env_vectorize_mode="vector_entry_point")`` so one env object serves all
``num_envs_per_env_runner`` sub-envs.
"""

from __future__ import annotations

import inspect

from ray import tune

from rllib_gaze.envs.bridge import BatchedEnvBridge
from rllib_gaze.envs.clutter import ClutterEnv

CLUTTER = "clutter"
MANISKILL = "maniskill"


def _bridge_options(cfg: dict, name: str) -> dict:
    """Pop the bridge's own options out of an env_config (``BatchedEnvBridge``'s arguments of the same
    names: ``ignore_terminations``, ``bootstrap_at_done``, ``torch_observations``); check RLlib passed
    ``num_envs``."""
    if "num_envs" not in cfg:
        raise ValueError(
            f"env {name!r} is a batched VectorEnv: set "
            "config.env_runners(gym_env_vectorize_mode='vector_entry_point') so RLlib passes num_envs")
    return {"ignore_terminations": bool(cfg.pop("ignore_terminations", False)),
            "bootstrap_at_done": bool(cfg.pop("bootstrap_at_done", True)),
            "torch_observations": bool(cfg.pop("torch_observations", True))}


def make_clutter(env_config: dict) -> BatchedEnvBridge:
    """Tune env creator for ``"clutter"``; RLlib passes ``num_envs`` in vector_entry_point mode."""
    cfg = dict(env_config)
    bridge = _bridge_options(cfg, CLUTTER)
    allowed = [p for p in inspect.signature(ClutterEnv).parameters if p != "self"]
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ValueError(f"env {CLUTTER!r}: unknown env_config keys {unknown}; allowed keys are "
                         f"{allowed + list(bridge)}")
    return BatchedEnvBridge(ClutterEnv(**cfg), **bridge)


def make_maniskill_env(env_config: dict) -> BatchedEnvBridge:
    """Tune env creator for ``"maniskill"``: ``env_config`` holds ``env_id`` and the options of
    ``rllib_gaze.envs.maniskill.make_maniskill``, plus the bridge's ``ignore_terminations``,
    ``bootstrap_at_done`` and ``torch_observations``."""
    from rllib_gaze.envs.maniskill import make_maniskill  # imports ManiSkill only when used

    cfg = dict(env_config)
    bridge = _bridge_options(cfg, MANISKILL)
    return BatchedEnvBridge(make_maniskill(**cfg), **bridge)


def make_env(env_name: str, env_config: dict, num_envs: int) -> BatchedEnvBridge:
    """The registered batched env ``env_name`` with ``num_envs`` sub-envs, outside any env runner."""
    from ray.tune.registry import ENV_CREATOR, _global_registry

    return _global_registry.get(ENV_CREATOR, env_name)({**env_config, "num_envs": num_envs})


def evaluation_env_config(env_name: str, env_config: dict) -> dict:
    """ppo_rgb's evaluation setting for ``env_config``: no early termination (every episode runs to
    the time limit, so ``success_at_end``/``success_once`` compare like with like) and, for
    ManiSkill, the scene rebuilt every episode (``reconfiguration_freq=1``). Use it with
    ``config.evaluation(evaluation_config={"explore": False, "env_config": ...})``."""
    out = {**env_config, "ignore_terminations": True}
    if env_name == MANISKILL:
        out["reconfiguration_freq"] = 1
    return out


tune.register_env(CLUTTER, make_clutter)
tune.register_env(MANISKILL, make_maniskill_env)

__all__ = ["CLUTTER", "MANISKILL", "BatchedEnvBridge", "ClutterEnv", "evaluation_env_config", "make_clutter",
           "make_env", "make_maniskill_env"]
