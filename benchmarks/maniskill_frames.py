"""Real ManiSkill3 camera frames with the task's relevant places projected into the image.

An offline "mechanism bench" for the gaze needs pixels a policy really sees together with where the
things that matter are in those pixels. ``record_maniskill`` runs a noisy scripted policy in a real
ManiSkill env (CPU physics, software Vulkan rendering) and returns a ``Recording``: the camera frames,
each relevant place's 3-D world position projected through the same camera into image coordinates,
and the dense rewards, success flags and episode bookkeeping.

Supported tasks (both scripted as "go behind the cube, opposite the goal, then push it to the goal"):

- ``PushCube-v1``: push the cube forward (+x, away from the robot) onto the red/white target.
- ``PullCube-v1``: the same in the other direction (the cube is pulled towards the robot), so the
  gripper works on the camera's side of the cube. The cube was in view in 82% of its frames against
  88% for PushCube (seed 0, 16 episodes of 50 steps): in failed episodes the hand often hides it.

Each also comes as its cluttered variant (``PushCube-v1-Clutter``, ``PullCube-v1-Clutter``: the suite's
``PAPER_CLUTTER`` visual-only objects placed once per episode, ``rllib_gaze.envs.maniskill_clutter``).

PickCube-v1 is not supported: its cube has a random yaw, and grasping it needs orientation control
that the ``pd_ee_delta_pos`` scripted policy does not have.

Note that the cube is *blue* (RGB 12, 42, 160) in both tasks; the target is red and white.

    python benchmarks/maniskill_frames.py [--task PushCube-v1] [--episodes 16] [--image-size 128] ...

prints the success rate and timing of one recording.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

# The task -> its relevant places, in the order of ``Recording.places``'s second axis.
PLACE_NAMES: dict[str, tuple[str, ...]] = {
    "PushCube-v1": ("cube", "goal"),
    "PullCube-v1": ("cube", "goal"),
}
CAMERA = "base_camera"  # the one sensor camera of ManiSkill's tabletop tasks
CONTROL_MODE = "pd_ee_delta_pos"  # the scripted policy steers the gripper's position in Cartesian space
# Bump when the recording changes for the same arguments (policy, env settings), so that caches go stale.
CACHE_VERSION = 2
CLUTTER_SUFFIX = "-Clutter"
TASKS = tuple(PLACE_NAMES) + tuple(task + CLUTTER_SUFFIX for task in PLACE_NAMES)

# Scripted policy geometry (metres). The cube's half size is 0.02; the gripper's tool centre point
# (TCP) sits between the fingertips, so at z = CUBE_HEIGHT it pushes on the cube's middle.
STANDOFF = 0.05  # how far behind the cube (opposite the goal) the gripper lines up before pushing
CUBE_HEIGHT = 0.02
CLEARANCE = 0.08  # TCP height while travelling, above the cube's top (0.04)
ACTION_SCALE = 0.1  # pd_ee_delta_pos maps an action of 1 to a 0.1 m step of the target
AIM_ERROR = 0.03  # per-episode lateral aim error (std, metres) per unit of (scaled) noise: misses the cube's centre
# Per-task scale of ``noise`` so that noise=1 gives about half successful episodes: measured over
# seeds 0-3 x 16 episodes of 50 steps, PushCube 31/64 (48%) and PullCube 30/64 (47%); at scale 1 the push
# succeeded in 43/64 (67%).
NOISE_SCALE = {"PushCube-v1": 1.5, "PullCube-v1": 1.25}


@dataclass
class Recording:
    """Frames of ``E`` episodes, ``N`` steps in all, with ``P`` places per frame.

    Row ``t`` is one step: the frame the policy saw before acting, where the places were in it, and
    what the env returned after the action.

    images:      (N, H, W, 3) uint8, the camera frame observed at step t (H = W = image_size).
    places:      (N, P, 2) float32, each place's position in image coordinates in [0, 1], x to the
                 right and y down (pixel column ``floor(x * W)``, row ``floor(y * H)``), at step t;
                 outside [0, 1] when off-screen, NaN behind the camera.
    place_names: (P,) names of the places, e.g. ("cube", "goal").
    rewards:     (N,) float32, the env's dense reward (``normalized_dense``, in [0, 1]) after the action.
    episode:     (N,) int64 episode index, 0 .. E-1, non-decreasing.
    step:        (N,) int64 step within the episode, 0 .. length-1.
    terminated:  (N,) bool, the env's ``terminated`` after the action (True only on an episode's last row).
    success:     (N,) bool, the env's ``info["success"]`` after the action.
    """

    images: np.ndarray
    places: np.ndarray
    place_names: tuple[str, ...]
    rewards: np.ndarray
    episode: np.ndarray
    step: np.ndarray
    terminated: np.ndarray
    success: np.ndarray

    def episode_success(self) -> np.ndarray:
        """(E,) bool: whether each episode succeeded at any step."""
        return np.array([self.success[self.episode == e].any() for e in np.unique(self.episode)])


def project(points: np.ndarray, intrinsic_cv: np.ndarray, extrinsic_cv: np.ndarray, width: int,
            height: int) -> np.ndarray:
    """World points (P, 3) -> image coordinates (P, 2) in [0, 1] (x right, y down) through an OpenCV
    camera: ``intrinsic_cv`` (3, 3), ``extrinsic_cv`` (3, 4) world -> camera. NaN behind the camera."""
    camera = extrinsic_cv[:, :3] @ points.T + extrinsic_cv[:, 3:]  # (3, P); OpenCV: z looks forward
    pixels = intrinsic_cv @ camera
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = (pixels[:2] / pixels[2]).T  # (P, 2) pixel units; SAPIEN's cx = W/2 puts pixel i on [i, i+1)
    uv[camera[2] <= 0] = np.nan
    return (uv / np.array([width, height])).astype(np.float32)


def _numpy(x) -> np.ndarray:
    return x.cpu().numpy() if hasattr(x, "cpu") else np.asarray(x)


class ScriptedPusher:
    """Goes behind the cube (opposite the goal), lowers the closed gripper to the cube's middle and
    pushes the cube onto the goal: PushCube pushes away from the robot, PullCube towards it.

    What makes it fail some of the time (``noise``, already scaled per task, scales both; at 0 it is
    an expert that succeeds in about 12 steps):
    - a per-episode aim error across the push direction (std ``AIM_ERROR * noise`` metres): a large
      one misses the cube or spins it off the push line, and the hand then often hides the cube from
      the camera;
    - Gaussian noise on every action (std ``0.3 * noise`` in the normalized action units).
    """

    def __init__(self, rng: np.random.Generator, noise: float):
        self.rng, self.noise = rng, noise

    def start_episode(self) -> None:
        self.phase = "travel"
        self.aim_error = self.rng.normal(0.0, AIM_ERROR * self.noise)
        self.direction = None  # the push direction, fixed at the start (the cube moves while pushed)

    def act(self, tcp: np.ndarray, cube: np.ndarray, goal: np.ndarray) -> np.ndarray:
        """(3,) world positions -> (4,) action: xyz delta in [-1, 1], then the gripper (-1 closed)."""
        if self.direction is None:
            push = goal[:2] - cube[:2]
            self.direction = push / max(np.linalg.norm(push), 1e-6)
            side = np.array([-self.direction[1], self.direction[0]])
            # Line up on the (mis-aimed) line through the cube towards the goal.
            self.line_offset = side * self.aim_error
        behind = cube[:2] - self.direction * STANDOFF + self.line_offset
        if self.phase == "travel":  # above the push start, so the fingers pass over the cube
            target = np.array([*behind, CLEARANCE])
            if np.linalg.norm(tcp[:2] - behind) < 0.01:
                self.phase = "descend"
        if self.phase == "descend":
            target = np.array([*behind, CUBE_HEIGHT])
            if tcp[2] < CUBE_HEIGHT + 0.01:
                self.phase = "push"
        if self.phase == "push":
            # Aim past the goal's centre so the cube ends well inside the target, not at its rim.
            end = goal[:2] + self.direction * 0.02 + self.line_offset
            target = np.array([*end, CUBE_HEIGHT])
        delta = (target - tcp) / ACTION_SCALE
        delta += self.rng.normal(0.0, 0.3 * self.noise, size=3)
        return np.append(np.clip(delta, -1.0, 1.0), -1.0).astype(np.float32)


def base_task(task: str) -> str:
    """The ManiSkill task of ``task`` (a cluttered variant's base)."""
    return task.removesuffix(CLUTTER_SUFFIX)


def _make_env(task: str, image_size: int, max_steps: int):
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401  (registers the tasks)

    extra = {}
    if task.endswith(CLUTTER_SUFFIX):
        from rllib_gaze.envs.maniskill_clutter import cluttered_env_id
        from rllib_gaze.suite import PAPER_CLUTTER

        task, extra = cluttered_env_id(base_task(task)), {"clutter": PAPER_CLUTTER}
    return gym.make(task, obs_mode="rgb", num_envs=1, sim_backend="physx_cpu", render_backend="cpu",
                    control_mode=CONTROL_MODE, reward_mode="normalized_dense", max_episode_steps=max_steps,
                    sensor_configs=dict(width=image_size, height=image_size), **extra)


def _places(env, obs: dict, image_size: int) -> np.ndarray:
    """(P, 2) image coordinates of the task's places in the frame ``obs`` holds."""
    scene = env.unwrapped
    world = np.stack([_numpy(scene.obj.pose.p)[0], _numpy(scene.goal_region.pose.p)[0]])
    param = obs["sensor_param"][CAMERA]
    return project(world, _numpy(param["intrinsic_cv"])[0], _numpy(param["extrinsic_cv"])[0],
                   image_size, image_size)


def _record(task: str, episodes: int, seed: int, image_size: int, max_steps: int, noise: float,
            full_episodes: bool) -> Recording:
    import torch

    env = _make_env(task, image_size, max_steps)
    rng = np.random.default_rng(seed)
    policy = ScriptedPusher(rng, noise * NOISE_SCALE[base_task(task)])
    rows: dict[str, list] = {f.name: [] for f in fields(Recording) if f.name != "place_names"}
    scene, start, successes = env.unwrapped, time.perf_counter(), 0
    try:
        for episode in range(episodes):
            # An explicit seed per episode: unseeded ManiSkill resets would depend on earlier episodes.
            obs, _ = env.reset(seed=int(rng.integers(2**31)))
            policy.start_episode()
            for step in range(max_steps):
                rows["images"].append(_numpy(obs["sensor_data"][CAMERA]["rgb"])[0])
                rows["places"].append(_places(env, obs, image_size))
                action = policy.act(_numpy(scene.agent.tcp.pose.p)[0], _numpy(scene.obj.pose.p)[0],
                                    _numpy(scene.goal_region.pose.p)[0])
                obs, reward, terminated, truncated, info = env.step(torch.from_numpy(action)[None])
                rows["rewards"].append(float(_numpy(reward).reshape(-1)[0]))
                rows["episode"].append(episode)
                rows["step"].append(step)
                rows["terminated"].append(bool(_numpy(terminated).reshape(-1)[0]))
                rows["success"].append(bool(_numpy(info["success"]).reshape(-1)[0]))
                if (rows["terminated"][-1] and not full_episodes) or bool(_numpy(truncated).reshape(-1)[0]):
                    break
            successes += any(rows["success"][-step - 1:])
            if (episode + 1) % max(1, episodes // 8) == 0 or episode + 1 == episodes:
                elapsed = time.perf_counter() - start
                print(f"[maniskill_frames] {task}: {episode + 1}/{episodes} episodes, {successes} successful, "
                      f"{len(rows['step'])} steps in {elapsed:.0f} s ({len(rows['step']) / elapsed:.0f} steps/s)",
                      file=sys.stderr, flush=True)
    finally:
        env.close()
    return Recording(
        images=np.stack(rows["images"]).astype(np.uint8),
        places=np.stack(rows["places"]).astype(np.float32),
        place_names=PLACE_NAMES[base_task(task)],
        rewards=np.array(rows["rewards"], dtype=np.float32),
        episode=np.array(rows["episode"], dtype=np.int64),
        step=np.array(rows["step"], dtype=np.int64),
        terminated=np.array(rows["terminated"], dtype=bool),
        success=np.array(rows["success"], dtype=bool),
    )


def record_maniskill(task: str = "PushCube-v1", episodes: int = 16, seed: int = 0, image_size: int = 128,
                     max_steps: int = 50, noise: float = 1.0, cache_dir: str | None = None,
                     full_episodes: bool = False) -> Recording:
    """Records ``episodes`` episodes of a noisy scripted policy in the real ManiSkill ``task``.

    Each episode runs until the env terminates (success) or ``max_steps`` steps; with
    ``full_episodes`` every episode runs ``max_steps`` steps, success or not (ManiSkill's
    ``ignore_terminations``, as in ppo_rgb's evaluation), so that an episode's summed reward does not
    punish an early success. ``seed`` fixes the
    episodes (env resets and policy noise). ``noise`` scales the policy's mistakes (see
    ``ScriptedPusher``): at 1 about half the episodes succeed, in either task. Rendering on the CPU runs at
    about 20-30 steps/s, so 16 episodes of 50 steps take about a minute.

    With ``cache_dir``, the recording is saved there as an .npz named after all arguments and loaded
    from it (well under a second) when called again with the same ones.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not supported; supported tasks: {sorted(TASKS)}")
    if episodes < 1 or max_steps < 1 or image_size < 16 or noise < 0:
        raise ValueError(f"need episodes >= 1, max_steps >= 1, image_size >= 16 and noise >= 0; got "
                         f"episodes={episodes}, max_steps={max_steps}, image_size={image_size}, noise={noise}")
    path = None
    if cache_dir is not None:
        key = (f"{task}-e{episodes}-s{seed}-px{image_size}-t{max_steps}-n{noise:g}{'-full' if full_episodes else ''}"
               f"-v{CACHE_VERSION}")
        path = Path(cache_dir) / f"{key}.npz"
        if path.exists():
            with np.load(path) as saved:
                arrays = {name: saved[name] for name in saved.files if name != "place_names"}
                return Recording(place_names=tuple(str(n) for n in saved["place_names"]), **arrays)
    recording = _record(task, episodes, seed, image_size, max_steps, noise, full_episodes)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file and rename, so an interrupted save never leaves a truncated cache.
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
            np.savez(tmp, **{f.name: np.asarray(getattr(recording, f.name)) for f in fields(Recording)})
        os.replace(tmp.name, path)
    return recording


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="PushCube-v1", choices=TASKS)
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--full-episodes", action="store_true", help="run every episode to --max-steps")
    args = parser.parse_args()
    start = time.perf_counter()
    recording = record_maniskill(args.task, args.episodes, args.seed, args.image_size, args.max_steps,
                                 args.noise, args.cache_dir, args.full_episodes)
    wall = time.perf_counter() - start
    success = recording.episode_success()
    print(f"{args.task}: {success.sum()}/{len(success)} episodes successful ({success.mean():.0%}), "
          f"{len(recording.step)} frames, {wall:.1f} s wall")


if __name__ == "__main__":
    main()
