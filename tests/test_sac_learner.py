"""GazeSACLearner on real RLlib pieces (env runner, episode replay buffer, learner connector, learner), no Ray."""

import numpy as np
import pytest
import torch
from helpers import tiny_sac_config
from ray.rllib.algorithms.sac.sac_learner import QF_LOSS_KEY, QF_PREDS, QF_TWIN_LOSS_KEY, QF_TWIN_PREDS
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.utils.replay_buffers.episode_replay_buffer import EpisodeReplayBuffer

from rllib_gaze import ARMS
from rllib_gaze.results import (
    CONTRASTIVE_LOSS_KEY,
    CONTRASTIVE_MEMORY_FILL_KEY,
    CONTRASTIVE_VALID_ANCHOR_FRAC_KEY,
    GAZE_GRAD_NORM_CONTRASTIVE_KEY,
    GAZE_GRAD_NORM_CRITIC_KEY,
)

MID = "default_policy"


class Trainer:
    """What ``SAC.training_step`` does, in the test's process: sample, store, replay, update."""

    def __init__(self, config):
        self.config = config
        self.runner = SingleAgentEnvRunner(config=config)
        self.learner = config.build_learner(env=self.runner.env.unwrapped)
        self.buffer = EpisodeReplayBuffer(capacity=2000)
        self.buffer.rng = np.random.default_rng(0)  # the same replayed rows in every test run
        self.steps = 0

    def replay(self):
        return self.buffer.sample(num_items=self.config.train_batch_size_per_learner, n_step=1,
                                  gamma=self.config.gamma, sample_episodes=True)

    def batch(self):
        """A post-connector train batch of replayed rows (NEXT_OBS, n_step and weights included)."""
        batch = self.learner._learner_connector(rl_module=self.learner.module, batch={}, episodes=self.replay(),
                                                shared_data={}, metrics=self.learner.metrics)
        return batch[MID]

    def step(self, updates=1):
        episodes = self.runner.sample(num_timesteps=32)
        self.buffer.add(episodes)
        self.steps += sum(len(e) for e in episodes)
        for _ in range(updates):
            results = self.learner.update(episodes=self.replay(),
                                          timesteps={"num_env_steps_sampled_lifetime": self.steps})
        return results[MID]


@pytest.fixture(scope="module")
def trained():
    """A learner after two updates (its memory holds the first) with the contrastive loss on."""
    trainer = Trainer(tiny_sac_config(gaze_lr=1e-3))
    trainer.step(updates=2)
    return trainer


def names_with_grad(module):
    return {name for name, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_an_update_reports_sac_and_the_gaze_objective(trained):
    logged = trained.step()
    for key in (QF_LOSS_KEY, QF_TWIN_LOSS_KEY, "policy_loss", "alpha_loss", CONTRASTIVE_LOSS_KEY,
                CONTRASTIVE_VALID_ANCHOR_FRAC_KEY, GAZE_GRAD_NORM_CRITIC_KEY, GAZE_GRAD_NORM_CONTRASTIVE_KEY,
                "gaze_mu_x_mean", "gaze_sigma_x_mean"):
        assert key in logged, key
    assert logged[CONTRASTIVE_MEMORY_FILL_KEY].peek() > 0 and logged[CONTRASTIVE_VALID_ANCHOR_FRAC_KEY].peek() > 0
    assert logged[GAZE_GRAD_NORM_CRITIC_KEY].peek() == 0.0     # with the contrastive loss on, RL's gradient stops
    assert logged[GAZE_GRAD_NORM_CONTRASTIVE_KEY].peek() > 0.0


def test_contrastive_gradient_reaches_only_the_gaze(trained):
    module, batch = trained.learner.module[MID], trained.batch()
    features = module.forward_train(batch)["pre_attention_features"].detach()
    module.zero_grad()
    loss = trained.learner._contrastive_loss(MID, trained.config, features, torch.randn(features.shape[0]))
    assert loss.item() > 0
    loss.backward()
    moved = names_with_grad(module)
    assert moved and all(name.startswith("gaze.") for name in moved), moved


def test_each_optimizer_gets_the_gradient_of_its_own_loss_only(trained):
    learner, module, batch = trained.learner, trained.learner.module[MID], trained.batch()
    torch.manual_seed(0)
    fwd = module.forward_train(batch)
    loss = learner.compute_loss_for_module(module_id=MID, config=trained.config, batch=batch, fwd_out=fwd)
    grads = learner.compute_gradients({MID: loss})
    params = learner._params
    optimizers = dict(learner.get_optimizers_for_module(MID))
    assert set(optimizers) == {"qf", "qf_twin", "policy", "alpha", "gaze"}

    def optimizer_grads(name):
        return {pid: grads[pid] for pid in learner.filter_param_dict_for_optimizer(params, optimizers[name])}

    # the encoder's gradient is both critics' losses' (as sac_rgbd's single Q optimizer), nothing else's
    torch.manual_seed(0)
    fwd = module.forward_train(batch)
    target = (batch[Columns.REWARDS] + trained.config.gamma * (1.0 - batch[Columns.TERMINATEDS].float())
              * (fwd["q_target_next"] - learner.curr_log_alpha[MID].exp().detach() * fwd["logp_next_resampled"]))
    huber = torch.nn.HuberLoss(delta=1.0)
    critic = huber(fwd[QF_PREDS], target) + huber(fwd[QF_TWIN_PREDS], target)
    conv = module.cnn.head[0].weight
    expected = torch.autograd.grad(critic, conv, retain_graph=True)[0]
    pid = next(pid for pid, p in params.items() if p is conv)
    assert pid in optimizer_grads("qf") and torch.allclose(grads[pid], expected, atol=1e-6)
    # the gaze's optimizer holds the gaze and gets the contrastive loss's gradient (RL's stops at the gaze)
    gaze_grads = optimizer_grads("gaze")
    assert {id(params[pid]) for pid in gaze_grads} == {id(p) for p in module.gaze_parameters()}
    assert any(g.abs().sum() > 0 for g in gaze_grads.values())
    actor = optimizer_grads("policy")
    assert {id(params[pid]) for pid in actor} == {id(p) for p in module.actor_parameters()}


def test_memory_takes_each_update_once_with_the_critics_bellman_target_as_label():
    trainer = Trainer(tiny_sac_config(contrastive_memory_capacity=256))
    trainer.step(updates=3)
    memory = trainer.learner.contrastive_memory(MID)
    assert len(memory) == 3 * 32                                   # three replayed batches of 32 rows
    labels = memory.filled()[2]
    assert labels.std() > 0 and torch.isfinite(labels).all()


def test_value_labels_are_the_critics_detached_q():
    trainer = Trainer(tiny_sac_config(contrastive_return="value"))
    trainer.step(updates=1)
    learner, batch = trainer.learner, trainer.batch()
    fwd = learner.module[MID].forward_train(batch)
    labels = learner._returns(MID, trainer.config, batch, fwd)
    assert not labels.requires_grad and torch.allclose(labels, torch.min(fwd[QF_PREDS], fwd[QF_TWIN_PREDS]))


def test_plain_sac_is_unchanged_by_the_gaze_switches():
    """Plain SAC (no attention, no contrastive loss) with every other gaze setting changed trains
    exactly as with the defaults: the same optimizers and the same parameters after two updates."""
    plain = tiny_sac_config(**ARMS["ppo"])
    switched = tiny_sac_config(**ARMS["ppo"], gaze_lr=5e-2, gaze_floor=0.3, gaze_init_sigma=0.5,
                               contrastive_k=2, contrastive_margin=0.9, contrastive_memory_capacity=64,
                               label_rule="relative", mining_pool=1, contrastive_return="value")
    params = []
    for config in (plain, switched):
        torch.manual_seed(0)
        trainer = Trainer(config)
        trainer.step(updates=2)
        assert {name for name, _ in trainer.learner.get_optimizers_for_module(MID)} == {"qf", "qf_twin", "policy",
                                                                                        "alpha"}
        assert trainer.learner.contrastive_memory(MID) is None
        params.append(trainer.learner.module[MID].state_dict())
    assert params[0].keys() == params[1].keys() and not any("gaze" in k for k in params[0])
    for key in params[0]:
        assert torch.equal(params[0][key], params[1][key]), key


def test_checkpoint_round_trip_keeps_module_optimizers_and_memory(trained, tmp_path):
    learner = trained.learner
    learner.save_to_path(tmp_path / "learner")
    restored = trained.config.build_learner(env=trained.runner.env.unwrapped)
    restored.restore_from_path(tmp_path / "learner")
    for key, value in learner.module[MID].state_dict().items():
        assert torch.equal(value, restored.module[MID].state_dict()[key]), key
    for name, optimizer in learner.get_optimizers_for_module(MID):
        twin = dict(restored.get_optimizers_for_module(MID))[name]
        for state, restored_state in zip(optimizer.state.values(), twin.state.values()):
            assert torch.equal(state["exp_avg"], restored_state["exp_avg"]), name
        assert optimizer.state and len(optimizer.state) == len(twin.state), name
    memory, restored_memory = learner.contrastive_memory(MID), restored.contrastive_memory(MID)
    assert torch.equal(memory.filled()[0], restored_memory.filled()[0])
    assert torch.equal(memory.filled()[2], restored_memory.filled()[2])
    assert torch.equal(learner.curr_log_alpha[MID], restored.curr_log_alpha[MID])


@pytest.mark.gpu
def test_sac_learner_memory_and_mining_live_on_the_learners_gpu():
    trainer = Trainer(tiny_sac_config(gaze_lr=1e-3).learners(num_gpus_per_learner=1))
    logged = trainer.step(updates=2)
    memory = trainer.learner.contrastive_memory(MID)
    assert memory.maps.device.type == "cuda" and memory.keys.device.type == "cuda"
    assert logged[CONTRASTIVE_VALID_ANCHOR_FRAC_KEY].peek() > 0
    assert all(p.device.type == "cuda" for p in trainer.learner.module[MID].parameters())


def test_centred_gaze_input_reads_the_map_minus_the_memorys_mean():
    """gaze_input="centred" (the gaze-sac-centred arm): after an update the module's centre is the
    memory's mean map, travels with the module's state, and the head reads the map minus it."""
    trainer = Trainer(tiny_sac_config(**{k: v for k, v in ARMS["gaze-sac-centred"].items()
                                         if k not in ("attention", "contrastive")}))
    module = trainer.learner.module[MID]
    assert not module.gaze_input_centre.any()                      # nothing learnt yet: raw maps
    trainer.step(updates=2)
    mean_map = trainer.learner.contrastive_memory(MID).filled()[0].mean(0)
    assert torch.allclose(module.gaze_input_centre, mean_map) and mean_map.abs().sum() > 0
    assert np.array_equal(module.get_state()["gaze_input_centre"], module.gaze_input_centre.numpy())
    maps = module.forward_train(trainer.batch())["pre_attention_features"].detach()
    assert torch.allclose(module.gaze_weights(maps)[1], module.gaze.attention_map(maps - mean_map)[1])
    assert not torch.allclose(module.gaze_weights(maps)[1], module.gaze.attention_map(maps)[1])
