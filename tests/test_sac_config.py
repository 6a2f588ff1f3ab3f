"""GazeSACConfig: sac_rgbd's defaults, the shared .gaze() section and its checks, Tune registration, and a
few end-to-end iterations on the clutter env."""

import math

import pytest
from helpers import running, tiny_sac_config
from ray.rllib.algorithms.dqn.dqn import calculate_rr_weights
from ray.rllib.algorithms.sac import SACConfig
from ray.tune.registry import get_trainable_cls

from rllib_gaze import ARMS, GazePPOConfig, GazeSAC, GazeSACConfig
from rllib_gaze.config import GazeConfigMixin
from rllib_gaze.gaze import GAZE_DEFAULTS
from rllib_gaze.sac_config import REPLAY_CAPACITY
from rllib_gaze.sac_learner import GazeSACLearner
from rllib_gaze.sac_module import GazeSACModule


def test_defaults_mirror_sac_rgbd():
    c = GazeSACConfig()
    assert (c.num_envs_per_env_runner, c.train_batch_size_per_learner, c.gamma, c.tau) == (16, 512, 0.8, 0.01)
    assert (c.actor_lr, c.critic_lr, c.alpha_lr, c.initial_alpha, c.target_entropy) == (3e-4, 3e-4, 3e-4, 1.0, "auto")
    assert (c.num_steps_sampled_before_learning_starts, c.twin_q, c.n_step, c.adam_eps) == (4000, True, 1, 1e-8)
    assert c.replay_buffer_config == {"type": "EpisodeReplayBuffer", "capacity": REPLAY_CAPACITY}
    # training_freq 64 (16 envs x 4 steps), utd 0.25: 16 gradient steps per sampling round
    assert c.num_envs_per_env_runner * c.rollout_fragment_length == 64
    assert calculate_rr_weights(c) == [1, 16]


def test_the_gaze_section_is_shared_with_ppo_not_copied():
    # one .gaze() and one adam_eps for both; PPO's training() adds only its own values_from_sampling
    assert GazeSACConfig.gaze is GazePPOConfig.gaze and GazeSACConfig.training is GazeConfigMixin.training
    assert GazePPOConfig().training(adam_eps=3e-5).adam_eps == 3e-5 and GazeConfigMixin in GazePPOConfig.__mro__
    c = GazeSACConfig()
    assert {key: getattr(c, key) for key in GAZE_DEFAULTS} == GAZE_DEFAULTS
    assert {key: c.model_config[key] for key in GAZE_DEFAULTS} == {**GAZE_DEFAULTS, "gaze_rl_gradient": False}
    assert c.model_config["twin_q"] is True


def test_plain_sac_arm_differs_only_in_the_gaze_settings():
    gaze = GazeSACConfig().to_dict()
    plain = GazeSACConfig().gaze(**ARMS["ppo"]).to_dict()
    assert {k for k in gaze if gaze[k] != plain[k]} == {"attention", "contrastive"}


def test_registered_for_tune_by_name_with_its_module_and_learner():
    assert get_trainable_cls("GazeSAC") is GazeSAC
    assert isinstance(GazeSAC.get_default_config(), SACConfig)
    c = GazeSACConfig()
    assert c.get_default_rl_module_spec().module_class is GazeSACModule
    assert c.get_default_learner_class() is GazeSACLearner


@pytest.mark.parametrize("options, message", [
    ({"attention": "spotlight"},
     r"attention='spotlight' is not known; allowed values are \('foveal', 'patch', 'oracle', 'centre', 'none'\)"),
    ({"contrastive_return": "return_to_go"},
     r"contrastive_return='return_to_go' is not known; allowed values are \('value_target', 'value'\)"),
    ({"gaze_predict_coeff": 1.0}, r"gaze_predict_coeff=1.0: the gaze-predict objective is GazePPO's only"),
    ({"attention": "none", "contrastive": True}, r"contrastive=True needs a trainable attention"),
    ({"contrastive_margin": -0.1}, r"contrastive_margin=-0.1 must be >= 0"),
])
def test_bad_gaze_options_fail_validation_naming_the_value(options, message):
    with pytest.raises(ValueError, match=message):
        GazeSACConfig().environment("clutter").gaze(**options).validate()


def test_bad_adam_eps_and_a_disagreeing_model_config_are_refused():
    with pytest.raises(ValueError, match=r"adam_eps=0.0 must be > 0"):
        GazeSACConfig().environment("clutter").training(adam_eps=0.0).validate()
    config = GazeSACConfig().environment("clutter").rl_module(model_config={"attention": "patch"})
    with pytest.raises(ValueError, match=r"model_config\['attention'\]='patch' disagrees with .gaze\(attention="):
        config.validate()


def test_trains_end_to_end_on_clutter(ray_session):
    """A few real SAC iterations (replay, target updates, the gaze objective, the gaze drawings)
    through Tune's name."""
    config = tiny_sac_config(gaze_image_interval=1, gaze_image_count=2)
    config.algo_class = get_trainable_cls("GazeSAC")
    with running(config) as algo:
        results = [algo.train() for _ in range(2)]  # the first fills the memory, the second mines it
    learner = results[-1]["learners"]["default_policy"]
    assert results[-1]["env_runners"]["num_env_steps_sampled_lifetime"] >= 64
    for key in ("qf_loss", "policy_loss", "alpha_value", "contrastive_loss", "contrastive_memory_fill"):
        assert math.isfinite(float(learner[key])), key
    assert learner["contrastive_memory_fill"] > 0 and learner["contrastive_valid_anchor_frac"] > 0
    assert results[-1]["learners"]["__all_modules__"]["num_env_steps_trained_lifetime"] > 0
    assert results[-1]["gaze_images"].shape[0] == 3 and results[-1]["gaze_images"].dtype.name == "uint8"


def test_the_same_seed_replays_the_same_rows_and_learns_the_same(ray_session):
    """RLlib's replay buffer draws from an unseeded generator; GazeSAC seeds it from the config's seed."""
    losses = []
    for _ in range(2):
        with running(tiny_sac_config()) as algo:
            learner = [algo.train() for _ in range(2)][-1]["learners"]["default_policy"]
            losses.append((float(learner["qf_loss"]), float(learner["policy_loss"])))
    assert losses[0] == losses[1]
