"""ClutterEnv: a fast batched torch image task where only a small part of the image matters.

A red filled square (the agent) must reach a green hollow square (the target). Distractors of the
same size and colours (green filled squares, red hollow squares) drift around on a noisy textured
background; only the agent and the target decide the reward. It is the CPU-scale testbed for the
gaze: an encoder that looks everywhere sees mostly clutter.

API shape: the same as a GPU-batched ManiSkill env (torch tensors with a leading ``num_envs``
axis, partial resets through ``reset(options={"env_idx": ...})``, no autoreset), so RLlib sees it
through the same ``BatchedEnvBridge`` as ManiSkill, and it runs on CPU or GPU (``device``).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

_AGENT_RGB = (220, 40, 40)
_TARGET_RGB = (40, 200, 60)


class ClutterEnv:
    """Batched "reach the target among distractors" task (ManiSkill's batched-env API).

    Observation: ``(N, S, S, 3)`` uint8 images (``S = image_size``); with ``include_state`` a Dict
    ``{"rgb": (N, S, S, 3), "state": (N, 2)}`` where state is the agent's own position.
    Action: ``(N, 2)`` in [-1, 1], the agent's velocity. Reward: ``1 - tanh(5 * distance)`` plus
    ``10 x`` the distance closed this step, so staying on the target pays until ``max_episode_steps`` truncates the episode. Success
    is distance < ``success_radius``; with ``terminate_on_success`` it also ends the episode.
    ``info["success"]`` is a ``(N,)`` bool tensor. All outputs are torch tensors on ``device``.
    """

    def __init__(self, num_envs: int = 1, *, image_size: int = 64, num_distractors: int = 6,
                 max_episode_steps: int = 50, include_state: bool = False, step_size: float = 0.08,
                 success_radius: float = 0.08, terminate_on_success: bool = False,
                 device: str = "cpu", seed: int | None = None):
        if num_envs < 1:
            raise ValueError(f"num_envs={num_envs!r}: must be >= 1")
        if image_size < 16:
            raise ValueError(f"image_size={image_size!r}: must be >= 16")
        if num_distractors < 0:
            raise ValueError(f"num_distractors={num_distractors!r}: must be >= 0")
        if max_episode_steps < 1:
            raise ValueError(f"max_episode_steps={max_episode_steps!r}: must be >= 1")
        self.num_envs = num_envs
        self.image_size, self.num_distractors = image_size, num_distractors
        self.max_episode_steps, self.include_state = max_episode_steps, include_state
        self.step_size, self.success_radius = step_size, success_radius
        self.terminate_on_success = terminate_on_success
        self.device = torch.device(device)
        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(seed if seed is not None else int(np.random.SeedSequence().entropy % 2**63))

        rgb = gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.single_observation_space = (
            gym.spaces.Dict({"rgb": rgb, "state": gym.spaces.Box(0.0, 1.0, (2,), np.float32)})
            if include_state else rgb)
        self.single_action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

        n, d = num_envs, num_distractors
        self.agent = torch.zeros(n, 2, device=self.device)
        self.target = torch.zeros(n, 2, device=self.device)
        self.distractors = torch.zeros(n, d, 2, device=self.device)
        self.velocities = torch.zeros(n, d, 2, device=self.device)
        self.distractor_is_green = torch.zeros(n, d, dtype=torch.bool, device=self.device)
        self.background = torch.zeros(n, image_size, image_size, 3, dtype=torch.uint8, device=self.device)
        self.elapsed = torch.zeros(n, dtype=torch.long, device=self.device)
        self._distance = torch.zeros(n, device=self.device)
        coords = (torch.arange(image_size, device=self.device, dtype=torch.float32) + 0.5) / image_size
        self._ys, self._xs = coords.view(1, -1, 1), coords.view(1, 1, -1)
        self._half = 0.06  # object half-size, in units of the image side

    # --- batched-env API (as ManiSkill's) --------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Reset the sub-envs in ``options["env_idx"]`` (default: all); observations of all sub-envs."""
        if seed is not None:
            self._gen.manual_seed(seed)
        idx = (options or {}).get("env_idx")
        idx = torch.arange(self.num_envs, device=self.device) if idx is None else torch.as_tensor(idx, device=self.device)
        self._reset_envs(idx.long().reshape(-1))
        return self._observe(), {}

    def step(self, actions):
        actions = torch.as_tensor(actions, dtype=torch.float32, device=self.device).clamp(-1, 1)
        self.agent = (self.agent + self.step_size * actions).clamp(self._half, 1 - self._half)
        self.distractors = self.distractors + self.velocities
        bounced = (self.distractors < self._half) | (self.distractors > 1 - self._half)
        self.velocities = torch.where(bounced, -self.velocities, self.velocities)
        self.distractors = self.distractors.clamp(self._half, 1 - self._half)
        self.elapsed += 1

        distance = (self.agent - self.target).norm(dim=-1)
        # Closeness plus progress: the progress term gives every step a signal PPO can use at
        # ppo_rgb's short horizon (gamma 0.8).
        reward = 1.0 - torch.tanh(5.0 * distance) + 10.0 * (self._distance - distance)
        self._distance = distance
        success = distance < self.success_radius
        terminated = success.clone() if self.terminate_on_success else torch.zeros_like(success)
        truncated = (self.elapsed >= self.max_episode_steps) & ~terminated
        return self._observe(), reward, terminated, truncated, {"success": success}

    # --- internals --------------------------------------------------------------------------------
    def _rand(self, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=self._gen, device=self.device)

    def _reset_envs(self, idx: torch.Tensor) -> None:
        n, d, s = idx.numel(), self.num_distractors, self.image_size
        lo, span = self._half, 1 - 2 * self._half
        self.agent[idx] = lo + span * self._rand(n, 2)
        # Target at least 0.3 away from the agent so no episode starts solved.
        target = lo + span * self._rand(n, 2)
        for _ in range(8):
            close = (target - self.agent[idx]).norm(dim=-1) < 0.3
            if not close.any():
                break
            target[close] = lo + span * self._rand(int(close.sum()), 2)
        self.target[idx] = target
        self.distractors[idx] = lo + span * self._rand(n, d, 2)
        angle = 2 * np.pi * self._rand(n, d)
        self.velocities[idx] = 0.02 * torch.stack([angle.cos(), angle.sin()], -1)
        self.distractor_is_green[idx] = self._rand(n, d) < 0.5
        # Low-contrast noise texture in a per-episode hue.
        base = 60 + 60 * self._rand(n, 1, 1, 3)
        self.background[idx] = (base + 40 * self._rand(n, s, s, 1)).to(torch.uint8)
        self.elapsed[idx] = 0
        self._distance[idx] = (self.agent[idx] - self.target[idx]).norm(dim=-1)

    def _square(self, centre: torch.Tensor, hollow: torch.Tensor) -> torch.Tensor:
        """``(N, S, S)`` bool mask of a square per env at ``centre (N, 2)``; ring if ``hollow (N,)``."""
        dx = (self._xs - centre[:, 0].view(-1, 1, 1)).abs()
        dy = (self._ys - centre[:, 1].view(-1, 1, 1)).abs()
        outer = torch.maximum(dx, dy) <= self._half
        inner = torch.maximum(dx, dy) <= self._half * 0.5
        return outer & ~(inner & hollow.view(-1, 1, 1))

    def _observe(self):
        img = self.background.clone()
        n = self.num_envs
        green = torch.tensor(_TARGET_RGB, dtype=torch.uint8, device=self.device)
        red = torch.tensor(_AGENT_RGB, dtype=torch.uint8, device=self.device)
        yes, no = torch.ones(n, dtype=torch.bool, device=self.device), torch.zeros(n, dtype=torch.bool, device=self.device)
        for j in range(self.num_distractors):
            is_green = self.distractor_is_green[:, j]
            # Green distractors are filled (target is hollow); red ones hollow (agent is filled).
            mask = self._square(self.distractors[:, j], hollow=~is_green)
            colour = torch.where(is_green.view(-1, 1), green, red).view(n, 1, 1, 3)
            img = torch.where(mask.unsqueeze(-1), colour, img)
        img = torch.where(self._square(self.target, yes).unsqueeze(-1), green, img)
        img = torch.where(self._square(self.agent, no).unsqueeze(-1), red, img)
        if self.include_state:
            return {"rgb": img, "state": self.agent.clone()}
        return img
