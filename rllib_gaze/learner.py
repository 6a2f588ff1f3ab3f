"""GazePPOLearner: RLlib's PPO loss, unchanged, plus the return-guided contrastive loss on the gaze.

Per training iteration:
  1. the learner connector builds the train batch (GAE value targets included; with
     ``values_from_sampling``, the default, from the env runner's values, ``rllib_gaze.gae``, and
     without RLlib's appended loss-masked row per episode chunk);
  2. every minibatch: PPO loss on the module's forward pass; anchors from the minibatch's
     pre-attention maps are mined against the memory of *earlier* iterations, and the triplet
     loss on gaze-attended maps is added. Its inputs are detached, so its gradient reaches only
     the gaze's parameters; PPO's gradient trains everything, the gaze included;
  3. after the last minibatch, this iteration's maps and returns (each row once, from the first
     epoch) enter the memory.
The memory, mining, loss and checkpointing are ``ContrastiveGazeLearnerMixin``'s (shared with
GazeSACLearner); this module adds PPO's labels, optimizers, the gaze-predict objective and DrAC's
regularisers (``.gaze(augmentation=...)``, the ``drac`` arms). A gradient step with a NaN/inf
gradient is skipped after one check (``FiniteGradientsMixin``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.connectors.learner import AddOneTsToEpisodesAndTruncate, GeneralAdvantageEstimation
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.annotations import override
from ray.rllib.utils.typing import ModuleID, TensorType

from rllib_gaze.augmentation import augment_observations
from rllib_gaze.config import GazePPOConfig
from rllib_gaze.contrastive import chunk_return_to_go, chunk_steps, discounted_return_to_go
from rllib_gaze.contrastive_learner import EPISODE_CHUNK, EPISODE_STEP, ContrastiveGazeLearnerMixin
from rllib_gaze.gae import BOOTSTRAP_VALUES, SampledValuesGAE
from rllib_gaze.gradients import FiniteGradientsMixin
from rllib_gaze.module import GAZE_PARAMS, PRE_ATTENTION_FEATURES
from rllib_gaze.results import (
    DRAC_POLICY_LOSS_KEY,
    DRAC_VALUE_LOSS_KEY,
    GAZE_GRAD_NORM_PPO_KEY,
    GAZE_PREDICT_LOSS_KEY,
)
from rllib_gaze.rollout import Rollout, RolloutMinibatches, pin_learner_batches, rollout_batch

# Train-batch column of the discounted return-to-go (contrastive_return="return_to_go").
CONTRASTIVE_RETURNS = "contrastive_returns"


class GazePPOLearner(FiniteGradientsMixin, ContrastiveGazeLearnerMixin, PPOTorchLearner):
    """PPOTorchLearner + a per-module feature/return memory and the triplet loss on the gaze
    (``ContrastiveGazeLearnerMixin``), labelled by PPO's returns (``contrastive_return``).

    Reads its settings from ``GazePPOConfig`` (``config.contrastive_*``, ``config.return_*``,
    ``config.values_from_sampling``).
    """

    @override(PPOTorchLearner)
    def build(self) -> None:
        super().build()
        # PPOLearner.build put RLlib's GAE pair around the default pipeline (only when the defaults are
        # in it); values_from_sampling puts one piece in their place.
        pipeline = self._learner_connector
        if (self.config.values_from_sampling and pipeline is not None
                and self.config.add_default_connectors_to_learner_pipeline):
            pipeline.remove(AddOneTsToEpisodesAndTruncate)
            pipeline.remove(GeneralAdvantageEstimation)
            pipeline.prepend(SampledValuesGAE(gamma=self.config.gamma, lambda_=self.config.lambda_))
        if pipeline is not None and self._device.type == "cuda" and not self.config.is_multi_agent:
            # episodes from remote env runners: concatenated into pinned memory, copied to the GPU async
            pin_learner_batches(pipeline)

    @override(PPOTorchLearner)
    def configure_optimizers_for_module(self, module_id: ModuleID, config: GazePPOConfig) -> None:
        gaze_ids = self._register_gaze_optimizer(module_id, config)
        params = [p for p in self.get_parameters(self._module[module_id]) if id(p) not in gaze_ids]
        self.register_optimizer(
            module_id=module_id,
            optimizer=torch.optim.Adam(params, eps=config.adam_eps),
            params=params,
            lr_or_lr_schedule=config.lr,
        )

    @override(PPOTorchLearner)
    def _create_iterator_if_necessary(self, *, training_data, num_total_minibatches: int = 0, num_epochs: int = 1,
                                      minibatch_size: int | None = None, shuffle_batch_per_epoch: bool = False,
                                      **kwargs):
        rollout = training_data.batch
        if not isinstance(rollout, Rollout):
            return super()._create_iterator_if_necessary(
                training_data=training_data, num_total_minibatches=num_total_minibatches, num_epochs=num_epochs,
                minibatch_size=minibatch_size, shuffle_batch_per_epoch=shuffle_batch_per_epoch, **kwargs)
        # rollout="device" (rllib_gaze.rollout): the train batch without its observations, which stay in
        # the rollout's buffers and are gathered per minibatch.
        batch = self._make_batch_if_necessary(training_data)
        (module_id, columns), = batch.policy_batches.items()
        return RolloutMinibatches(module_id, dict(columns), rollout.obs, self._rollout_obs_rows.pop(module_id),
                                  num_epochs=num_epochs, minibatch_size=minibatch_size,
                                  shuffle=shuffle_batch_per_epoch and num_epochs > 1,
                                  num_total_minibatches=num_total_minibatches)

    def _make_batch_if_necessary(self, training_data):
        if isinstance(training_data.batch, Rollout):
            config = self.config.get_config_for_module(DEFAULT_MODULE_ID)
            columns, obs_rows = rollout_batch(training_data.batch, self._gaze_module(DEFAULT_MODULE_ID), config.gamma,
                                              config.lambda_, self._device)
            self._rollout_obs_rows = {DEFAULT_MODULE_ID: obs_rows}
            training_data = copy.copy(training_data)
            training_data.batch = MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(columns)},
                                                  env_steps=len(columns[Columns.REWARDS]))
        batch = super()._make_batch_if_necessary(training_data)
        for module_id, module_batch in batch.policy_batches.items():
            config = self.config.get_config_for_module(module_id)
            if config.contrastive and config.contrastive_return == "return_to_go":
                module_batch[CONTRASTIVE_RETURNS] = self._return_to_go(module_id, config, module_batch)
            if config.contrastive and config.mining == "episode":
                # columns, so they follow the rows into shuffled minibatches
                module_batch[EPISODE_CHUNK], module_batch[EPISODE_STEP] = chunk_steps(_chunk_ends(module_batch))
        return batch

    def _return_to_go(self, module_id: ModuleID, config: GazePPOConfig, batch: dict[str, Any]) -> torch.Tensor:
        """``(N,)`` discounted return-to-go with ``contrastive_gamma``, bootstrapped from the critic's
        V after each episode chunk's last step: the learner connector's ``BOOTSTRAP_VALUES``
        (``chunk_return_to_go``), or, in RLlib's layout, V at the extra row that ends each chunk
        (``discounted_return_to_go``)."""
        rewards = torch.as_tensor(batch[Columns.REWARDS])
        if Columns.LOSS_MASK not in batch:
            return chunk_return_to_go(rewards, _chunk_ends(batch), torch.as_tensor(batch[BOOTSTRAP_VALUES]),
                                      config.contrastive_gamma).to(rewards.device)
        mask = torch.as_tensor(batch[Columns.LOSS_MASK]).bool()
        ends = (~mask).nonzero().squeeze(1)
        bootstrap = torch.zeros(rewards.shape[0], device=rewards.device)
        if ends.numel():
            obs = batch[Columns.OBS]
            end_obs = {k: v[ends] for k, v in obs.items()} if isinstance(obs, dict) else obs[ends]
            with torch.no_grad():
                bootstrap[ends] = self._gaze_module(module_id).compute_values({Columns.OBS: end_obs}).float()
        return discounted_return_to_go(rewards, torch.as_tensor(batch[Columns.TERMINATEDS]), mask, bootstrap,
                                       config.contrastive_gamma).to(rewards.device)

    @override(PPOTorchLearner)
    def compute_loss_for_module(self, *, module_id: ModuleID, config: GazePPOConfig, batch: dict[str, Any],
                                fwd_out: dict[str, TensorType]) -> TensorType:
        loss = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        if GAZE_PARAMS in fwd_out:
            self._log_gaze_stats(module_id, fwd_out[GAZE_PARAMS].detach(), batch[Columns.OBS])
            # Zero that ties every gaze parameter to the loss: with RL's gradient stopped at the
            # gaze and no triplet yet, DDP (num_learners > 1) would otherwise see unused parameters.
            loss = loss + 0.0 * fwd_out[GAZE_PARAMS].sum()
        if config.gaze_predict_coeff > 0:
            loss = loss + config.gaze_predict_coeff * self._predict_loss(module_id, batch, fwd_out)
        if config.augmentation != "none":
            loss = loss + config.aug_coef * self._drac_loss(module_id, config, batch, fwd_out)
        if not config.contrastive:
            return loss
        returns = self._returns(module_id, config, batch, fwd_out)
        contrastive = self._contrastive_term(module_id, config, batch, fwd_out, returns,
                                             rl_losses={GAZE_GRAD_NORM_PPO_KEY: loss})
        return loss + config.contrastive_coeff * contrastive

    def _drac_loss(self, module_id: ModuleID, config: GazePPOConfig, batch: dict, fwd_out: dict) -> torch.Tensor:
        """DrAC's regularisers (Raileanu et al. 2021) on this minibatch: ``-log pi(a'|f(s))`` with
        ``a' ~ pi(.|s)`` and ``0.5 (V(s) - V(f(s)))^2``, ``a'`` and ``V(s)`` from the clean forward pass
        (``fwd_out``) and detached, means over the unmasked rows. ``f`` is a fresh augmentation of the
        minibatch's observations (drawn first, then ``a'``); the batch itself stays clean, so PPO's
        ratio and value loss read the observations the rollout was sampled with."""
        module = self._gaze_module(module_id)
        augmented = {Columns.OBS: augment_observations(batch[Columns.OBS], config.augmentation)}
        dist_cls = module.get_train_action_dist_cls()
        with torch.no_grad():
            actions = dist_cls.from_logits(fwd_out[Columns.ACTION_DIST_INPUTS]).sample()
            values = module.compute_values(batch, embeddings=fwd_out[Columns.EMBEDDINGS])
        out = module.forward_train(augmented)
        policy = -dist_cls.from_logits(out[Columns.ACTION_DIST_INPUTS]).logp(actions)
        value = 0.5 * (values - module.compute_values(augmented, embeddings=out[Columns.EMBEDDINGS])) ** 2
        mask = batch.get(Columns.LOSS_MASK)
        keep = mask.bool() if mask is not None else torch.ones_like(value, dtype=torch.bool)
        policy, value = policy[keep].mean(), value[keep].mean()
        self._log_gaze_metrics(module_id, {DRAC_POLICY_LOSS_KEY: policy.detach(), DRAC_VALUE_LOSS_KEY: value.detach()})
        return policy + value

    def _predict_loss(self, module_id: ModuleID, batch: dict, fwd_out: dict) -> torch.Tensor:
        """The "gaze-predict" objective (ours): mean squared error of the gaze's return predictor
        against this minibatch's standardised value targets, over the unmasked rows."""
        features = fwd_out[PRE_ATTENTION_FEATURES].detach()
        obs = batch[Columns.OBS]
        if isinstance(obs, dict):
            obs = {k: v.detach() for k, v in obs.items()}
        target = batch[Columns.VALUE_TARGETS].detach()
        mask = batch.get(Columns.LOSS_MASK)
        keep = mask if mask is not None else torch.ones_like(target, dtype=torch.bool)
        target = (target - target[keep].mean()) / target[keep].std(unbiased=False).clamp_min(1e-6)
        predicted = self._gaze_module(module_id).predict_return(features, obs)
        loss = ((predicted - target)[keep] ** 2).mean()
        self._log_gaze_metrics(module_id, {GAZE_PREDICT_LOSS_KEY: loss.detach()})
        return loss

    def _returns(self, module_id: ModuleID, config: GazePPOConfig, batch: dict, fwd_out: dict) -> torch.Tensor:
        """``(B,)`` detached returns that label the rows (``config.contrastive_return``)."""
        if config.contrastive_return == "value":
            embeddings = fwd_out[Columns.EMBEDDINGS].detach()
            with torch.no_grad():
                return self._gaze_module(module_id).compute_values(batch, embeddings=embeddings)
        if config.contrastive_return == "return_to_go":
            return batch[CONTRASTIVE_RETURNS].detach()
        return batch[Columns.VALUE_TARGETS].detach()


def _chunk_ends(batch: dict[str, Any]) -> torch.Tensor:
    """``(N,)`` bool: the rows that close an episode chunk of a train batch: RLlib's appended rows (loss
    mask False) where it has them, else each chunk's last row (terminated or truncated, as
    ``rllib_gaze.gae`` marks them)."""
    if Columns.LOSS_MASK in batch:
        return ~torch.as_tensor(batch[Columns.LOSS_MASK]).bool()
    return torch.as_tensor(batch[Columns.TERMINATEDS]).bool() | torch.as_tensor(batch[Columns.TRUNCATEDS]).bool()
