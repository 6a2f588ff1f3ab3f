"""BatchedEnvBridge: next-step autoreset, numpy out (torch beside it), and what RLlib's env runner makes of it."""

import numpy as np
import pytest
import torch
from episodes import plain_loop_episodes, rllib_episodes, sampled_episodes, summary
from helpers import running
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

from rllib_gaze import GazePPOConfig
from rllib_gaze.env_runner import BatchedEnvRunner
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


@pytest.mark.parametrize("torch_observations", [True, False])
def test_gym_api_gives_numpy_and_the_on_device_api_the_envs_own_tensors(torch_observations):
    # The option only says which API BatchedEnvRunner reads: reset/step give numpy either way (RLlib's
    # stock runner), reset_on_device/step_on_device the env's tensors as it returned them, with the
    # same autoreset; torch actions reach the env as numpy ones do.
    returned = []

    def keep(result):
        returned.append(result[0])
        return result

    envs = [ClutterEnv(2, image_size=24, max_episode_steps=2, seed=0) for _ in range(2)]
    gym_api, on_device = (BatchedEnvBridge(e, torch_observations=torch_observations) for e in envs)
    step, reset = envs[1].step, envs[1].reset
    envs[1].step = lambda actions: keep(step(actions))
    envs[1].reset = lambda **kw: keep(reset(**kw))
    obs, info = gym_api.reset(seed=1)
    obs_t, info_t = on_device.reset_on_device(seed=1)
    assert isinstance(obs, np.ndarray) and obs_t is returned[-1] and np.array_equal(obs, obs_t.numpy())
    assert info["success"].tolist() == info_t["success"].tolist() == [False, False]
    for t in range(5):   # steps 2 and 5 end both episodes, step 3 is the reset step
        action = np.full((2, 2), 0.5 - 0.3 * t, np.float32)
        obs, rew, term, trunc, info = gym_api.step(action)
        obs_t, rew_t, term_t, trunc_t, info_t = on_device.step_on_device(torch.from_numpy(action))
        assert isinstance(obs, np.ndarray) and obs_t is returned[-1]
        assert np.array_equal(obs, obs_t.numpy())
        assert all(isinstance(x, np.ndarray) for x in (rew_t, term_t, trunc_t, info_t["success"]))
        assert (rew.tolist(), term.tolist(), trunc.tolist(), info["success"].tolist()) == \
            (rew_t.tolist(), term_t.tolist(), trunc_t.tolist(), info_t["success"].tolist())
        assert trunc.all() == (t in (1, 4))
    assert isinstance(on_device.step(torch.zeros(2, 2))[0], np.ndarray)   # step takes tensors too


def test_creators_pass_torch_observations_to_the_bridge():
    assert make_clutter({"num_envs": 2, "image_size": 24}).torch_observations is True
    assert make_clutter({"num_envs": 2, "image_size": 24, "torch_observations": False}).torch_observations is False
    with pytest.raises(ValueError, match=r"keys \['bogus'\].*'bootstrap_at_done', 'torch_observations'\]"):
        make_clutter({"num_envs": 2, "bogus": 1})


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


@pytest.mark.parametrize("runner_cls, torch_observations", [
    (SingleAgentEnvRunner, True),    # the stock runner reads numpy through step() whatever the option
    (BatchedEnvRunner, True),        # the env's tensors (the default)
    (BatchedEnvRunner, False),       # numpy, as before issue 22
])
def test_rllib_sees_the_same_episodes_as_a_plain_loop(runner_cls, torch_observations):
    env_config = {"image_size": 32, "num_distractors": 2, "max_episode_steps": 7, "seed": 3}
    config = (GazePPOConfig()
              .environment("clutter", env_config={**env_config, "torch_observations": torch_observations})
              .env_runners(num_env_runners=0, num_envs_per_env_runner=3, gym_env_vectorize_mode="vector_entry_point",
                           explore=False, env_runner_cls=runner_cls)
              .rl_module(model_config={"conv_filters": ((8, 4, 2), (8, 3, 2))})
              .debugging(seed=11))
    runner = runner_cls(config=config)
    rllib = rllib_episodes(sampled_episodes(runner, 6)[:6])
    assert all(len(e["rewards"]) == 7 for e in rllib)
    plain = plain_loop_episodes(ClutterEnv(3, **env_config), runner.module, seed=runner._seed, num_steps=14)
    assert len(plain) == 6
    assert summary(rllib) == summary(plain)


def test_creator_rejects_a_missing_num_envs():
    with pytest.raises(ValueError, match="gym_env_vectorize_mode='vector_entry_point'"):
        make_clutter({"image_size": 32})


def test_success_metrics_reach_rllib_results(ray_session):
    # Steps of 0.5 reach any target within a few steps of a 6-step episode; ~half the episodes succeed
    # under a random policy, and success_once >= success_at_end always.
    config = (GazePPOConfig()
              .environment("clutter", env_config={"image_size": 24, "num_distractors": 0, "max_episode_steps": 6,
                                                  "step_size": 0.5, "success_radius": 0.3, "seed": 0})
              .env_runners(num_env_runners=0, num_envs_per_env_runner=8, rollout_fragment_length=12,
                           gym_env_vectorize_mode="vector_entry_point")
              .training(train_batch_size_per_learner=96, minibatch_size=48, num_epochs=1)
              .rl_module(model_config={"conv_filters": ((8, 4, 2), (8, 3, 2))})
              .debugging(seed=0))
    with running(config) as algo:
        runners = algo.train()["env_runners"]
    assert 0.0 < runners["success_once"] <= 1.0
    assert runners["success_at_end"] <= runners["success_once"]


def test_deterministic_evaluation_reports_success(ray_session):
    from rllib_gaze.envs import evaluation_env_config

    env_config = {"image_size": 24, "num_distractors": 0, "max_episode_steps": 6, "step_size": 0.5,
                  "success_radius": 0.3, "terminate_on_success": True, "seed": 0}
    assert evaluation_env_config("clutter", env_config)["ignore_terminations"] is True
    assert evaluation_env_config("maniskill", {"env_id": "PushCube-v1"})["reconfiguration_freq"] == 1
    config = (GazePPOConfig()
              .environment("clutter", env_config=env_config)
              .env_runners(num_env_runners=0, num_envs_per_env_runner=4, rollout_fragment_length=12,
                           gym_env_vectorize_mode="vector_entry_point")
              .training(train_batch_size_per_learner=48, minibatch_size=24, num_epochs=1)
              .rl_module(model_config={"conv_filters": ((8, 4, 2), (8, 3, 2))})
              .evaluation(evaluation_interval=1, evaluation_num_env_runners=0, evaluation_duration=4,
                          evaluation_duration_unit="episodes",
                          evaluation_config={"explore": False,
                                             "env_config": evaluation_env_config("clutter", env_config)})
              .debugging(seed=0))
    with running(config) as algo:
        evaluation = algo.train()["evaluation"]["env_runners"]
    assert evaluation["episode_len_mean"] == 6          # no early termination in evaluation
    assert 0.0 <= evaluation["success_at_end"] <= evaluation["success_once"] <= 1.0
