"""Real ManiSkill3 tasks through the bridge: CPU here (software Vulkan), GPU where CUDA exists."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from episodes import plain_loop_episodes, rllib_episodes, sampled_episodes, summary
from helpers import running
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.utils.test_utils import check_train_results_new_api_stack

from rllib_gaze import GazePPOConfig
from rllib_gaze.env_runner import BatchedEnvRunner
from rllib_gaze.envs import make_maniskill_env
from rllib_gaze.envs.maniskill import check_rendering, make_maniskill

SMALL = {"env_id": "PushCube-v1", "camera_size": 32, "max_episode_steps": 4, "sim_backend": "physx_cpu"}


def maniskill_config(**env_config):
    return (GazePPOConfig()
            .environment("maniskill", env_config={**SMALL, **env_config})
            .env_runners(num_env_runners=0, num_envs_per_env_runner=2, rollout_fragment_length=8,
                         gym_env_vectorize_mode="vector_entry_point")
            .training(train_batch_size_per_learner=16, minibatch_size=8, num_epochs=1)
            .rl_module(model_config={"conv_filters": ((8, 4, 2), (8, 3, 2)), "head_hidden": 32,
                                     "image_feature_dim": 32, "state_feature_dim": 32})
            .gaze(contrastive_num_anchors=8, contrastive_memory_capacity=64, contrastive_k=4)
            .debugging(seed=5))


@pytest.mark.parametrize("runner_cls", [SingleAgentEnvRunner, BatchedEnvRunner])
def test_rllib_sees_the_same_maniskill_episodes_as_a_plain_loop(runner_cls):
    config = maniskill_config().env_runners(explore=False, env_runner_cls=runner_cls)
    runner = runner_cls(config=config)
    rllib = rllib_episodes(sampled_episodes(runner, 4)[:4])
    assert all(len(e["rewards"]) == 4 for e in rllib)
    assert rllib[0]["first"]["rgb"].shape == (32, 32, 3) and rllib[0]["first"]["state"].shape == (25,)
    env_kwargs = {k: v for k, v in SMALL.items()}
    plain = plain_loop_episodes(make_maniskill(2, **env_kwargs), runner.module, seed=runner._seed, num_steps=8)
    assert len(plain) == 4
    assert summary(rllib) == summary(plain)
    runner.stop()


def test_gazeppo_trains_on_maniskill_cpu(ray_session):
    with running(maniskill_config()) as algo:
        results = algo.train()
        check_train_results_new_api_stack(results)
        assert results["num_env_steps_sampled_lifetime"] >= 16
        assert "gaze_mu_x_mean" in results["learners"]["default_policy"]


def test_unknown_env_id_lists_close_matches():
    with pytest.raises(ValueError,
                       match=r"env_id='PushCub-v1' is not a registered ManiSkill task; did you mean \['PushCube-v1'"):
        make_maniskill(1, env_id="PushCub-v1")


@pytest.mark.parametrize("options, message", [
    ({"sim_backend": "gpu"}, r"sim_backend='gpu': allowed values are \('auto', 'physx_cuda', 'physx_cpu'\)"),
    ({"camera_size": 8}, "camera_size=8"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        make_maniskill(1, **options)


def test_missing_vulkan_fails_the_node_check_saying_how_to_install_it():
    # the command cluster nodes run at set-up (cluster/*.yaml)
    env = {**os.environ, "VK_ICD_FILENAMES": "/nonexistent/icd.json"}
    proc = subprocess.run([sys.executable, "-m", "rllib_gaze.envs.maniskill", "physx_cpu"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Mesa >= 24.3 lavapipe" in proc.stderr and "NVIDIA" in proc.stderr


def test_node_check_renders_here():
    assert check_rendering("physx_cpu") == "ManiSkill renders PushCube-v1 here with physx_cpu"


@pytest.mark.gpu
def test_node_check_renders_on_the_gpu():
    assert "physx_cuda on" in check_rendering("physx_cuda")


@pytest.mark.gpu
def test_gpu_batched_env_partial_resets():
    env = make_maniskill_env({"num_envs": 16, "env_id": "PushCube-v1", "camera_size": 64, "max_episode_steps": 3,
                              "sim_backend": "physx_cuda"})
    obs, _ = env.reset(seed=0)
    assert obs["rgb"].shape == (16, 64, 64, 3) and isinstance(obs["rgb"], np.ndarray)
    for t in range(3):
        _, _, _, trunc, _ = env.step(np.zeros((16, 8), np.float32))
    assert trunc.all()
    _, rew, term, trunc, _ = env.step(np.zeros((16, 8), np.float32))
    assert not trunc.any() and np.all(rew == 0)
    assert torch.all(env.env.unwrapped.elapsed_steps == 0)


def test_cpu_resets_do_not_depend_on_torch_s_global_rng():
    def reset_obs_after_noise(noise):
        env = make_maniskill(1, **SMALL)
        env.reset(seed=3)
        torch.manual_seed(noise)
        return env.reset(options={"env_idx": torch.tensor([0])})[0]["rgb"]
    assert torch.equal(reset_obs_after_noise(0), reset_obs_after_noise(1))


def test_cluttered_variant_changes_only_the_image():
    def roll(clutter):
        env = make_maniskill(1, env_id="PushCube-v1", camera_size=64, sim_backend="physx_cpu", clutter=clutter)
        obs, _ = env.reset(seed=1)
        frames, states, rewards = [obs["rgb"]], [obs["state"]], []
        for _ in range(3):
            obs, reward, *_ = env.step(torch.full((1, 8), 0.3))
            frames.append(obs["rgb"]), states.append(obs["state"]), rewards.append(reward)
        env.close()
        return torch.cat(frames), torch.cat(states), torch.cat(rewards)

    plain, cluttered = roll(0), roll(6)
    assert torch.equal(plain[1], cluttered[1]) and torch.equal(plain[2], cluttered[2])   # same physics and reward
    changed = (plain[0] != cluttered[0]).any(-1).float().mean().item()
    assert 0.002 < changed < 0.5, changed     # some, not all, of the image


def test_clutter_must_be_a_non_negative_integer():
    with pytest.raises(ValueError, match=r"clutter=-1: must be an integer >= 0"):
        make_maniskill(1, clutter=-1)
