"""The augmentation baselines: DrQ-v2's random shift, DrAC's regularisers in GazePPOLearner and DrQ's
augmented replay in GazeSACLearner, on real RLlib pieces (env runner, learner connector, learner), no Ray."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config, tiny_sac_config
from ray.rllib.algorithms.sac.sac_learner import QF_PREDS
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import POLICY_LOSS_KEY, VF_LOSS_KEY
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from test_sac_learner import Trainer

from rllib_gaze import ARMS
from rllib_gaze.augmentation import augment_observations, random_shift, shift_pad
from rllib_gaze.gaze import GAZE_PARAM_NAMES
from rllib_gaze.results import DRAC_POLICY_LOSS_KEY, DRAC_VALUE_LOSS_KEY, gaze_param_key

MID = "default_policy"


def crops(image: torch.Tensor, pad_h: int, pad_w: int) -> list[torch.Tensor]:
    """Every whole-pixel crop of ``image (H, W, C)`` padded by repeating its border: what a shift may give."""
    h, w, _ = image.shape
    padded = F.pad(image.permute(2, 0, 1)[None].float(), (pad_w, pad_w, pad_h, pad_h), mode="replicate")[0]
    return [padded[:, dy:dy + h, dx:dx + w].permute(1, 2, 0) for dy in range(2 * pad_h + 1)
            for dx in range(2 * pad_w + 1)]


def test_the_pad_is_drqv2s_4_pixels_at_84_scaled_to_the_image():
    assert [shift_pad(size) for size in (84, 96, 128, 48, 16)] == [4, 5, 6, 2, 1]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_each_image_is_a_whole_pixel_shift_of_itself_drawn_per_image(dtype):
    images = torch.randint(0, 256, (64, 24, 20, 3), generator=torch.Generator().manual_seed(0)).to(dtype)
    before = images.clone()
    shifted = random_shift(images, generator=torch.Generator().manual_seed(1))
    assert shifted.shape == images.shape and shifted.dtype == dtype and torch.equal(images, before)
    offsets = []
    for image, out in zip(images, shifted):
        matches = [i for i, crop in enumerate(crops(image, shift_pad(24), shift_pad(20)))
                   if torch.equal(crop.to(dtype), out)]
        assert matches, "not a crop of the replicate-padded image"
        offsets.append(matches[0])
    assert len(set(offsets)) > 5   # a different shift for different images of one batch


def test_only_the_images_of_an_observation_dict_are_shifted():
    obs = {"rgb": torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8), "state": torch.rand(8, 2),
           "target": torch.rand(8, 2)}
    out = augment_observations(obs, "shift")
    assert out["state"] is obs["state"] and out["target"] is obs["target"]
    assert out["rgb"] is not obs["rgb"] and not torch.equal(out["rgb"], obs["rgb"])
    assert augment_observations(obs, "none") is obs
    with pytest.raises(ValueError, match="needs image observations"):
        augment_observations({"state": obs["state"]}, "shift")


def ppo_learner_and_batch(config):
    """A GazePPOLearner and one post-connector train batch (GAE included) of 128 env steps."""
    runner = SingleAgentEnvRunner(config=config)
    learner = config.build_learner(env=runner.env.unwrapped)
    episodes = runner.sample(num_timesteps=128)
    batch = learner._learner_connector(rl_module=learner.module, batch={}, episodes=copy.deepcopy(episodes),
                                       shared_data={}, metrics=learner.metrics)[MID]
    return learner, batch


def peek(learner, key: str) -> float:
    """The learner's latest value of metric ``key`` of the module."""
    value = learner.metrics.peek((MID, key))
    return float(value.detach() if isinstance(value, torch.Tensor) else value)


def masked_mean(values, batch):
    """Mean over the rows the loss counts (all rows: GAE from the sampling pass adds no masked ones)."""
    mask = batch.get(Columns.LOSS_MASK)
    return values.mean() if mask is None else values[mask].mean()


def test_drac_keeps_ppo_on_the_clean_observations_and_regularises_on_shifted_ones():
    config = tiny_config(**ARMS["drac"], aug_coef=0.5)
    learner, batch = ppo_learner_and_batch(config)
    module = learner.module[MID]
    clean = batch[Columns.OBS].clone()
    plain = config.copy(copy_frozen=False).gaze(augmentation="none")
    with torch.no_grad():   # PPO's terms on the clean observations, with the weights before the step
        learner.compute_loss_for_module(module_id=MID, config=plain, batch=batch, fwd_out=module.forward_train(batch))
    expected_ppo = [peek(learner, key) for key in (POLICY_LOSS_KEY, VF_LOSS_KEY)]
    # DrAC's regularisers from the same draws (the shift first, then a' ~ pi(.|s)), by hand
    torch.manual_seed(5)
    with torch.no_grad():
        shifted = random_shift(batch[Columns.OBS])
        fwd, fwd_shifted = module.forward_train(batch), module.forward_train({Columns.OBS: shifted})
        dist = module.get_train_action_dist_cls()
        actions = dist.from_logits(fwd[Columns.ACTION_DIST_INPUTS]).sample()
        expected_policy = masked_mean(-dist.from_logits(fwd_shifted[Columns.ACTION_DIST_INPUTS]).logp(actions), batch)
        expected_value = masked_mean(0.5 * (module.compute_values(batch, fwd[Columns.EMBEDDINGS])
                                            - module.compute_values({}, fwd_shifted[Columns.EMBEDDINGS])) ** 2, batch)

    torch.manual_seed(5)
    learner._update({MID: batch})   # one gradient step of RLlib's update: forward pass, losses, step

    logged = {key: peek(learner, key) for key in (POLICY_LOSS_KEY, VF_LOSS_KEY, DRAC_POLICY_LOSS_KEY,
                                                  DRAC_VALUE_LOSS_KEY)}
    assert torch.equal(batch[Columns.OBS], clean)          # the batch was not augmented in place
    # PPO's ratio and value loss read the clean observations the rollout was sampled with
    assert [logged[POLICY_LOSS_KEY], logged[VF_LOSS_KEY]] == pytest.approx(expected_ppo, rel=1e-5, abs=1e-7)
    # the regularisers read shifted ones: identical observations would give a zero value term
    assert logged[DRAC_POLICY_LOSS_KEY] == pytest.approx(float(expected_policy), rel=1e-5)
    assert logged[DRAC_VALUE_LOSS_KEY] == pytest.approx(float(expected_value), rel=1e-4)
    assert logged[DRAC_VALUE_LOSS_KEY] > 0


def test_drac_adds_aug_coef_times_its_regularisers_to_the_ppo_loss():
    config = tiny_config(**ARMS["drac"], aug_coef=0.5)
    learner, batch = ppo_learner_and_batch(config)
    fwd = learner.module[MID].forward_train(batch)
    total = learner.compute_loss_for_module(module_id=MID, config=config, batch=batch, fwd_out=fwd)
    regularisers = sum(peek(learner, key) for key in (DRAC_POLICY_LOSS_KEY, DRAC_VALUE_LOSS_KEY))
    plain = learner.compute_loss_for_module(module_id=MID, config=config.copy(copy_frozen=False).gaze(aug_coef=0.0),
                                            batch=batch, fwd_out=fwd)
    assert float((total - plain).detach()) == pytest.approx(0.5 * regularisers, rel=1e-5)


def test_gaze_drac_measures_the_gaze_on_the_clean_observations():
    config = tiny_config(**ARMS["gaze-drac"], gaze_head_init_std=0.5)
    learner, batch = ppo_learner_and_batch(config)
    module = learner.module[MID]
    with torch.no_grad():
        clean = module.gaze_weights(module.feature_map(batch[Columns.OBS]))[1].mean(0)
        shifted = module.gaze_weights(module.feature_map(random_shift(batch[Columns.OBS])))[1].mean(0)
    learner._update({MID: batch})
    logged = [peek(learner, gaze_param_key(name, "mean")) for name in GAZE_PARAM_NAMES]
    assert logged == pytest.approx(clean.tolist(), rel=1e-6, abs=1e-7)
    assert (shifted - clean).abs().max() > 1e-5   # which the shifted observations' would not match


@pytest.fixture(scope="module")
def drq():
    """A GazeSACLearner of the gaze-drq-sac arm with a replay buffer of 32 env steps, and a replayed batch."""
    trainer = Trainer(tiny_sac_config(**ARMS["gaze-drq-sac"], gaze_head_init_std=0.5))
    trainer.buffer.add(trainer.runner.sample(num_timesteps=32))
    return trainer, trainer.batch()


def test_drq_trains_every_sac_loss_on_shifted_obs_and_next_obs(drq):
    trainer, batch = drq
    learner = trainer.learner
    module = learner.module[MID]
    clean, clean_next = batch[Columns.OBS]["rgb"].clone(), batch[Columns.NEXT_OBS]["rgb"].clone()
    # the forward pass on observations shifted by the same draws (obs first, then next_obs), by hand
    torch.manual_seed(3)
    shifted = {**batch, Columns.OBS: augment_observations(batch[Columns.OBS], "shift"),
               Columns.NEXT_OBS: augment_observations(batch[Columns.NEXT_OBS], "shift")}
    with torch.no_grad():
        expected = module.forward_train(shifted)
        unshifted = module.forward_train(batch)
        clean_gaze = module.gaze_weights(module.feature_map(batch[Columns.OBS]), batch[Columns.OBS])[1].mean(0)
    torch.manual_seed(3)
    fwd_out = learner._update({MID: batch})[0][MID]   # one gradient step of RLlib's update

    assert torch.equal(batch[Columns.OBS]["rgb"], clean) and torch.equal(batch[Columns.NEXT_OBS]["rgb"], clean_next)
    for key in (QF_PREDS, "q_target_next", "logp_resampled", Columns.ACTION_DIST_INPUTS):  # critic, target, actor
        assert torch.allclose(fwd_out[key], expected[key], atol=1e-5), key
    assert not torch.allclose(fwd_out[QF_PREDS], unshifted[QF_PREDS], atol=1e-5)
    # the gaze's metrics are of the clean observations
    logged = [peek(learner, gaze_param_key(name, "mean")) for name in GAZE_PARAM_NAMES]
    assert logged == pytest.approx(clean_gaze.tolist(), rel=1e-6, abs=1e-7)
    assert (expected["gaze_params"].mean(0) - clean_gaze).abs().max() > 1e-5   # which differ from the shifted
