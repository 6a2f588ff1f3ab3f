"""GazeSACModule: sac_rgbd's shapes, RLlib's SAC module APIs, the GazeAPI and bad input, no Ray needed."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.algorithms.sac.sac_learner import ACTION_DIST_INPUTS_NEXT, QF_PREDS, QF_TWIN_PREDS
from ray.rllib.core.columns import Columns

from rllib_gaze.module import GAZE_PARAMS, PRE_ATTENTION_FEATURES
from rllib_gaze.sac_module import GazeSACModule, SquashedGaussian

IMAGE = gym.spaces.Box(0, 255, (128, 128, 3), np.uint8)
DICT = gym.spaces.Dict({"rgb": IMAGE, "state": gym.spaces.Box(-1, 1, (7,), np.float32)})
TARGETED = gym.spaces.Dict({**DICT.spaces, "target": gym.spaces.Box(0, 1, (2,), np.float32)})
ACTIONS = gym.spaces.Box(-1, 1, (4,), np.float32)


def module(obs_space=DICT, attention="foveal", **kw):
    m = GazeSACModule(observation_space=obs_space, action_space=ACTIONS, model_config={"attention": attention, **kw})
    m.make_target_networks()  # as the learner does
    return m


def obs_batch(space, n=5):
    if isinstance(space, gym.spaces.Dict):
        return {k: torch.as_tensor(np.stack([s.sample() for _ in range(n)])) for k, s in space.spaces.items()}
    return torch.as_tensor(np.stack([space.sample() for _ in range(n)]))


def train_batch(space, n=5):
    return {Columns.OBS: obs_batch(space, n), Columns.NEXT_OBS: obs_batch(space, n),
            Columns.ACTIONS: torch.as_tensor(np.stack([ACTIONS.sample() for _ in range(n)]))}


def grads_of(m, loss):
    m.zero_grad()
    loss.backward(retain_graph=True)
    return {name for name, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("space", [IMAGE, DICT], ids=["box", "dict"])
@pytest.mark.parametrize("attention, params_shape", [("foveal", (5, 5)), ("patch", (5, 8, 8)), ("none", None)])
def test_forward_train_gives_sacs_and_the_gazes_outputs(space, attention, params_shape):
    out = module(space, attention).forward_train(train_batch(space))
    for key in (QF_PREDS, QF_TWIN_PREDS, "logp_resampled", "q_curr", "q_target_next", "logp_next_resampled"):
        assert out[key].shape == (5,), key
    assert out[Columns.ACTION_DIST_INPUTS].shape == out[ACTION_DIST_INPUTS_NEXT].shape == (5, 8)
    log_std = out[Columns.ACTION_DIST_INPUTS][:, 4:]
    assert log_std.min() >= -5.0 and log_std.max() <= 2.0          # sac_rgbd's tanh-bounded log-std
    assert out[Columns.EMBEDDINGS].shape == (5, 256)                 # PlainConv's FC 256
    assert out[PRE_ATTENTION_FEATURES].shape == (5, 64, 8, 8)        # the map before the last pooling
    assert (out[GAZE_PARAMS].shape if GAZE_PARAMS in out else None) == params_shape


def test_plain_conv_maps_at_128_px():
    assert module(gaze_map="pre_pool").feature_map_shape == (64, 8, 8)
    assert module(gaze_map="last").feature_map_shape == (64, 4, 4)   # the encoder's final map
    m = module(gaze_map="last")
    assert m.image_fc[0].in_features == 64 * 4 * 4 == module().image_fc[0].in_features


def test_the_critic_trains_the_encoder_and_the_actor_reads_it_detached():
    m = module(gaze_rl_gradient=True)
    out = m.forward_train(train_batch(DICT))
    critic = grads_of(m, out[QF_PREDS].sum() + out[QF_TWIN_PREDS].sum())
    assert any(n.startswith("cnn.") for n in critic) and any(n.startswith("gaze.") for n in critic)
    assert not any(n.startswith("pi") for n in critic)
    actor = grads_of(m, (out["logp_resampled"] - out["q_curr"]).sum())
    # the actor's gradient reaches its own layers only: not the encoder, the gaze or the critic heads
    assert actor and all(n.startswith(("pi.", "pi_mean.", "pi_log_std.")) for n in actor), actor
    assert not out["q_target_next"].requires_grad and not out["logp_next_resampled"].requires_grad


def test_target_networks_are_copies_of_the_heads_read_through_the_live_encoder():
    m = module()
    assert [(a is m.qf, b is m.target_qf) for a, b in m.get_target_network_pairs()][0] == (True, True)
    batch = {Columns.OBS: obs_batch(DICT), Columns.ACTIONS: torch.rand(5, 4) * 2 - 1}
    assert torch.allclose(m.forward_target(batch), m.compute_q_values(batch))  # fresh copies agree
    assert not any(p.requires_grad for p in m.target_qf.parameters())
    with torch.no_grad():
        for head in (m.qf, m.qf_twin):
            head[-1].bias.add_(10.0)
    assert torch.allclose(m.compute_q_values(batch) - m.forward_target(batch), torch.full((5,), 10.0))


def test_deterministic_action_is_the_squashed_mean():
    m = module()
    logits = m.forward_inference({Columns.OBS: obs_batch(DICT)})[Columns.ACTION_DIST_INPUTS]
    dist = m.get_inference_action_dist_cls().from_logits(logits).to_deterministic()
    # RLlib squashes to [low, high] through (tanh + 1) / 2, exact to float rounding only
    assert torch.allclose(dist.sample(), torch.tanh(logits[:, :4]), atol=1e-6)
    assert m.get_train_action_dist_cls() is SquashedGaussian


def test_inference_only_module_drops_the_critics_but_keeps_the_gaze():
    m = GazeSACModule(observation_space=DICT, action_space=ACTIONS, inference_only=True,
                      model_config={"attention": "foveal"})
    assert not hasattr(m, "qf") and m.gaze_parameters()
    assert set(m.get_non_inference_attributes()) == {"qf", "qf_twin", "target_qf", "target_qf_twin"}
    m.forward_exploration({Columns.OBS: obs_batch(DICT)})


@pytest.mark.parametrize("attention, learnt", [("foveal", True), ("patch", True), ("oracle", False), ("none", False)])
def test_gaze_api(attention, learnt):
    m = module(TARGETED, attention)
    obs = obs_batch(TARGETED)
    features = m.feature_map(obs)
    assert m.attention_kind == attention and features.shape == (5, *m.feature_map_shape)
    assert bool(m.gaze_parameters()) == learnt
    if attention == "none":
        with pytest.raises(ValueError, match="attention='none'"):
            m.gaze_weights(features, obs)
    else:
        assert m.gaze_weights(features, obs)[0].shape == (5, 8, 8)


def test_no_network_reads_the_privileged_target():
    torch.manual_seed(0)
    m = module(TARGETED)
    obs = obs_batch(TARGETED)
    other = {**obs, "target": torch.rand_like(obs["target"])}
    out, out_other = (m.forward_inference({Columns.OBS: o})[Columns.ACTION_DIST_INPUTS] for o in (obs, other))
    assert torch.equal(out, out_other)


@pytest.mark.parametrize("kwargs, message", [
    ({"model_config": {"gaze_map": "first"}},
     r"gaze_map='first' is not known; allowed values are \('pre_pool', 'last'\)"),
    ({"model_config": {"attention": "spotlight"}}, r"attention='spotlight' is not known"),
    ({"model_config": {"attention": "oracle"}}, r"attention='oracle' needs the target's position"),
    ({"action_space": gym.spaces.Discrete(3)}, r"GazeSACModule needs a 1-D Box action space; got Discrete\(3\)"),
    ({"observation_space": gym.spaces.Dict({"depth": IMAGE})}, r"needs an 'rgb' key"),
])
def test_bad_input_names_the_value_and_what_is_allowed(kwargs, message):
    args = {"observation_space": DICT, "action_space": ACTIONS, "model_config": {}, **kwargs}
    with pytest.raises(ValueError, match=message):
        GazeSACModule(**args)
