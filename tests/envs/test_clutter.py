import numpy as np
import pytest

from rllib_gaze.envs import make_clutter
from rllib_gaze.envs.clutter import ClutterEnv


def test_spaces_and_shapes():
    env = ClutterEnv(3, image_size=32, num_distractors=2, include_state=True, seed=0)
    obs, info = env.reset()
    assert obs["rgb"].shape == (3, 32, 32, 3) and obs["rgb"].dtype == np.uint8
    assert obs["state"].shape == (3, 2) and obs["state"].dtype == np.float32
    assert env.observation_space.contains(obs)
    obs, rew, term, trunc, info = env.step(env.action_space.sample())
    assert rew.shape == term.shape == trunc.shape == info["success"].shape == (3,)
    assert rew.dtype == np.float32 and term.dtype == bool and info["success"].dtype == bool


def test_same_seed_same_trajectory():
    def roll(seed):
        env = ClutterEnv(2, image_size=24, seed=seed)
        frames = [env.reset(seed=seed)[0]]
        for t in range(12):
            frames.append(env.step(np.full((2, 2), 0.3 * ((-1) ** t), np.float32))[0])
        return np.stack(frames)
    assert np.array_equal(roll(5), roll(5))
    assert not np.array_equal(roll(5), roll(6))


def test_next_step_autoreset():
    env = ClutterEnv(2, image_size=24, max_episode_steps=3, seed=0)
    env.reset()
    zero = np.zeros((2, 2), np.float32)
    for t in range(1, 4):
        _, rew, term, trunc, _ = env.step(zero)
        assert trunc.all() == (t == 3) and not term.any()
    before = env.agent.clone()
    obs, rew, term, trunc, info = env.step(np.ones((2, 2), np.float32))   # the reset step ignores the action
    assert np.all(rew == 0) and not term.any() and not trunc.any() and not info["success"].any()
    assert not np.allclose(env.agent.numpy(), before.numpy() + 0.08)
    assert env.elapsed.tolist() == [0, 0]
    _, _, _, trunc, _ = env.step(zero)
    assert not trunc.any() and env.elapsed.tolist() == [1, 1]


def test_rendering_puts_agent_and_target_where_the_state_says():
    env = ClutterEnv(1, image_size=40, num_distractors=0, seed=1)
    obs, _ = env.reset()
    ax, ay = (env.agent[0].numpy() * 40).astype(int)
    tx, ty = (env.target[0].numpy() * 40).astype(int)
    assert tuple(obs[0, ay, ax]) == (220, 40, 40)           # filled red agent
    assert tuple(obs[0, ty, tx]) != (40, 200, 60)           # hollow target: centre is background
    ring = obs[0, ty - 2, tx - 2:tx + 3].tolist() + obs[0, ty, tx - 2:tx - 1].tolist()
    assert [40, 200, 60] in ring


def test_moving_to_the_target_pays_and_succeeds():
    env = ClutterEnv(64, image_size=32, seed=0)
    totals = {}
    for policy in ("random", "towards_target"):
        env.reset(seed=0)
        ret, success = np.zeros(64), np.zeros(64, bool)
        rng = np.random.default_rng(0)
        for _ in range(50):
            if policy == "random":
                action = rng.uniform(-1, 1, (64, 2))
            else:
                action = np.clip((env.target - env.agent).numpy() / env.step_size, -1, 1)
            _, rew, _, _, info = env.step(action)
            ret += rew
            success |= info["success"]
        totals[policy] = (ret.mean(), success.mean())
    assert totals["towards_target"][1] == 1.0
    assert totals["towards_target"][0] > 10 * totals["random"][0]


def test_terminate_on_success_option():
    env = ClutterEnv(4, image_size=24, terminate_on_success=True, seed=0)
    env.reset()
    ended = np.zeros(4, bool)
    for _ in range(20):   # targets start < 1.42 away, 0.08 per step
        _, _, term, _, info = env.step(np.clip((env.target - env.agent).numpy() / env.step_size, -1, 1))
        assert np.array_equal(term, info["success"])
        ended |= term
    assert ended.all()


@pytest.mark.parametrize("kwargs, message", [
    ({"num_envs": 0}, "num_envs=0"),
    ({"num_envs": 1, "image_size": 8}, "image_size=8"),
    ({"num_envs": 1, "num_distractors": -1}, "num_distractors=-1"),
    ({"num_envs": 1, "max_episode_steps": 0}, "max_episode_steps=0"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClutterEnv(**kwargs)


def test_creator_explains_the_vectorize_mode():
    with pytest.raises(ValueError, match="gym_env_vectorize_mode='vector_entry_point'"):
        make_clutter({"image_size": 32})
    assert make_clutter({"num_envs": 2, "image_size": 32}).num_envs == 2
