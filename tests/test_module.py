import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

from rllib_gaze.gaze import MapRegistration, cell_centres
from rllib_gaze.module import GAZE_PARAMS, PRE_ATTENTION_FEATURES, GazePPOModule

IMAGE = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
DICT = gym.spaces.Dict({"rgb": IMAGE, "state": gym.spaces.Box(-1, 1, (7,), np.float32)})
ACTIONS = gym.spaces.Box(-1, 1, (4,), np.float32)


def module(obs_space=IMAGE, attention="foveal", **kw):
    return GazePPOModule(observation_space=obs_space, action_space=ACTIONS,
                         model_config={"attention": attention, **kw})


def obs_batch(space, n=5):
    if isinstance(space, gym.spaces.Dict):
        return {k: torch.as_tensor(np.stack([s.sample() for _ in range(n)])) for k, s in space.spaces.items()}
    return torch.as_tensor(np.stack([space.sample() for _ in range(n)]))


@pytest.mark.parametrize("space", [IMAGE, DICT], ids=["box", "dict"])
@pytest.mark.parametrize("attention", ["foveal", "patch", "none"])
def test_forward_train_exposes_what_the_learner_needs(space, attention):
    m = module(space, attention)
    out = m.forward_train({Columns.OBS: obs_batch(space)})
    assert out[Columns.ACTION_DIST_INPUTS].shape == (5, 8)          # mean + log-std per action dim
    assert torch.allclose(out[Columns.ACTION_DIST_INPUTS][:, 4:], torch.full((5, 4), -0.5))
    assert out[Columns.EMBEDDINGS].shape == (5, 512 if space is DICT else 256)
    assert out[PRE_ATTENTION_FEATURES].shape == (5, 64, 4, 4)        # NatureCNN on 64x64
    expected = {"foveal": (5, 5), "patch": (5, 4, 4), "none": None}[attention]
    assert (out[GAZE_PARAMS].shape if GAZE_PARAMS in out else None) == expected


def test_nature_cnn_on_128px_gives_a_12x12_map():
    m = module(gym.spaces.Box(0, 255, (128, 128, 3), np.uint8))
    assert m.feature_map_shape == (64, 12, 12)


@pytest.mark.parametrize("attention, params_shape, learnt", [
    ("foveal", (5, 5), True), ("patch", (5, 4, 4), True), ("oracle", (5, 5), False), ("centre", (5, 5), False),
    ("none", None, False)])
def test_gaze_api(attention, params_shape, learnt):
    m = module(TARGETED, attention)
    obs = obs_batch(TARGETED)
    features = m.feature_map(obs)
    assert m.attention_kind == attention and features.shape == (5, *m.feature_map_shape)
    assert torch.equal(features, m.forward_train({Columns.OBS: obs})[PRE_ATTENTION_FEATURES])
    assert bool(m.gaze_parameters()) == learnt
    if attention == "none":
        with pytest.raises(ValueError, match="attention='none'"):
            m.gaze_weights(features, obs)
        return
    weights, params = m.gaze_weights(features, obs)
    assert weights.shape == (5, 4, 4) and params.shape == params_shape


def test_values_without_embeddings_build_no_graph():
    m = module(DICT)
    batch = {Columns.OBS: obs_batch(DICT)}
    values = m.compute_values(batch)
    assert values.shape == (5,) and not values.requires_grad
    with_grad = m.compute_values(batch, embeddings=m.forward_train(batch)[Columns.EMBEDDINGS])
    assert with_grad.requires_grad
    assert torch.allclose(values, with_grad.detach(), atol=1e-6)


def test_inference_only_module_drops_the_value_head_but_keeps_the_gaze():
    m = GazePPOModule(observation_space=IMAGE, action_space=ACTIONS, inference_only=True,
                      model_config={"attention": "foveal"})
    assert not hasattr(m, "vf") and m.attention_kind == "foveal" and m.gaze_parameters()
    m.forward_inference({Columns.OBS: obs_batch(IMAGE)})


def test_orthogonal_heads_like_ppo_rgb():
    m = module()
    w = m.pi[2].weight
    assert torch.allclose(w @ w.T, torch.eye(4) * (0.01 * np.sqrt(2)) ** 2, atol=1e-6)
    assert torch.all(m.pi[0].bias == 0)


@pytest.mark.parametrize("space, message", [
    (gym.spaces.Box(0, 1, (10,), np.float32), "must be a Box of shape"),
    (gym.spaces.Dict({"depth": IMAGE}), "needs an 'rgb' key"),
    (gym.spaces.Dict({"rgb": IMAGE, "segmentation": IMAGE}), "unsupported keys"),
])
def test_bad_observation_spaces_are_named(space, message):
    with pytest.raises(ValueError, match=message):
        module(space)


def test_discrete_actions_are_rejected():
    with pytest.raises(ValueError, match="1-D Box action space"):
        GazePPOModule(observation_space=IMAGE, action_space=gym.spaces.Discrete(3), model_config={})


TARGETED = gym.spaces.Dict({"rgb": IMAGE, "state": gym.spaces.Box(-1, 1, (7,), np.float32),
                            "target": gym.spaces.Box(0, 1, (2,), np.float32)})


@pytest.mark.parametrize("attention", ["foveal", "none"])
def test_no_network_reads_the_privileged_target(attention):
    torch.manual_seed(0)
    m = module(TARGETED, attention)
    batch = obs_batch(TARGETED)
    other = {**batch, "target": torch.rand_like(batch["target"])}
    out, out_other = m.forward_train({Columns.OBS: batch}), m.forward_train({Columns.OBS: other})
    assert torch.equal(out[Columns.ACTION_DIST_INPUTS], out_other[Columns.ACTION_DIST_INPUTS])


def test_oracle_gaze_sits_on_the_target_and_needs_it():
    m = module(TARGETED, "oracle", gaze_oracle_sigma=0.2)
    batch = obs_batch(TARGETED)
    params = m.forward_train({Columns.OBS: batch})[GAZE_PARAMS]
    assert torch.allclose(params[:, :2], m.map_registration.image_to_map(batch["target"]))
    with pytest.raises(ValueError, match="attention='oracle' needs the target's position"):
        module(DICT, "oracle")


def test_centre_gaze_stays_on_the_image_centre_whatever_the_input():
    m = module(DICT, "centre", gaze_fixed_sigma=0.4)
    params = m.forward_train({Columns.OBS: obs_batch(DICT)})[GAZE_PARAMS]
    centre = m.map_registration.image_to_map(torch.tensor([0.5, 0.5]))
    assert torch.allclose(params[:, :2], centre.expand(len(params), 2)) and torch.all(params[:, 2:4] == 0.4)
    assert not m.gaze_parameters()


def test_map_registration_follows_the_encoders_receptive_fields():
    # NatureCNN at 96 px: cell m of the 8 x 8 map sees a window centred at pixel 18 + 8 m (continuous
    # coordinates), so an image point there lands on that cell's centre in map coordinates
    m = module(gym.spaces.Box(0, 255, (96, 96, 3), np.uint8), "foveal")
    assert m.feature_map_shape[1:] == (8, 8)
    ys, xs = cell_centres(8, 8)
    pixels = 18.0 + 8.0 * torch.arange(8.0)
    points = torch.stack([pixels / 96, pixels.flip(0) / 96], -1)
    assert torch.allclose(m.map_registration.image_to_map(points), torch.stack([xs, ys.flip(0)], -1), atol=1e-6)
    # GazeSAC's padded stack with pools that divide the image tiles it evenly: the identity
    from rllib_gaze.sac_module import PlainConv
    even = MapRegistration.of_layers(PlainConv(3, "pre_pool").head, (128, 128), (8, 8))
    assert even.scale == pytest.approx((1.0, 1.0)) and even.offset == pytest.approx((0.0, 0.0))


def test_stopping_rl_gradient_at_the_gaze_leaves_its_parameters_without_gradient():
    for rl_gradient in (True, False):
        m = module(DICT, "foveal", gaze_rl_gradient=rl_gradient, gaze_head_init_std=0.05)
        m.forward_train({Columns.OBS: obs_batch(DICT)})[Columns.ACTION_DIST_INPUTS].sum().backward()
        moved = [p.grad is not None and p.grad.abs().sum() > 0 for p in m.gaze_parameters()]
        assert all(moved) if rl_gradient else not any(moved)
        assert m.cnn[0].weight.grad.abs().sum() > 0  # the encoder still learns through the attended map
