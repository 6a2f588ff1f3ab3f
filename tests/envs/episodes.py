"""Test helper: the episodes a plain stepping loop sees, to compare with what RLlib records."""

from __future__ import annotations

import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.utils.spaces.space_utils import unsquash_action


def row(obs, i):
    return {k: v[i].clone() for k, v in obs.items()} if isinstance(obs, dict) else obs[i].clone()


def fingerprint(obs) -> bytes:
    if isinstance(obs, dict):
        return b"".join(np.asarray(obs[k]).tobytes() for k in sorted(obs))
    return np.asarray(obs).tobytes()


def plain_loop_episodes(env, module, seed, num_steps):
    """Step a batched env directly with same-step partial resets, choosing actions as RLlib does
    with explore=False (the module's mean, unsquashed into the action space). Returns complete
    episodes as ``{"first": obs, "last": obs, "rewards": [...]}``."""
    obs, _ = env.reset(seed=seed)
    current = [{"first": row(obs, i), "rewards": []} for i in range(env.num_envs)]
    finished = []
    for _ in range(num_steps):
        with torch.no_grad():
            inputs = module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
        mean = inputs[:, : inputs.shape[1] // 2].numpy()
        actions = np.stack([unsquash_action(a, env.single_action_space) for a in mean])
        obs, rew, term, trunc, _ = env.step(torch.as_tensor(actions))
        for i in range(env.num_envs):
            current[i]["rewards"].append(float(rew[i]))
            current[i]["last"] = row(obs, i)
        done = torch.as_tensor(term) | torch.as_tensor(trunc)
        if done.any():
            idx = done.nonzero().squeeze(1)
            obs, _ = env.reset(options={"env_idx": idx})
            for i in idx.tolist():
                finished.append(current[i])
                current[i] = {"first": row(obs, i), "rewards": []}
    return finished


def sampled_episodes(runner, num_episodes):
    """At least ``num_episodes`` complete episodes from ``runner``: ``sample(num_episodes=...)`` for the
    stock runner; for the batched runner, fragments of ``sample(num_timesteps=...)`` (its own loop; its
    ``num_episodes`` mode is the stock loop) with the chunks of each episode joined by id."""
    if type(runner) is SingleAgentEnvRunner:
        return runner.sample(num_episodes=num_episodes)
    ongoing, done = {}, []
    while len(done) < num_episodes:
        for chunk in runner.sample(num_timesteps=runner.num_envs):
            if chunk.id_ in ongoing:
                ongoing[chunk.id_].concat_episode(chunk)
            else:
                ongoing[chunk.id_] = chunk
            if chunk.is_done:
                done.append(ongoing.pop(chunk.id_))
    return done


def rllib_episodes(episodes):
    """RLlib SingleAgentEpisodes in the same form as plain_loop_episodes."""
    out = []
    for e in episodes:
        observations = e.get_observations()
        if isinstance(observations, dict):
            first = {k: v[0] for k, v in observations.items()}
            last = {k: v[-1] for k, v in observations.items()}
        else:
            first, last = observations[0], observations[-1]
        out.append({"first": first, "last": last, "rewards": [float(r) for r in e.get_rewards()]})
    return out


def summary(episodes):
    """Order-free fingerprint of complete episodes: length, rewards, first and last observation."""
    return sorted((len(e["rewards"]), tuple(np.round(e["rewards"], 5)), fingerprint(e["first"]),
                   fingerprint(e["last"])) for e in episodes)
