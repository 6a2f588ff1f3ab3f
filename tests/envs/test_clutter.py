import numpy as np
import pytest
import torch

from rllib_gaze.envs.clutter import ClutterEnv


def test_batched_api_shapes_like_maniskill():
    env = ClutterEnv(3, image_size=32, num_distractors=2, include_state=True, seed=0)
    obs, info = env.reset()
    assert obs["rgb"].shape == (3, 32, 32, 3) and obs["rgb"].dtype == torch.uint8
    assert obs["state"].shape == (3, 2) and obs["state"].dtype == torch.float32
    assert env.single_observation_space["rgb"].shape == (32, 32, 3)
    obs, rew, term, trunc, info = env.step(torch.zeros(3, 2))
    assert rew.shape == term.shape == trunc.shape == info["success"].shape == (3,)
    assert rew.dtype == torch.float32 and term.dtype == torch.bool and info["success"].dtype == torch.bool


def test_partial_reset_touches_only_the_listed_envs():
    env = ClutterEnv(3, image_size=24, seed=0)
    before, _ = env.reset()
    for _ in range(3):
        env.step(torch.ones(3, 2))
    moved, _ = env.reset(options={"env_idx": torch.tensor([1])})
    stepped = env.elapsed.tolist()
    assert stepped == [3, 0, 3]
    assert not torch.equal(moved[1], before[1])   # a new episode for env 1


def test_same_seed_same_trajectory():
    def roll(seed):
        env = ClutterEnv(2, image_size=24, seed=seed)
        frames = [env.reset(seed=seed)[0]]
        for t in range(12):
            frames.append(env.step(torch.full((2, 2), 0.3 * ((-1) ** t)))[0])
        return torch.stack(frames)
    assert torch.equal(roll(5), roll(5))
    assert not torch.equal(roll(5), roll(6))


def test_time_limit_truncates():
    env = ClutterEnv(2, image_size=24, max_episode_steps=3, seed=0)
    env.reset()
    for t in range(1, 4):
        _, _, term, trunc, _ = env.step(torch.zeros(2, 2))
        assert bool(trunc.all()) == (t == 3) and not term.any()


def test_rendering_puts_agent_and_target_where_the_state_says():
    env = ClutterEnv(1, image_size=40, num_distractors=0, seed=1)
    obs, _ = env.reset()
    obs = obs.numpy()
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
                action = torch.as_tensor(rng.uniform(-1, 1, (64, 2)))
            else:
                action = ((env.target - env.agent) / env.step_size).clamp(-1, 1)
            _, rew, _, _, info = env.step(action)
            ret += rew.numpy()
            success |= info["success"].numpy()
        totals[policy] = (ret.mean(), success.mean())
    assert totals["towards_target"][1] == 1.0
    assert totals["towards_target"][0] > 10 * totals["random"][0]


def test_terminate_on_success_option():
    env = ClutterEnv(4, image_size=24, terminate_on_success=True, seed=0)
    env.reset()
    for _ in range(20):   # targets start < 1.42 away, 0.08 per step
        _, _, term, _, info = env.step(((env.target - env.agent) / env.step_size).clamp(-1, 1))
        assert torch.equal(term, info["success"])
        if term.all():
            break
    assert term.all()


@pytest.mark.parametrize("kwargs, message", [
    ({"num_envs": 0}, "num_envs=0"),
    ({"num_envs": 1, "image_size": 8}, "image_size=8"),
    ({"num_envs": 1, "num_distractors": -1}, "num_distractors=-1"),
    ({"num_envs": 1, "max_episode_steps": 0}, "max_episode_steps=0"),
    ({"num_envs": 1, "reward": "sparse"}, r"reward='sparse': allowed values are \('progress', 'closeness'\)"),
    ({"num_envs": 1, "distractor_motion": "jitter"},
     r"distractor_motion='jitter': allowed values are \('drift', 'still'\)"),
    ({"num_envs": 1, "workspace": "table"}, r"workspace='table': allowed values are \['none', 'centre', 'corner'\]"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClutterEnv(**kwargs)


def dense_render(env: ClutterEnv) -> torch.Tensor:
    """Reference renderer: test every pixel of every square, painting in the env's order."""
    s, half = env.image_size, env._half
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s
    xs, ys = coords.view(1, 1, -1), coords.view(1, -1, 1)
    img = env.background.clone()

    def paint(centre, hollow, colour):
        nonlocal img
        extent = torch.maximum((xs - centre[:, 0].view(-1, 1, 1)).abs(), (ys - centre[:, 1].view(-1, 1, 1)).abs())
        mask = (extent <= half) & ~((extent <= half * 0.5) & hollow.view(-1, 1, 1))
        img = torch.where(mask.unsqueeze(-1), colour.view(-1, 1, 1, 3), img)

    green, red = torch.tensor([40, 200, 60], dtype=torch.uint8), torch.tensor([220, 40, 40], dtype=torch.uint8)
    n = env.num_envs
    for j in range(env.num_distractors):
        g = env.distractor_is_green[:, j]
        paint(env.distractors[:, j], ~g, torch.where(g.view(-1, 1), green, red))
    paint(env.target, torch.ones(n, dtype=torch.bool), green.expand(n, 3))
    paint(env.agent, torch.zeros(n, dtype=torch.bool), red.expand(n, 3))
    return img


def test_fast_renderer_matches_a_dense_reference():
    env = ClutterEnv(16, image_size=40, num_distractors=5, seed=2)
    obs, _ = env.reset()
    for _ in range(10):   # objects also sit on the image border after bouncing
        assert torch.equal(obs, dense_render(env))
        obs = env.step(torch.rand(16, 2) * 2 - 1)[0]


def test_closeness_reward_pays_for_where_the_agent_is_not_for_the_step_taken():
    env = ClutterEnv(num_envs=2, reward="closeness", seed=3)
    env.reset()
    distance = (env.agent - env.target).norm(dim=-1)
    _, reward, *_ = env.step(torch.zeros(2, 2))    # standing still: no progress term
    assert torch.allclose(reward, 1 - torch.tanh(5 * distance))
    progress = ClutterEnv(num_envs=2, seed=3)
    progress.reset()
    towards = (progress.target - progress.agent) / (progress.target - progress.agent).abs().amax(-1, keepdim=True)
    _, reward, *_ = progress.step(towards)
    closer = (progress.agent - progress.target).norm(dim=-1)
    assert torch.all(reward > 1 - torch.tanh(5 * closer))  # plus 10 x the distance closed


def test_expose_target_adds_the_target_position_to_the_observation():
    env = ClutterEnv(num_envs=3, include_state=True, expose_target=True, seed=1)
    assert set(env.single_observation_space.spaces) == {"rgb", "state", "target"}
    obs, _ = env.reset()
    assert torch.equal(obs["target"], env.target) and torch.equal(obs["state"], env.agent)
    only_target = ClutterEnv(num_envs=1, expose_target=True)
    assert set(only_target.single_observation_space.spaces) == {"rgb", "target"}


def _target_ring_colour(env: ClutterEnv) -> tuple[int, ...]:
    """The colour of env 0's target ring (its top-left corner pixel)."""
    obs = env._observe()
    img = (obs["rgb"] if isinstance(obs, dict) else obs)[0]
    s, half = env.image_size, env._half
    x, y = (env.target[0] - half * 0.75) * s
    return tuple(img[int(y), int(x)].tolist())


def test_target_signal_colours_the_target_by_the_agents_closeness():
    env = ClutterEnv(1, image_size=64, num_distractors=0, target_signal=True, seed=0)
    env.reset()
    env.target[0] = torch.tensor([0.3, 0.3])
    env.agent[0] = torch.tensor([0.9, 0.9])                 # far: closeness ~0, the usual green
    far = _target_ring_colour(env)
    env.agent[0] = torch.tensor([0.4, 0.3])                 # beside it (the agent would cover it)
    near = _target_ring_colour(env)
    closeness = 1 - np.tanh(5 * 0.1)
    expected = [round(g + closeness * (y - g)) for g, y in zip((40, 200, 60), (250, 240, 60))]
    assert far == pytest.approx((40, 200, 60), abs=2) and near == pytest.approx(expected, abs=1)
    plain = ClutterEnv(1, image_size=64, num_distractors=0, seed=0)
    plain.reset()
    plain.target[0], plain.agent[0] = torch.tensor([0.3, 0.3]), torch.tensor([0.35, 0.3])
    assert _target_ring_colour(plain) == (40, 200, 60)      # off by default, whatever the distance


def test_still_distractors_stay_where_each_episode_put_them():
    env = ClutterEnv(16, image_size=48, num_distractors=6, distractor_motion="still", seed=0)
    env.reset()
    placed = env.distractors.clone()
    for _ in range(20):
        env.step(torch.rand(16, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    assert torch.equal(env.distractors, placed)
    env.reset(options={"env_idx": torch.tensor([3])})          # a new episode places them anew
    assert not torch.equal(env.distractors[3], placed[3]) and torch.equal(env.distractors[4], placed[4])
    drifting = ClutterEnv(16, image_size=48, num_distractors=6, seed=0)
    drifting.reset()
    start = drifting.distractors.clone()
    drifting.step(torch.zeros(16, 2))
    assert (drifting.distractors - start).norm(dim=-1).min() > 0.01


@pytest.mark.parametrize("workspace, box", [("centre", (0.25, 0.75)), ("corner", (0.5, 1.0))])
def test_workspace_keeps_agent_and_target_inside_and_clutter_outside(workspace, box):
    lo, hi = box
    env = ClutterEnv(256, image_size=96, num_distractors=16, distractor_motion="still", workspace=workspace, seed=0)
    env.reset()
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):   # random pushes press the agent against the box's walls
        env.step(torch.rand(256, 2, generator=gen) * 2 - 1)
        for place in (env.agent, env.target):   # whole squares inside the box
            assert (place - env._half >= lo - 1e-6).all() and (place + env._half <= hi + 1e-6).all()
    # no distractor square overlaps the box, and the clutter still lies all around it
    d = env.distractors
    overlap = ((d + env._half > lo) & (d - env._half < hi)).all(-1)
    assert not overlap.any()
    # episodes start unsolved: the target away from the agent (the rejection rounds leave almost none closer)
    fresh = ClutterEnv(256, image_size=96, workspace=workspace, seed=1)
    fresh.reset()
    apart = (fresh.target - fresh.agent).norm(dim=-1) >= fresh._min_start_distance
    assert apart.float().mean() > 0.95 and fresh._min_start_distance > 2 * fresh.success_radius
