"""BatchedEnvBridge: next-step autoreset, numpy out, and what RLlib's env runner makes of it."""

import numpy as np
import pytest
import torch

from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.utils.spaces.space_utils import unsquash_action

from rllib_gaze import GazePPOConfig
from rllib_gaze.envs import BatchedEnvBridge, make_clutter
from rllib_gaze.envs.clutter import ClutterEnv


def test_next_step_autoreset_ignores_the_action_and_resets_only_finished_envs():
    bridge = BatchedEnvBridge(ClutterEnv(2, image_size=24, max_episode_steps=3, seed=0))
    obs, info = bridge.reset()
    assert isinstance(obs, np.ndarray) and obs.dtype == np.uint8 and info["success"].shape == (2,)
    for t in range(1, 4):
        _, rew, term, trunc, info = bridge.step(np.zeros((2, 2), np.float32))
        assert trunc.all() == (t == 3) and not term.any() and rew.dtype == np.float32
    before = bridge.env.agent.clone()
    obs, rew, term, trunc, info = bridge.step(np.ones((2, 2), np.float32))
    assert np.all(rew == 0) and not term.any() and not trunc.any() and not info["success"].any()
    assert bridge.env.elapsed.tolist() == [0, 0]           # both started anew...
    assert not torch.allclose(bridge.env.agent, before + 0.08)  # ...from a fresh start, not from the action
    _, _, _, trunc, _ = bridge.step(np.zeros((2, 2), np.float32))
    assert not trunc.any() and bridge.env.elapsed.tolist() == [1, 1]


@pytest.mark.parametrize("bootstrap_at_done, ignore_terminations, expected", [
    (True, False, "truncated"),      # ppo_rgb: bootstrap at every done
    (False, False, "terminated"),
    (True, True, "neither"),         # evaluation: run to the time limit
])
def test_termination_reporting(bootstrap_at_done, ignore_terminations, expected):
    env = ClutterEnv(1, image_size=24, terminate_on_success=True, max_episode_steps=100, seed=0)
    bridge = BatchedEnvBridge(env, bootstrap_at_done=bootstrap_at_done, ignore_terminations=ignore_terminations)
    bridge.reset()
    for _ in range(25):
        action = ((env.target - env.agent) / env.step_size).clamp(-1, 1).numpy()
        _, _, term, trunc, info = bridge.step(action)
        if info["success"].any():
            break
    assert info["success"].all()
    assert {"truncated": (False, True), "terminated": (True, False), "neither": (False, False)}[expected] == \
        (bool(term[0]), bool(trunc[0]))


def run_plain_loop(env: ClutterEnv, module, seed, num_steps):
    """Step the batched env directly (same-step partial resets), choosing actions as RLlib would
    with explore=False: the module's deterministic mean, unsquashed into the action space."""
    obs, _ = env.reset(seed=seed)
    current = [{"obs": [obs[i].clone()], "rewards": []} for i in range(env.num_envs)]
    finished = []
    for _ in range(num_steps):
        with torch.no_grad():
            inputs = module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
        mean = inputs[:, : inputs.shape[1] // 2].numpy()
        actions = np.stack([unsquash_action(a, env.single_action_space) for a in mean])
        obs, rew, term, trunc, _ = env.step(torch.as_tensor(actions))
        done = term | trunc
        for i in range(env.num_envs):
            current[i]["obs"].append(obs[i].clone())
            current[i]["rewards"].append(float(rew[i]))
        if done.any():
            idx = done.nonzero().squeeze(1)
            obs, _ = env.reset(options={"env_idx": idx})
            for i in idx.tolist():
                finished.append(current[i])
                current[i] = {"obs": [obs[i].clone()], "rewards": []}
    return finished


def summary(episodes):
    """Order-free fingerprint of complete episodes: length, rewards, first and last observation."""
    return sorted((len(e["rewards"]), tuple(np.round(e["rewards"], 5)), e["obs"][0].numpy().tobytes(),
                   e["obs"][-1].numpy().tobytes()) for e in episodes)


def test_rllib_sees_the_same_episodes_as_a_plain_loop():
    env_config = {"image_size": 32, "num_distractors": 2, "max_episode_steps": 7, "seed": 3}
    config = (GazePPOConfig()
              .environment("clutter", env_config=env_config)
              .env_runners(num_env_runners=0, num_envs_per_env_runner=3, gym_env_vectorize_mode="vector_entry_point",
                           explore=False)
              .rl_module(model_config={"conv_filters": ((8, 4, 2), (8, 3, 2))})
              .debugging(seed=11))
    runner = SingleAgentEnvRunner(config=config)
    rllib = [{"obs": [torch.as_tensor(o) for o in e.get_observations()], "rewards": [float(r) for r in e.get_rewards()]}
             for e in runner.sample(num_episodes=6)]
    assert all(len(e["rewards"]) == 7 for e in rllib)
    plain = run_plain_loop(ClutterEnv(3, **env_config), runner.module, seed=runner._seed, num_steps=14)
    assert len(plain) == 6
    assert summary(rllib) == summary(plain)


def test_creator_rejects_a_missing_num_envs():
    with pytest.raises(ValueError, match="gym_env_vectorize_mode='vector_entry_point'"):
        make_clutter({"image_size": 32})
