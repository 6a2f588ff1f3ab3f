"""One finiteness check per gradient step (rllib_gaze.gradients), on a real GazePPOLearner and batch."""

import logging
import math

import pytest
import torch
from helpers import tiny_config
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core import ALL_MODULES
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.policy.sample_batch import SampleBatch
from ray.rllib.utils.torch_utils import clip_gradients

from rllib_gaze.results import NONFINITE_GRADIENT_STEPS_KEY

MID = "default_policy"
TIMESTEPS = {"num_env_steps_sampled_lifetime": 128}


def learner_and_batch(config):
    """A learner after one clean update (Adam has moments to keep) and a fresh 128-row train batch."""
    runner = SingleAgentEnvRunner(config=config)
    learner = config.build_learner(env=runner.env.unwrapped)
    learner.update(episodes=runner.sample(num_timesteps=128), timesteps=TIMESTEPS)
    batch = learner._learner_connector(rl_module=learner.module, batch={}, episodes=runner.sample(num_timesteps=128),
                                       shared_data={}, metrics=learner.metrics)[MID]
    runner.stop()
    return learner, batch


def poisoned(batch: dict, value: float) -> SampleBatch:
    """``batch`` with one row's advantage set to ``value``: its PPO loss, and so the gradients of the
    policy and the encoder, become NaN or inf."""
    batch = dict(batch)
    batch[Columns.ADVANTAGES] = batch[Columns.ADVANTAGES].clone()
    batch[Columns.ADVANTAGES][3] = value
    return SampleBatch(batch)


def weights(learner) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in learner.module[MID].named_parameters()}


def adam_moments(learner) -> list[torch.Tensor]:
    return [t.clone() for _, optim in learner.get_optimizers_for_module(MID)
            for state in optim.state.values() for t in state.values()]


@pytest.mark.parametrize("arm", [{"attention": "none", "contrastive": False}, {}], ids=["ppo", "full method"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nonfinite_gradient_skips_the_step_and_says_so(arm, bad, caplog):
    learner, batch = learner_and_batch(tiny_config(**arm))
    before, moments = weights(learner), adam_moments(learner)
    assert moments   # one Adam step was taken: there are moments to keep
    with caplog.at_level(logging.WARNING, logger="ray.rllib"):
        # one minibatch per epoch: every step sees the bad row
        results = learner.update(batch=poisoned(batch, bad), num_epochs=2, minibatch_size=128, timesteps=TIMESTEPS)
    assert results[ALL_MODULES][NONFINITE_GRADIENT_STEPS_KEY].peek() == 2
    after = weights(learner)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(torch.equal(a, b) for a, b in zip(moments, adam_moments(learner)))
    warnings = [r.getMessage() for r in caplog.records if "skipped a gradient step" in r.getMessage()]
    assert len(warnings) == 2 and f"{MID}/cnn.0.weight" in warnings[0], warnings   # names the gradients
    # the same learner on the clean batch: its steps are taken, none skipped (a learner reports each
    # update's count; the Algorithm's results sum them over the run)
    results = learner.update(batch=SampleBatch(batch), num_epochs=2, minibatch_size=128, timesteps=TIMESTEPS)
    assert results[ALL_MODULES][NONFINITE_GRADIENT_STEPS_KEY].peek() == 0
    changed = weights(learner)
    assert any(not torch.equal(after[name], changed[name]) for name in after)
    assert all(torch.isfinite(w).all() for w in changed.values())


def test_without_the_check_rllibs_switch_applies_a_nan_gradient():
    # Why the check: RLlib 2.60's torch_skip_nan_gradients=True (GazePPOConfig's default, which turns its
    # per-parameter checks off) checks nothing itself, and the NaN reaches the weights.
    config = tiny_config(attention="none", contrastive=False).learners(learner_class=PPOTorchLearner)
    assert config.torch_skip_nan_gradients is True
    learner, batch = learner_and_batch(config)
    learner.update(batch=poisoned(batch, math.nan), num_epochs=1, minibatch_size=128, timesteps=TIMESTEPS)
    assert not all(torch.isfinite(w).all() for w in weights(learner).values())


def test_the_clip_is_rllibs_and_keeps_the_norms_rllib_makes_finite():
    learner, _ = learner_and_batch(tiny_config(attention="none", contrastive=False))
    generator = torch.Generator().manual_seed(0)
    grads = {i: torch.randn(shape, generator=generator) * 3 for i, shape in enumerate([(5, 4), (7,), (3, 3, 2)])}
    ours, rllibs = ({k: g.clone() for k, g in grads.items()} for _ in range(2))
    learner._gradient_norms = []
    total = learner._clip(ours, grad_clip=0.5, grad_clip_by="global_norm")
    assert torch.equal(total, clip_gradients(rllibs, grad_clip=0.5, grad_clip_by="global_norm"))
    assert all(torch.equal(ours[k], rllibs[k]) for k in grads)
    assert torch.linalg.vector_norm(torch.cat([g.flatten() for g in ours.values()])) == pytest.approx(0.5, rel=1e-5)
    grads[1][2] = math.nan
    learner._gradient_norms = []
    assert math.isfinite(clip_gradients({k: g.clone() for k, g in grads.items()}, grad_clip=0.5,
                                        grad_clip_by="global_norm"))          # RLlib's norm hides the NaN
    learner._clip(grads, grad_clip=0.5, grad_clip_by="global_norm")
    assert torch.isnan(learner._gradient_norms[0][1]) and torch.isfinite(learner._gradient_norms[0][[0, 2]]).all()
