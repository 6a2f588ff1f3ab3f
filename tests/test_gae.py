"""GAE from the sampling pass's values (rllib_gaze.gae) against RLlib's own GAE connector pair, on real
env runners, learners and the clutter env; no Ray needed."""

import copy

import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

from rllib_gaze import GazePPOConfig
from rllib_gaze.env_runner import BatchedEnvRunner
from rllib_gaze.gae import BOOTSTRAP_VALUES, SampledValuesGAE, backward_discounted_sum

MID = "default_policy"
# 6-step episodes whose steps of 0.5 reach a target within a few steps: with terminate_on_success and
# bootstrap_at_done=False some chunks end in a termination, others at the time limit (truncated), and
# fragments cut the rest anywhere.
ENV = {"image_size": 32, "num_distractors": 1, "max_episode_steps": 6, "step_size": 0.5, "success_radius": 0.3,
       "terminate_on_success": True, "bootstrap_at_done": False, "seed": 0}
# Uneven fragments of 4 sub-envs (env steps; a reset step is not one), the fifth after a forced reset.
FRAGMENTS = ((8, False), (5, False), (8, False), (4, False), (9, True), (13, False))


def config(runner_cls=BatchedEnvRunner, values_from_sampling=True, **env):
    return (GazePPOConfig()
            .environment("clutter", env_config={**ENV, **env})
            .env_runners(num_env_runners=0, num_envs_per_env_runner=4, rollout_fragment_length=8,
                         gym_env_vectorize_mode="vector_entry_point", env_runner_cls=runner_cls)
            .training(train_batch_size_per_learner=32, minibatch_size=16, num_epochs=1, gamma=0.9, lambda_=0.8,
                      values_from_sampling=values_from_sampling)
            .rl_module(model_config={"conv_filters": ((8, 4, 2), (8, 3, 2)), "head_hidden": 32,
                                     "image_feature_dim": 32})
            .gaze(attention="foveal", contrastive=False)
            .debugging(seed=3))


def connector_batch(learner, episodes) -> dict:
    """The module's train batch the learner's connector pipeline builds from (a copy of) ``episodes``."""
    batch = learner._learner_connector(rl_module=learner.module, batch={}, episodes=copy.deepcopy(episodes),
                                       shared_data={}, metrics=learner.metrics)
    return {k: v for k, v in batch[MID].items()}


def numpy(x):
    return {k: numpy(v) for k, v in x.items()} if isinstance(x, dict) else torch.as_tensor(x).cpu().numpy()


@pytest.mark.parametrize("runner_cls", [BatchedEnvRunner, SingleAgentEnvRunner])
def test_same_advantages_and_value_targets_as_rllibs_gae_connector(runner_cls):
    runner = runner_cls(config=config(runner_cls))
    ours = config(runner_cls).build_learner(env=runner.env.unwrapped)
    rllib = config(runner_cls, values_from_sampling=False).build_learner(env=runner.env.unwrapped)
    # Trained weights (not an initialisation two seeds could share), the same in all three.
    episodes = runner.sample(num_timesteps=32)
    ours.update(episodes=episodes, timesteps={"num_env_steps_sampled_lifetime": 32})
    rllib.module.set_state(ours.module.get_state())
    runner.module.set_state(ours.module[MID].get_state(inference_only=True))
    assert [type(p).__name__ for p in ours._learner_connector.connectors][0] == "SampledValuesGAE"
    assert "GeneralAdvantageEstimation" in [type(p).__name__ for p in rllib._learner_connector.connectors]

    ends, worst = set(), {}
    for n, reset in FRAGMENTS:
        episodes = runner.sample(num_timesteps=n, force_reset=reset)
        ends |= {"terminated" if e.is_terminated else "truncated" if e.is_truncated else "cut" for e in episodes}
        got, want = numpy(connector_batch(ours, episodes)), numpy(connector_batch(rllib, episodes))
        rows = want.pop(Columns.LOSS_MASK)   # RLlib's appended rows are the masked ones: compare the others
        assert Columns.LOSS_MASK not in got and len(got[Columns.REWARDS]) == sum(len(e) for e in episodes)
        for column in (Columns.ACTIONS, Columns.REWARDS, Columns.TERMINATEDS, Columns.TRUNCATEDS, Columns.ACTION_LOGP):
            assert np.array_equal(got[column], want[column][rows]), column
        assert np.array_equal(got[Columns.OBS], want[Columns.OBS][rows])
        # The values: the env runner's forward pass against RLlib's critic pass over the batch.
        assert np.allclose(got[Columns.VF_PREDS], rllib.module[MID].compute_values(
            {Columns.OBS: connector_batch(rllib, episodes)[Columns.OBS]}).numpy()[rows], rtol=0, atol=1e-6)
        for column in (Columns.VALUE_TARGETS, Columns.ADVANTAGES):
            assert np.allclose(got[column], want[column][rows], rtol=1e-6, atol=1e-6), column
            worst[column] = max(worst.get(column, 0.0), float(np.abs(got[column] - want[column][rows]).max()))
        assert got[Columns.ADVANTAGES].std() > 0.1   # standardised over something that varies
    assert ends == {"terminated", "truncated", "cut"}
    print("largest difference to RLlib's connector:", worst)
    runner.stop()


def test_chunk_ends_bootstrap_values_and_a_dropped_appended_row_per_chunk():
    runner = BatchedEnvRunner(config=config())
    learner = config().build_learner(env=runner.env.unwrapped)
    runner.module.set_state(learner.module[MID].get_state(inference_only=True))
    episodes = runner.sample(num_timesteps=32)
    batch = numpy(connector_batch(learner, episodes))
    last = np.cumsum([len(e) for e in episodes]) - 1
    ends = batch[Columns.TERMINATEDS] | batch[Columns.TRUNCATEDS]
    assert np.flatnonzero(ends).tolist() == last.tolist()   # every chunk's last row, a cut one included
    assert not (batch[Columns.TERMINATEDS] & batch[Columns.TRUNCATEDS]).any()
    final = learner.module[MID].compute_values(
        {Columns.OBS: torch.as_tensor(np.stack([e.get_observations(-1) for e in episodes]))}).numpy()
    want = np.where([e.is_terminated for e in episodes], 0.0, final)
    assert np.allclose(batch[BOOTSTRAP_VALUES][last], want, atol=1e-6)
    assert not np.delete(batch[BOOTSTRAP_VALUES], last).any()
    # One update's minibatches go over the sampled rows only: RLlib's pair adds a row per chunk, and with
    # it the rows of a whole extra minibatch per epoch here.
    trained = {}
    for values_from_sampling in (True, False):
        cfg = config(values_from_sampling=values_from_sampling)
        result = cfg.build_learner(env=runner.env.unwrapped).update(
            episodes=copy.deepcopy(episodes), num_epochs=2, minibatch_size=16,
            timesteps={"num_env_steps_sampled_lifetime": 32})
        trained[values_from_sampling] = result[MID]["num_module_steps_trained"]
    assert trained[True] == 2 * 32 and trained[False] > 2 * 32, trained
    runner.stop()


def test_the_critic_stays_on_the_env_runners_only_when_it_gives_the_values():
    for values_from_sampling in (True, False):
        runner = SingleAgentEnvRunner(config=config(SingleAgentEnvRunner, values_from_sampling))
        assert hasattr(runner.module, "vf") is values_from_sampling
        (episode, *_) = runner.sample(num_timesteps=8)
        assert (Columns.VF_PREDS in episode.extra_model_outputs) is values_from_sampling
        runner.stop()


def test_episodes_without_sampled_values_are_refused_naming_the_setting():
    runner = BatchedEnvRunner(config=config(values_from_sampling=False))
    learner = config().build_learner(env=runner.env.unwrapped)
    with pytest.raises(ValueError, match=r"vf_preds.*values_from_sampling=False"):
        connector_batch(learner, runner.sample(num_timesteps=8))
    runner.stop()


@pytest.mark.parametrize("setting, message", [
    ({"values_from_sampling": "yes"}, "must be True or False"),
])
def test_bad_values_from_sampling_settings_fail_validation(setting, message):
    with pytest.raises(ValueError, match=message):
        config().training(**setting).validate()


def test_model_config_cannot_disagree_with_the_setting():
    with pytest.raises(ValueError, match="disagrees with .training"):
        config().rl_module(model_config={"values_from_sampling": False}).validate()
    assert GazePPOConfig().values_from_sampling is True
    assert GazePPOConfig().model_config["values_from_sampling"] is True


def test_backward_discounted_sum_is_the_row_loop():
    rng = np.random.default_rng(0)
    value, coeff = rng.normal(size=97), rng.uniform(0, 1, 97) * (rng.uniform(size=97) > 0.2)
    want, x = np.zeros(97), 0.0
    for t in reversed(range(97)):
        want[t] = x = value[t] + coeff[t] * x
    assert np.allclose(backward_discounted_sum(torch.from_numpy(value), torch.from_numpy(coeff)).numpy(), want,
                       rtol=1e-12, atol=1e-12)


def test_the_piece_replaces_rllibs_pair_only_when_asked():
    names = {flag: [type(p).__name__ for p in config(values_from_sampling=flag).build_learner(
        env=BatchedEnvRunner(config=config()).env.unwrapped)._learner_connector.connectors] for flag in (True, False)}
    assert names[True][0] == SampledValuesGAE.__name__
    assert not {"AddOneTsToEpisodesAndTruncate", "GeneralAdvantageEstimation"} & set(names[True])
    assert names[False][0] == "AddOneTsToEpisodesAndTruncate" and names[False][-1] == "GeneralAdvantageEstimation"
