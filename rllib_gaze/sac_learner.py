"""GazeSACLearner: RLlib's SAC losses plus the return-guided contrastive loss on the gaze.

Per gradient step (one replayed train batch, ``Learner.update`` of ``SAC.training_step``):
  1. ``SACTorchLearner`` computes the critic, actor and alpha losses on ``GazeSACModule``'s forward
     pass, one loss per optimizer;
  2. the shared encoder is in the critic's optimizer and trained by both critics' losses (as
     sac_rgbd's single Q optimizer); anchors of the batch are mined against the memory of earlier
     steps and the triplet loss goes to the optimizer that holds the gaze (its own with
     ``gaze_lr``, else the critic's);
  3. after the step, the batch's maps and labels enter the memory (``ContrastiveGazeLearnerMixin``).

Augmentation (``.gaze(augmentation="shift")``, the ``drq-sac`` arms): DrQ-v2's variant (Yarats et al.
2021), one random shift of the replayed ``obs`` and one of ``next_obs`` per gradient step, drawn on the
learner's device before the forward pass (DrQ's average over K augmented targets and M augmented
Q-values is not used). The critic's loss, its target, the actor (on the encoder's detached features, as
the module always does) and the temperature all read the shifted observations; the gaze's metrics and
its contrastive objective read the clean ones, from a no-grad pass of the encoder's conv layers.

Labels (``contrastive_return``): ``"value_target"`` (default) is the critic's Bellman target
``r + gamma^n (1 - terminated) (min Q_target(s', a') - alpha log pi(a'|s'))`` that SAC regresses on,
the analogue of PPO's GAE value target; ``"value"`` is the detached twin-min ``Q(s, a)``. Both are
detached. A return-to-go is not offered: replayed rows are single n-step transitions.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.algorithms.sac.sac_learner import QF_LOSS_KEY, QF_PREDS, QF_TWIN_LOSS_KEY, QF_TWIN_PREDS
from ray.rllib.algorithms.sac.torch.sac_torch_learner import SACTorchLearner
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import ALL_MODULES
from ray.rllib.utils.typing import ModuleID, ParamDict, StateDict, TensorType

from rllib_gaze.augmentation import augment_observations
from rllib_gaze.contrastive_learner import GAZE_OPTIMIZER, ContrastiveGazeLearnerMixin
from rllib_gaze.module import GAZE_PARAMS, PRE_ATTENTION_FEATURES
from rllib_gaze.results import GAZE_GRAD_NORM_CRITIC_KEY
from rllib_gaze.sac_config import GazeSACConfig

# Train-batch column of the clean observations when the batch's OBS and NEXT_OBS are augmented (the
# same tensors as before: no copy).
CLEAN_OBS = "clean_obs"
# Learner state component of the entropy temperature, which RLlib's SACLearner leaves out of its
# checkpoints (a restored run would restart from initial_alpha with the old Adam moments).
LOG_ALPHA = "log_alpha"


class GazeSACLearner(ContrastiveGazeLearnerMixin, SACTorchLearner):
    """``SACTorchLearner`` for ``GazeSACModule``: optimisers over its parameter groups, both critic
    losses on the shared encoder, and the triplet loss on the gaze (``ContrastiveGazeLearnerMixin``).

    Optimisers (Adam, ``eps=config.adam_eps``): ``"qf"`` (encoder, first critic head and, without
    ``gaze_lr``, the gaze; ``critic_lr``), ``"qf_twin"`` (second head), ``"policy"`` (actor,
    ``actor_lr``), ``"alpha"`` (``alpha_lr``) and, with ``gaze_lr``, ``"gaze"``. Checkpoints also
    carry ``log(alpha)`` (``LOG_ALPHA``), which ``SACTorchLearner``'s leave out.
    """

    @override(SACTorchLearner)
    def configure_optimizers_for_module(self, module_id: ModuleID, config: GazeSACConfig) -> None:
        module = self._gaze_module(module_id)
        gaze_ids = self._register_gaze_optimizer(module_id, config)
        shared_gaze = [p for p in module.gaze_parameters() if id(p) not in gaze_ids]
        groups = {"qf": (module.encoder_parameters() + shared_gaze + list(module.qf.parameters()), config.critic_lr),
                  "policy": (module.actor_parameters(), config.actor_lr),
                  "alpha": ([self.curr_log_alpha[module_id]], config.alpha_lr)}
        if module.twin_q:
            groups["qf_twin"] = (list(module.qf_twin.parameters()), config.critic_lr)
        for name, (params, lr) in groups.items():
            self.register_optimizer(module_id=module_id, optimizer_name=name,
                                    optimizer=torch.optim.Adam(params, eps=config.adam_eps),
                                    params=params, lr_or_lr_schedule=lr)

    def _gaze_loss_key(self, module_id: ModuleID) -> tuple[ModuleID, str]:
        """Where the gaze's losses go: its own optimizer's loss, or the critic's."""
        names = {name for name, _ in self.get_optimizers_for_module(module_id)}
        return (module_id, (GAZE_OPTIMIZER if GAZE_OPTIMIZER in names else "qf") + "_loss")

    @override(TorchLearner)
    def _update(self, batch: dict[ModuleID, Any], **kwargs) -> tuple[Any, Any, Any]:
        # DrQ: the forward pass and every loss read augmented observations (module docstring)
        return super()._update({module_id: self._augmented(module_id, module_batch)
                                for module_id, module_batch in batch.items()}, **kwargs)

    def _augmented(self, module_id: ModuleID, batch: Any) -> Any:
        """``batch`` itself without augmentation; else a new dict of its columns with ``OBS`` and
        ``NEXT_OBS`` augmented (one draw each) and the clean observations under ``CLEAN_OBS``."""
        augmentation = self.config.get_config_for_module(module_id).augmentation
        if augmentation == "none":
            return batch
        return {**batch, Columns.OBS: augment_observations(batch[Columns.OBS], augmentation),
                Columns.NEXT_OBS: augment_observations(batch[Columns.NEXT_OBS], augmentation),
                CLEAN_OBS: batch[Columns.OBS]}

    def _clean_gaze(self, module_id: ModuleID, batch: dict, fwd_out: dict) -> tuple[dict, Any]:
        """``(fwd_out, obs)`` for the gaze's metrics and objective: as they are for a clean batch; for an
        augmented one, ``fwd_out`` with the clean observations' map and gaze (a no-grad pass) and the
        clean observations."""
        if CLEAN_OBS not in batch:
            return fwd_out, batch[Columns.OBS]
        module, obs = self._gaze_module(module_id), batch[CLEAN_OBS]
        with torch.no_grad():
            features = module.feature_map(obs)
            _, params = module.gaze_weights(features, obs)
        return {**fwd_out, PRE_ATTENTION_FEATURES: features, GAZE_PARAMS: params}, obs

    @override(SACTorchLearner)
    def compute_loss_for_module(self, *, module_id: ModuleID, config: GazeSACConfig, batch: dict[str, Any],
                                fwd_out: dict[str, TensorType]) -> TensorType:
        loss = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        losses = self._temp_losses
        critic = losses[(module_id, QF_LOSS_KEY)]
        if config.twin_q:
            # The shared encoder sits in the first critic's optimizer: give it both critics' losses,
            # as sac_rgbd's one Q optimizer does (the twin loss does not reach the first head).
            critic = critic + losses[(module_id, QF_TWIN_LOSS_KEY)]
            losses[(module_id, QF_LOSS_KEY)] = critic
        if GAZE_PARAMS not in fwd_out:
            return loss

        clean_out, clean_obs = self._clean_gaze(module_id, batch, fwd_out)
        self._log_gaze_stats(module_id, clean_out[GAZE_PARAMS].detach(), clean_obs)
        key = self._gaze_loss_key(module_id)
        # Zero that ties every gaze parameter to its optimizer's loss: that loss then always has a
        # graph, and DDP sees no unused parameter, with RL's gradient stopped and no triplet yet.
        gaze_loss = 0.0 * fwd_out[GAZE_PARAMS].sum()
        if key[1] != "qf_loss" and config.resolved_gaze_rl_gradient():
            gaze_loss = gaze_loss + critic
        if config.contrastive:
            returns = self._returns(module_id, config, batch, fwd_out)
            contrastive = self._contrastive_term(module_id, config, batch, clean_out, returns,
                                                 rl_losses={GAZE_GRAD_NORM_CRITIC_KEY: critic})
            gaze_loss = gaze_loss + config.contrastive_coeff * contrastive
            loss = loss + config.contrastive_coeff * contrastive
        losses[key] = losses[key] + gaze_loss if key in losses else gaze_loss
        return loss

    def _returns(self, module_id: ModuleID, config: GazeSACConfig, batch: dict, fwd_out: dict) -> torch.Tensor:
        """``(B,)`` detached labels of the rows (``config.contrastive_return``, module docstring)."""
        with torch.no_grad():
            if config.contrastive_return == "value":
                q = fwd_out[QF_PREDS]
                return torch.min(q, fwd_out[QF_TWIN_PREDS]) if config.twin_q else q
            alpha = torch.exp(self.curr_log_alpha[module_id])
            next_value = fwd_out["q_target_next"] - alpha * fwd_out["logp_next_resampled"]
            not_terminated = 1.0 - batch[Columns.TERMINATEDS].float()
            return batch[Columns.REWARDS] + config.gamma ** batch["n_step"] * not_terminated * next_value

    @override(SACTorchLearner)
    def compute_gradients(self, loss_per_module: dict[ModuleID, TensorType], **kwargs) -> ParamDict:
        # As SACTorchLearner (each optimizer's parameters get the gradient of its own loss), but each
        # backward pass is limited to its optimizer's parameters: the encoder and the gaze are reached
        # by several losses, and a later pass would otherwise add into a collected gradient in place.
        # The limit also prunes the passes (the actor's and the twin critic's skip the encoder).
        grads = {}
        for module_id in set(loss_per_module) - {ALL_MODULES}:
            for optim_name, optim in self.get_optimizers_for_module(module_id):
                params = self.filter_param_dict_for_optimizer(self._params, optim)
                optim.zero_grad(set_to_none=True)
                loss = self._temp_losses.pop((module_id, optim_name + "_loss"))
                loss.backward(inputs=list(params.values()), retain_graph=True)
                grads.update({pid: p.grad if p.grad is not None else torch.zeros_like(p) for pid, p in params.items()})
        assert not self._temp_losses, self._temp_losses.keys()
        return grads

    @override(SACTorchLearner)
    def get_state(self, components=None, *, not_components=None, **kwargs) -> StateDict:
        state = super().get_state(components, not_components=not_components, **kwargs)
        if self._check_component(LOG_ALPHA, components, not_components):
            state[LOG_ALPHA] = {mid: float(log_alpha.detach()[0]) for mid, log_alpha in self.curr_log_alpha.items()}
        return state

    @override(SACTorchLearner)
    def set_state(self, state: StateDict) -> None:
        super().set_state(state)
        with torch.no_grad():
            for module_id, value in state.get(LOG_ALPHA, {}).items():
                self.curr_log_alpha[module_id].fill_(value)  # in place: the alpha Adam holds this tensor
