import pytest
from ray.rllib.algorithms.ppo import PPOConfig
from ray.tune.registry import get_trainable_cls

from rllib_gaze import GazePPO, GazePPOConfig
from rllib_gaze.gaze import GAZE_DEFAULTS
from rllib_gaze.learner import GazePPOLearner
from rllib_gaze.module import DEFAULT_MODEL_CONFIG, GazePPOModule


def test_defaults_mirror_ppo_rgb():
    c = GazePPOConfig()
    assert (c.lr, c.gamma, c.lambda_, c.clip_param, c.num_epochs) == (3e-4, 0.8, 0.9, 0.2, 4)
    assert (c.entropy_coeff, c.vf_loss_coeff, c.grad_clip, c.use_kl_loss) == (0.0, 0.25, 0.5, False)
    assert (c.num_envs_per_env_runner, c.rollout_fragment_length) == (512, 50)
    assert c.train_batch_size_per_learner == 25_600 and c.minibatch_size == 800
    assert c.adam_eps == 1e-5


def test_config_and_module_take_the_gaze_defaults_from_one_place():
    c = GazePPOConfig()
    assert {key: getattr(c, key) for key in GAZE_DEFAULTS} == GAZE_DEFAULTS
    assert {key: DEFAULT_MODEL_CONFIG[key] for key in GAZE_DEFAULTS} == GAZE_DEFAULTS
    assert {key: c.model_config[key] for key in GAZE_DEFAULTS} == {
        **GAZE_DEFAULTS, "gaze_rl_gradient": False}  # None resolved: the contrastive loss trains the gaze


def test_adam_eps_is_a_training_setting():
    c = GazePPOConfig().training(adam_eps=1e-4, lr=1e-3)
    assert (c.adam_eps, c.lr) == (1e-4, 1e-3)
    with pytest.raises(TypeError, match="adam_eps"):
        GazePPOConfig().gaze(adam_eps=1e-4)
    with pytest.raises(ValueError, match=r"adam_eps=0.0 must be > 0"):
        GazePPOConfig().environment("clutter").training(adam_eps=0.0).validate()


def test_plain_ppo_arm_differs_only_in_the_gaze_settings():
    gaze = GazePPOConfig().to_dict()
    plain = GazePPOConfig().gaze(attention="none", contrastive=False).to_dict()
    differing = {k for k in gaze if gaze[k] != plain[k]}
    assert differing == {"attention", "contrastive"}


def test_attention_reaches_the_module_through_model_config():
    c = GazePPOConfig().gaze(attention="patch", gaze_floor=0.1)
    assert c.model_config["attention"] == "patch" and c.model_config["gaze_floor"] == 0.1
    assert c.get_default_rl_module_spec().module_class is GazePPOModule
    assert c.get_default_learner_class() is GazePPOLearner


def test_registered_for_tune_by_name():
    assert get_trainable_cls("GazePPO") is GazePPO
    assert isinstance(GazePPO.get_default_config(), PPOConfig)


@pytest.mark.parametrize("options, message", [
    ({"attention": "spotlight"},
     r"attention='spotlight' is not known; allowed values are \('foveal', 'patch', 'oracle', 'centre', 'none'\)"),
    ({"attention": "oracle", "contrastive": True}, r"contrastive=True needs a trainable attention.*attention='oracle'"),
    ({"gaze_normalization": "sum"}, r"gaze_normalization='sum' is not known; allowed values are \('peak', 'mean'\)"),
    ({"gaze_head_init_std": 0.0}, r"gaze_head_init_std=0.0 must be > 0"),
    ({"gaze_oracle_sigma": -1.0}, r"gaze_oracle_sigma=-1.0 must be > 0"),
    ({"gaze_centre": "peak"}, r"gaze_centre='peak' is not known; allowed values are \('mlp', 'soft_argmax'\)"),
    ({"gaze_rl_gradient": False, "contrastive": False},
     r"gaze_rl_gradient=False with contrastive=False leaves the foveal gaze untrained"),
    ({"gaze_lr": 0.0}, r"gaze_lr=0.0 must be > 0 \(or None"),
    ({"gaze_adam_eps": 0.0}, r"gaze_adam_eps=0.0 must be > 0"),
    ({"contrastive_similarity": "dot"},
     r"contrastive_similarity='dot' is not known; allowed values are \('map', 'centred_map', 'glimpse'\)"),
    ({"contrastive_triplet_gaze": "both"},
     r"contrastive_triplet_gaze='both' is not known; allowed values are \('anchor', 'each'\)"),
    ({"contrastive_return": "episode"},
     r"contrastive_return=.episode. is not known; allowed values are \(.value_target., .value., .return_to_go.\)"),
    ({"contrastive_gamma": 1.5}, r"contrastive_gamma=1.5 must be in \[0, 1\]"),
    ({"contrastive_margin": -0.1}, r"contrastive_margin=-0.1 must be >= 0"),
    ({"attention": "none", "contrastive": True}, r"contrastive=True needs a trainable attention"),
    ({"contrastive_k": 0}, r"contrastive_k=0 must be >= 1"),
    ({"contrastive_memory_capacity": 100, "contrastive_num_anchors": 256},
     r"contrastive_memory_capacity=100 is smaller than one triplet batch \(contrastive_num_anchors=256\)"),
    ({"return_quantile": 1.0}, r"return_quantile=1.0 must be in the open interval \(0, 1\)"),
    ({"return_quantile": 0.0}, r"return_quantile=0.0 must be in the open interval \(0, 1\)"),
    ({"label_rule": "median"},
     r"label_rule='median' is not known; allowed values are \('threshold', 'above', 'relative'\)"),
    ({"gaze_floor": 1.0}, r"gaze_floor=1.0 must be in \[0, 1\)"),
    ({"contrastive_coeff": -1.0}, r"contrastive_coeff=-1.0 must be >= 0"),
    ({"mining_pool": 0}, r"mining_pool=0 must be an integer >= 1"),
    ({"contrastive_objective": "fixate"}, r"contrastive_objective='fixate' is not known; allowed values are"),
    ({"contrastive_objective": "fixation", "attention": "patch"},
     r"contrastive_objective='fixation' moves a foveal gaze's centre; attention='patch' has none"),
    ({"fixation_pools": (1, 2)}, r"fixation_pools=\(1, 2\) must be a non-empty tuple of odd integers >= 1"),
    ({"fixation_pools": ()}, r"fixation_pools=\(\) must be a non-empty tuple"),
    ({"gaze_input": "raw"}, r"gaze_input='raw' is not known; allowed values are \('map', 'centred'\)"),
    ({"gaze_input": "centred", "contrastive": False},
     r"gaze_input='centred' needs contrastive=True .*got contrastive=False, attention='foveal'"),
])
def test_bad_gaze_options_fail_validation_naming_the_value(options, message):
    config = GazePPOConfig().environment("clutter").gaze(**options)
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_attention_set_behind_gaze_s_back_is_refused():
    config = GazePPOConfig().environment("clutter").rl_module(model_config={"attention": "patch"})
    disagreement = r"model_config\['attention'\]='patch' disagrees with .gaze\(attention='foveal'\)"
    with pytest.raises(ValueError, match=disagreement):
        config.validate()


def test_good_options_validate():
    GazePPOConfig().environment("clutter").gaze(attention="patch", label_rule="relative").validate()
    GazePPOConfig().environment("clutter").gaze(attention="none", contrastive=False).validate()
