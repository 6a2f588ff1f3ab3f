"""The bridge between batched simulators and RLlib's env runner.

A *batched env* here is anything with ManiSkill's GPU API: ``num_envs``, ``device``,
``single_observation_space``, ``single_action_space``, ``reset(seed=, options={"env_idx": idx})``
that resets the listed sub-envs and returns the observations of **all** sub-envs, and ``step(actions)``
returning torch tensors with a leading ``num_envs`` axis, without any autoreset.

RLlib's ``SingleAgentEnvRunner`` expects a gymnasium ``VectorEnv`` with next-step autoreset (after
a done, the following ``step`` returns the reset observation and its action is ignored), numpy
arrays, and infos whose values are numpy arrays of length ``num_envs``. ``BatchedEnvBridge``
provides exactly that, with partial resets of the finished sub-envs only.

Its gymnasium API (``reset``, ``step``) always returns numpy observations, whoever calls it. Beside it,
``reset_on_device`` and ``step_on_device`` return the same results with the observations left as the
env's torch tensors on its device (a GPU simulation's stay on the GPU), and ``step``/``step_on_device``
take actions as torch tensors too (moved to the env's device, no numpy round trip). ``BatchedEnvRunner``
uses these where ``torch_observations`` is set (issue 22: a policy on the GPU then gets its inputs
without a device -> host -> device trip per step); RLlib's stock runner only knows ``reset``/``step``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector.utils import batch_space


def to_numpy(x: Any) -> Any:
    """Torch tensors (possibly nested in dicts) -> numpy arrays on the host."""
    if isinstance(x, dict):
        return {k: to_numpy(v) for k, v in x.items()}
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class BatchedEnvBridge(gym.vector.VectorEnv):
    """A batched env (ManiSkill GPU API) as a next-step-autoreset gymnasium VectorEnv for RLlib.

    Args:
        env: the batched env.
        ignore_terminations: report no terminations at all (ppo_rgb's evaluation setting: episodes
            run to the time limit).
        bootstrap_at_done: report terminations as truncations, so RLlib's GAE bootstraps from the
            value of the final observation at every done, as ManiSkill's ppo_rgb does (default).
            ``False`` keeps true terminations (value 0 after them).
        torch_observations: let a runner that can take them (``BatchedEnvRunner``) read the
            observations as the env's torch tensors through ``reset_on_device``/``step_on_device``
            (default). ``False``: it reads numpy ones through ``reset``/``step``, as before issue 22.
            Either way ``reset``/``step`` return numpy, so RLlib's stock runner works with both.

    ``infos["success"]`` is a ``(num_envs,)`` bool array (False where the env reports none).
    """

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, env: Any, *, ignore_terminations: bool = False, bootstrap_at_done: bool = True,
                 torch_observations: bool = True):
        self.env = env
        self.num_envs = env.num_envs
        self.ignore_terminations, self.bootstrap_at_done = ignore_terminations, bootstrap_at_done
        self.torch_observations = torch_observations
        self.single_observation_space = env.single_observation_space
        self.single_action_space = env.single_action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._needs_reset = torch.zeros(self.num_envs, dtype=torch.bool, device=env.device)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.reset_on_device(seed=seed, options=options)
        return to_numpy(obs), info

    def step(self, actions):
        obs, *rest = self.step_on_device(actions)
        return (to_numpy(obs), *rest)

    def reset_on_device(self, *, seed: int | None = None, options: dict | None = None):
        """``reset``, with the observations as the env returned them (torch tensors on its device)."""
        obs, _ = self.env.reset(seed=seed, options=options)
        self._needs_reset[:] = False
        return obs, {"success": np.zeros(self.num_envs, dtype=bool)}

    def step_on_device(self, actions):
        """``step``, with the observations as the env returned them (torch tensors on its device);
        rewards, terminated, truncated and infos are numpy arrays, as ``step``'s."""
        if not isinstance(actions, torch.Tensor):
            actions = np.asarray(actions)
        actions = torch.as_tensor(actions, dtype=torch.float32, device=self.env.device)
        obs, reward, terminated, truncated, info = self.env.step(actions)
        reward = torch.as_tensor(reward, device=self.env.device).float().reshape(self.num_envs).clone()
        terminated = torch.as_tensor(terminated, device=self.env.device).bool().reshape(self.num_envs).clone()
        truncated = torch.as_tensor(truncated, device=self.env.device).bool().reshape(self.num_envs).clone()
        success = info.get("success") if isinstance(info, dict) else None
        success = (torch.zeros_like(terminated) if success is None
                   else torch.as_tensor(success, device=self.env.device).bool().reshape(self.num_envs).clone())
        if self.ignore_terminations:
            terminated[:] = False

        resetting = self._needs_reset
        if resetting.any():
            # The sub-envs that finished last step start anew; the action they got is ignored.
            obs, _ = self.env.reset(options={"env_idx": resetting.nonzero().squeeze(1)})
            reward[resetting] = 0.0
            terminated[resetting] = False
            truncated[resetting] = False
            success[resetting] = False
        if self.bootstrap_at_done:
            truncated |= terminated
            terminated[:] = False
        self._needs_reset = terminated | truncated
        return (obs, to_numpy(reward).astype(np.float32), to_numpy(terminated), to_numpy(truncated),
                {"success": to_numpy(success)})

    def close(self, **kwargs):
        close = getattr(self.env, "close", None)
        if close is not None:
            close()
