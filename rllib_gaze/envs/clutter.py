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

import math
import os

import gymnasium as gym
import numpy as np
import torch

REWARDS = ("progress", "closeness")
MOTIONS = ("drift", "still")
# Where agent and target live (x0, y0, x1, y1 in image coordinates [0, 1]); distractors are placed
# outside that box. "none": anywhere, distractors too. "centre": the paper's tabletop, the task
# objects around the image centre with clutter around them; "corner": the same box moved off the
# centre, the control that tells a central fovea's gain from a gain of narrowing at all.
WORKSPACES = {"none": (0.0, 0.0, 1.0, 1.0), "centre": (0.25, 0.25, 0.75, 0.75), "corner": (0.5, 0.5, 1.0, 1.0)}

_AGENT_RGB = (220, 40, 40)
_TARGET_RGB = (40, 200, 60)
_SIGNAL_RGB = (250, 240, 60)   # the target's colour at contact when it signals closeness


def _closeness(distance: torch.Tensor) -> torch.Tensor:
    """``1 - tanh(5 * distance)``: what the closeness reward pays and what ``target_signal`` shows."""
    return 1.0 - torch.tanh(5.0 * distance)


class ClutterEnv:
    """Batched "reach the target among distractors" task (ManiSkill's batched-env API).

    Observation: ``(N, S, S, 3)`` uint8 images (``S = image_size``); with ``include_state`` a Dict
    ``{"rgb": (N, S, S, 3), "state": (N, 2)}`` where state is the agent's own position. With
    ``expose_target`` the Dict also holds ``"target": (N, 2)``, the target's centre in image
    coordinates ``[0, 1]`` (x along the width): privileged information that no policy network
    reads; only the oracle gaze and the learner's gaze-to-target metric use it.
    Action: ``(N, 2)`` in [-1, 1], the agent's velocity. Reward (``reward``): ``"progress"``:
    ``1 - tanh(5 * distance)`` plus ``10 x`` the distance closed this step; ``"closeness"``:
    ``1 - tanh(5 * distance)`` alone, so a state's return is mostly a function of where the agent
    is relative to the target (what the contrastive labels need). Staying on the target pays until
    ``max_episode_steps`` truncates the episode. Success is distance < ``success_radius``; with
    ``terminate_on_success`` it also ends the episode. ``info["success"]`` is a ``(N,)`` bool
    tensor. All outputs are torch tensors on ``device``.

    Scenes (``MOTIONS``, ``WORKSPACES``): ``distractor_motion="drift"`` moves every distractor each
    step (bouncing off the edges); ``"still"`` places them once per episode and leaves them, as
    ManiSkill's cluttered scenes do. ``workspace`` confines agent and target to a box (the agent
    cannot leave it) and places distractors outside it; the target then starts at least
    ``min(0.3, 0.6 x the box's free side)`` from the agent.

    ``target_signal`` makes the outcome visible at one place: the target's colour shows the agent's
    closeness ``1 - tanh(5 * distance)`` (what the closeness reward pays), from its usual green at
    no closeness to yellow at contact. It is the control diagnostic of docs/results.md: a state's
    return can then be read off the target alone, as in the mechanism bench's ``moving`` family,
    instead of only from the relation between agent and target.

    ``fail_at_step`` and ``fail_once_file`` are for tests only (0, the default, turns them off):
    ``step()`` raises RuntimeError at that many steps of this env object, to exercise RLlib's env
    runner restarts; with ``fail_once_file`` only while that file does not exist (it is created
    then), so the fault happens once, not again in the restarted runner.
    """

    def __init__(self, num_envs: int = 1, *, image_size: int = 64, num_distractors: int = 6,
                 max_episode_steps: int = 50, include_state: bool = False, step_size: float = 0.08,
                 success_radius: float = 0.08, terminate_on_success: bool = False,
                 reward: str = "progress", expose_target: bool = False, target_signal: bool = False,
                 distractor_motion: str = "drift", workspace: str = "none", device: str = "cpu",
                 seed: int | None = None, fail_at_step: int = 0,
                 fail_once_file: str | None = None):
        if num_envs < 1:
            raise ValueError(f"num_envs={num_envs!r}: must be >= 1")
        if image_size < 16:
            raise ValueError(f"image_size={image_size!r}: must be >= 16")
        if num_distractors < 0:
            raise ValueError(f"num_distractors={num_distractors!r}: must be >= 0")
        if max_episode_steps < 1:
            raise ValueError(f"max_episode_steps={max_episode_steps!r}: must be >= 1")
        if reward not in REWARDS:
            raise ValueError(f"reward={reward!r}: allowed values are {REWARDS}")
        if distractor_motion not in MOTIONS:
            raise ValueError(f"distractor_motion={distractor_motion!r}: allowed values are {MOTIONS}")
        if workspace not in WORKSPACES:
            raise ValueError(f"workspace={workspace!r}: allowed values are {list(WORKSPACES)}")
        if fail_at_step < 0:
            raise ValueError(f"fail_at_step={fail_at_step!r}: must be >= 0 (0: off)")
        self.num_envs = num_envs
        self.fail_at_step, self.fail_once_file, self._steps_taken = fail_at_step, fail_once_file, 0
        self.reward, self.expose_target, self.target_signal = reward, expose_target, target_signal
        self.image_size, self.num_distractors = image_size, num_distractors
        self.max_episode_steps, self.include_state = max_episode_steps, include_state
        self.step_size, self.success_radius = step_size, success_radius
        self.terminate_on_success = terminate_on_success
        self.distractor_motion, self.workspace = distractor_motion, workspace
        self.device = torch.device(device)
        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(seed if seed is not None else int(np.random.SeedSequence().entropy % 2**63))

        rgb = gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        spaces = {"rgb": rgb}
        if include_state:
            spaces["state"] = gym.spaces.Box(0.0, 1.0, (2,), np.float32)
        if expose_target:
            spaces["target"] = gym.spaces.Box(0.0, 1.0, (2,), np.float32)
        self.single_observation_space = gym.spaces.Dict(spaces) if len(spaces) > 1 else rgb
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
        self._half = 0.06  # object half-size, in units of the image side
        x0, y0, x1, y1 = WORKSPACES[workspace]
        # the box's centres' range: an object inside it lies wholly inside the box (and the image)
        self._box_lo = torch.tensor([x0, y0], device=self.device) + self._half
        self._box_hi = torch.tensor([x1, y1], device=self.device) - self._half
        self._min_start_distance = min(0.3, 0.6 * float((self._box_hi - self._box_lo).min()))
        # Pixel offsets around an object's centre pixel that can lie inside it: a (2r+1)^2 patch.
        r = int(np.ceil(self._half * image_size)) + 1
        oy, ox = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
        self._offsets_x = ox.reshape(1, -1).to(self.device)
        self._offsets_y = oy.reshape(1, -1).to(self.device)

    # --- batched-env API (as ManiSkill's) --------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Reset the sub-envs in ``options["env_idx"]`` (default: all); observations of all sub-envs."""
        if seed is not None:
            self._gen.manual_seed(seed)
        idx = (options or {}).get("env_idx")
        idx = (torch.arange(self.num_envs, device=self.device) if idx is None
               else torch.as_tensor(idx, device=self.device))
        self._reset_envs(idx.long().reshape(-1))
        return self._observe(), {}

    def step(self, actions):
        self._steps_taken += 1
        if self._steps_taken == self.fail_at_step and not (self.fail_once_file and os.path.exists(self.fail_once_file)):
            if self.fail_once_file:
                open(self.fail_once_file, "w").close()
            raise RuntimeError(f"clutter env: fail_at_step={self.fail_at_step} reached (a test's injected fault)")
        actions = torch.as_tensor(actions, dtype=torch.float32, device=self.device).clamp(-1, 1)
        self.agent = torch.maximum(torch.minimum(self.agent + self.step_size * actions, self._box_hi), self._box_lo)
        self.distractors = self.distractors + self.velocities
        bounced = (self.distractors < self._half) | (self.distractors > 1 - self._half)
        self.velocities = torch.where(bounced, -self.velocities, self.velocities)
        self.distractors = self.distractors.clamp(self._half, 1 - self._half)
        self.elapsed += 1

        distance = (self.agent - self.target).norm(dim=-1)
        reward = _closeness(distance)
        if self.reward == "progress":
            # the progress term gives every step a signal PPO can use at ppo_rgb's short horizon
            # (gamma 0.8), but makes the return depend on the action more than on the state
            reward = reward + 10.0 * (self._distance - distance)
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
        box_lo, box_span = self._box_lo, self._box_hi - self._box_lo
        self.agent[idx] = box_lo + box_span * self._rand(n, 2)
        # Target away from the agent so no episode starts solved.
        target = box_lo + box_span * self._rand(n, 2)
        # a workspace box leaves less room, so more rounds (8 on the whole image, as first built)
        for _ in range(8 if self.workspace == "none" else 32):
            close = (target - self.agent[idx]).norm(dim=-1) < self._min_start_distance
            if not close.any():
                break
            target[close] = box_lo + box_span * self._rand(int(close.sum()), 2)
        self.target[idx] = target
        distractors = lo + span * self._rand(n, d, 2)
        if self.workspace != "none":
            # redraw any distractor that overlaps the box (a few rounds suffice: the box is at most a
            # quarter of the image); one still inside after that is pushed out along its nearer edge
            for _ in range(16):
                inside = self._overlaps_box(distractors)
                if not inside.any():
                    break
                distractors[inside] = lo + span * self._rand(int(inside.sum()), 2)
            distractors = self._push_out_of_box(distractors)
        self.distractors[idx] = distractors
        angle = 2 * np.pi * self._rand(n, d)
        speed = 0.02 if self.distractor_motion == "drift" else 0.0
        self.velocities[idx] = speed * torch.stack([angle.cos(), angle.sin()], -1)
        self.distractor_is_green[idx] = self._rand(n, d) < 0.5
        # Low-contrast noise texture in a per-episode hue.
        base = 60 + 60 * self._rand(n, 1, 1, 3)
        self.background[idx] = (base + 40 * self._rand(n, s, s, 1)).to(torch.uint8)
        self.elapsed[idx] = 0
        self._distance[idx] = (self.agent[idx] - self.target[idx]).norm(dim=-1)

    def _overlaps_box(self, centres: torch.Tensor) -> torch.Tensor:
        """``(..., 2)`` object centres -> ``(...)`` whether the object overlaps the workspace box."""
        lo, hi = self._box_lo - 2 * self._half, self._box_hi + 2 * self._half
        return ((centres > lo) & (centres < hi)).all(-1)

    def _push_out_of_box(self, centres: torch.Tensor) -> torch.Tensor:
        """Objects that overlap the box moved just outside it, across the edge nearest to them."""
        inside = self._overlaps_box(centres)
        if not inside.any():
            return centres
        lo, hi = self._box_lo - 2 * self._half, self._box_hi + 2 * self._half
        # distance to each of the four edges, outward: (..., 4) = left, top, right, bottom
        gaps = torch.cat([centres - lo, hi - centres], -1)
        bounds = torch.cat([lo, hi])
        blocked = (bounds < self._half) | (bounds > 1 - self._half)   # an edge on the image's border
        edge = gaps.masked_fill(blocked, math.inf).argmin(-1)
        moved = centres.clone()
        for k, (axis, bound) in enumerate(((0, lo[0]), (1, lo[1]), (0, hi[0]), (1, hi[1]))):
            rows = inside & (edge == k)
            moved[..., axis] = torch.where(rows, bound.expand_as(moved[..., axis]), moved[..., axis])
        return moved.clamp(self._half, 1 - self._half)

    def _paint_square(self, img: torch.Tensor, centre: torch.Tensor, hollow: torch.Tensor,
                      colour: torch.Tensor) -> None:
        """Paint one square per env into ``img (N, S*S, 3)`` in place: centre ``(N, 2)`` in [0, 1],
        a ring where ``hollow (N,)``, ``colour (N, 3)``.

        Only the few pixels around each centre are touched (a scatter, not a full-image pass); a
        pixel belongs to the square when its centre lies within the half-size, as in a dense test.
        """
        s = self.image_size
        px = (centre[:, 0] * s).floor().long().view(-1, 1) + self._offsets_x      # (N, P)
        py = (centre[:, 1] * s).floor().long().view(-1, 1) + self._offsets_y
        dx = ((px.float() + 0.5) / s - centre[:, 0:1]).abs()
        dy = ((py.float() + 0.5) / s - centre[:, 1:2]).abs()
        extent = torch.maximum(dx, dy)
        mask = (extent <= self._half) & ~((extent <= self._half * 0.5) & hollow.view(-1, 1))
        mask &= (px >= 0) & (px < s) & (py >= 0) & (py < s)
        env_idx, slot = mask.nonzero(as_tuple=True)
        img[env_idx, py[env_idx, slot] * s + px[env_idx, slot]] = colour[env_idx]

    def _observe(self):
        n, s = self.num_envs, self.image_size
        img = self.background.clone().view(n, s * s, 3)
        green = torch.tensor(_TARGET_RGB, dtype=torch.uint8, device=self.device).expand(n, 3)
        red = torch.tensor(_AGENT_RGB, dtype=torch.uint8, device=self.device).expand(n, 3)
        yes = torch.ones(n, dtype=torch.bool, device=self.device)
        no = torch.zeros(n, dtype=torch.bool, device=self.device)
        for j in range(self.num_distractors):
            is_green = self.distractor_is_green[:, j]
            # Green distractors are filled (target is hollow); red ones hollow (agent is filled).
            self._paint_square(img, self.distractors[:, j], ~is_green, torch.where(is_green.view(-1, 1), green, red))
        target_colour = green
        if self.target_signal:
            closeness = _closeness((self.agent - self.target).norm(dim=-1)).view(-1, 1)
            signal = torch.tensor(_SIGNAL_RGB, dtype=torch.float32, device=self.device)
            target_colour = (green.float() + closeness * (signal - green.float())).round().to(torch.uint8)
        self._paint_square(img, self.target, yes, target_colour)
        self._paint_square(img, self.agent, no, red)
        img = img.view(n, s, s, 3)
        if not (self.include_state or self.expose_target):
            return img
        obs = {"rgb": img}
        if self.include_state:
            obs["state"] = self.agent.clone()
        if self.expose_target:
            obs["target"] = self.target.clone()
        return obs
