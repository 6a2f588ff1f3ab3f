"""See where a trained policy looks: deterministic rollouts with the gaze drawn on every frame.

    python -m rllib_gaze.visualize CHECKPOINT [--episodes 4] [--out gaze_vis] [--env clutter|maniskill]
                                              [--env-config '{"image_size": 64}'] [--scale 4] [--fps 10]

CHECKPOINT is an RLlib algorithm checkpoint (e.g. a Tune trial's ``checkpoint_000010``); the env
and its env_config default to the ones the checkpoint was trained on. Runs ``--episodes`` episodes
side by side (as evaluation does: no early termination, actions = the policy's mean) and writes
into ``--out``: ``episode_<k>.gif`` per episode, ``contact_sheet.png`` (one row per episode,
evenly spaced steps) and ``episodes.json`` (success and return of each episode). Works on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from rllib_gaze.envs import BatchedEnvBridge
    from rllib_gaze.module import GazePPOModule

MODULE_PATH = os.path.join("learner_group", "learner", "rl_module", "default_policy")
SHEET_COLUMNS = 8


def load_checkpoint(path: str) -> tuple[GazePPOModule, str, dict]:
    """``(module, env_name, env_config)`` of an algorithm checkpoint, failing with what it expected."""
    module_dir = os.path.join(path, MODULE_PATH)
    ctor_file = os.path.join(path, "class_and_ctor_args.pkl")
    if not (os.path.isdir(module_dir) and os.path.exists(ctor_file)):
        raise FileNotFoundError(f"{path!r} is not an RLlib algorithm checkpoint (expected {MODULE_PATH}/ and "
                                "class_and_ctor_args.pkl in it, e.g. a Tune trial's checkpoint_000010)")
    from ray.rllib.core.rl_module.rl_module import RLModule

    import rllib_gaze  # noqa: F401  (registers the envs the checkpoint names)

    with open(ctor_file, "rb") as f:
        config = pickle.load(f)["ctor_args_and_kwargs"][0][0]
    config = config if isinstance(config, dict) else config.to_dict()
    module = RLModule.from_checkpoint(module_dir)
    module.eval()
    return module, config["env"], dict(config.get("env_config") or {})


def rollout(module: GazePPOModule, env: BatchedEnvBridge,
            progress: Callable[[str], None] = print) -> tuple[list[list[np.ndarray]], list[dict]]:
    """Runs every sub-env of ``env`` (a BatchedEnvBridge with ``ignore_terminations``) for one episode
    with the policy's deterministic actions. Returns frames per episode (``(H, W, 3)`` uint8 with the
    gaze drawn) and ``{"success": bool, "return": float, "length": int}`` per episode."""
    from rllib_gaze.overlay import draw_batch

    dist_cls = module.get_inference_action_dist_cls()
    obs, _ = env.reset(seed=0)
    n = env.num_envs
    frames = [[] for _ in range(n)]
    success, returns, length = np.zeros(n, bool), np.zeros(n), np.zeros(n, int)
    done = np.zeros(n, bool)
    step = 0
    while not done.all():
        for i, image in enumerate(draw_batch(module, obs, module.model_config["gaze_floor"])):
            if not done[i]:
                frames[i].append(image)
        with torch.no_grad():
            batch = {"obs": _to_tensor(obs)}
            logits = module.forward_inference(batch)["action_dist_inputs"]
            actions = dist_cls.from_logits(logits).to_deterministic().sample().numpy()
        low, high = env.single_action_space.low, env.single_action_space.high
        obs, rewards, terminated, truncated, infos = env.step(np.clip(actions, low, high))
        live = ~done
        returns[live] += rewards[live]
        length[live] += 1
        success[live] |= np.asarray(infos.get("success", np.zeros(n, bool)), bool)[live]
        done |= terminated | truncated
        step += 1
        if step % 10 == 0 or done.all():
            progress(f"[visualize] step {step}: {int(done.sum())}/{n} episodes finished")
    episodes = [{"success": bool(s), "return": float(r), "length": int(k)} for s, r, k in zip(success, returns, length)]
    return frames, episodes


def _to_tensor(obs):
    if isinstance(obs, dict):
        return {k: torch.as_tensor(np.asarray(v)) for k, v in obs.items()}
    return torch.as_tensor(np.asarray(obs))


def write_outputs(frames: list[list[np.ndarray]], episodes: list[dict], out: str, scale: int, fps: int) -> list[str]:
    """Writes the GIFs, the contact sheet and episodes.json into ``out``; returns the paths."""
    from PIL import Image

    from rllib_gaze.overlay import enlarge, tile

    os.makedirs(out, exist_ok=True)
    paths = []
    for k, episode in enumerate(frames):
        images = [Image.fromarray(enlarge(f, scale)) for f in episode]
        path = os.path.join(out, f"episode_{k}.gif")
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        paths.append(path)
    picks = [[episode[int(j)] for j in np.linspace(0, len(episode) - 1, SHEET_COLUMNS)] for episode in frames]
    sheet = os.path.join(out, "contact_sheet.png")
    Image.fromarray(tile([im for row in picks for im in row], SHEET_COLUMNS, scale)).save(sheet)
    summary = os.path.join(out, "episodes.json")
    with open(summary, "w") as f:
        json.dump({"episodes": episodes, "success_rate": float(np.mean([e["success"] for e in episodes]))}, f, indent=1)
    return paths + [sheet, summary]


def main(argv: list[str] | None = None) -> list[str]:
    from rllib_gaze.envs import CLUTTER, MANISKILL, evaluation_env_config, make_env

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="an RLlib algorithm checkpoint directory")
    p.add_argument("--env", choices=[CLUTTER, MANISKILL], help="default: the checkpoint's env")
    p.add_argument("--env-config", type=json.loads, default=None,
                   help="JSON object merged over the checkpoint's env_config, e.g. '{\"num_distractors\": 8}'")
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--out", default="gaze_vis")
    p.add_argument("--scale", type=int, default=4, help="enlarge frames this many times (nearest)")
    p.add_argument("--fps", type=int, default=10)
    args = p.parse_args(argv)
    for flag, value, low, high in (("--episodes", args.episodes, 1, 64), ("--scale", args.scale, 1, 16),
                                   ("--fps", args.fps, 1, 60)):
        if not low <= value <= high:
            p.error(f"{flag}={value}: must be in [{low}, {high}]")
    if args.env_config is not None and not isinstance(args.env_config, dict):
        p.error(f"--env-config={args.env_config!r}: must be a JSON object")
    try:
        module, env_name, env_config = load_checkpoint(args.checkpoint)
    except FileNotFoundError as e:
        p.error(str(e))
    if module.attention_kind == "none":
        p.error(f"{args.checkpoint!r} was trained with attention='none' (plain PPO): it has no gaze to draw")
    env_name = args.env or env_name
    env_config = evaluation_env_config(env_name, {**env_config, **(args.env_config or {})})
    env = make_env(env_name, env_config, args.episodes)
    if env.single_observation_space != module.observation_space:  # another env, image size or state
        env.close()
        p.error(f"env {env_name!r} with env_config {env_config} gives observations {env.single_observation_space}, "
                f"but {args.checkpoint!r} was trained on {module.observation_space}: pick the checkpoint's env "
                "(the defaults) or one with the same observation space")
    try:
        frames, episodes = rollout(module, env)
    finally:
        env.close()
    paths = write_outputs(frames, episodes, args.out, args.scale, args.fps)
    for k, e in enumerate(episodes):
        print(f"[visualize] episode {k}: success={e['success']} return={e['return']:.2f} length={e['length']}")
    print(f"[visualize] wrote {len(paths)} files to {args.out}", file=sys.stderr)
    return paths


if __name__ == "__main__":
    main()
