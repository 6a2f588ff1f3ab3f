"""GazePPOConfig / GazePPO: PPO with ManiSkill ppo_rgb's defaults plus the gaze knobs, and the
``.gaze()`` section they share with GazeSACConfig (``GazeConfigMixin``).

Plain PPO, the baseline arm, is ``GazePPOConfig().gaze(attention="none", contrastive=False)``:
every other setting is identical between arms.
"""

from __future__ import annotations

from typing import Any, Self

import gymnasium as gym
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.algorithms.ppo import PPO, PPOConfig
from ray.rllib.core import ALL_MODULES
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    NUM_MODULE_STEPS_TRAINED_LIFETIME,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
)

from rllib_gaze.augmentation import AUGMENTATIONS
from rllib_gaze.callbacks import GazeImages, SuccessMetrics
from rllib_gaze.contrastive import LABEL_RULES, MININGS, NEIGHBOURS, OBJECTIVES, SIMILARITIES, TRIPLET_GAZES
from rllib_gaze.env_runner import BatchedEnvRunner
from rllib_gaze.gaze import GAZE_DEFAULTS, gaze_settings_errors
from rllib_gaze.rollout import ROLLOUTS

RETURNS = ("value_target", "value", "return_to_go")
# Restarts per remote env runner before the trial stops (GazePPOConfig's comment says why not RLlib's 1000).
ENV_RUNNER_RESTARTS = 20


class GazeConfigMixin:
    """The ``.gaze(...)`` section and ``.training(adam_eps=...)``, shared by ``GazePPOConfig`` and
    ``GazeSACConfig``: put it before the RLlib config class in the bases and call
    ``_init_gaze_settings()`` in ``__init__``.

    The gaze settings in ``rllib_gaze.gaze.GAZE_DEFAULTS`` reach the RLModule through its
    model_config; the others are read by the learner (``ContrastiveGazeLearnerMixin``).
    """

    # What may label a state for the contrastive loss (``contrastive_return``) with this algorithm.
    ALLOWED_RETURNS: tuple[str, ...] = RETURNS
    # Where mining may look for an anchor's neighbours (``mining``) with this algorithm: own-episode
    # mining needs a train batch of episode chunks (PPO's), not rows drawn from a replay buffer.
    ALLOWED_MININGS: tuple[str, ...] = MININGS
    # How a fragment may reach the learner (``.env_runners(rollout=...)``) with this algorithm.
    ALLOWED_ROLLOUTS: tuple[str, ...] = ROLLOUTS

    def _init_gaze_settings(self) -> None:
        # Gaze (module side): attention, gaze_floor, ..., gaze_predict_coeff.
        for key, value in GAZE_DEFAULTS.items():
            setattr(self, key, value)
        # The gaze's own optimizer (learner side).
        self.gaze_lr = 1e-3
        self.gaze_adam_eps = 1e-8
        # Return-guided contrastive loss (learner side).
        self.contrastive = True
        self.contrastive_objective = "triplet"
        self.fixation_pools = (1, 3)
        self.contrastive_similarity = "glimpse"
        self.contrastive_triplet_gaze = "anchor"
        self.contrastive_return = "value_target"
        self.contrastive_gamma = 0.95
        self.contrastive_coeff = 1.0
        self.contrastive_margin = 0.2
        self.contrastive_k = 16
        self.contrastive_num_anchors = 128
        self.contrastive_memory_capacity = 8192
        self.label_rule = "threshold"
        self.return_quantile = 0.5
        self.return_threshold = None
        self.relative_gap = 0.5
        self.mining_chunk_size = 4096
        self.mining_pool = 2
        self.mining_centred = False
        self.mining = "memory"
        self.mining_gap = 0
        self.mining_neighbours = "per_minibatch"
        self.contrastive_memory_checkpoint_mb = 64.0
        # TensorBoard drawings of the gaze (off by default).
        self.gaze_image_interval = 0
        self.gaze_image_count = 4
        # Image augmentation (learner side): the DrAC / DrQ baselines' arms.
        self.augmentation = "none"
        # How a fragment reaches the learner (.env_runners(rollout=...)).
        self.rollout = "episodes"
        self.aug_coef = 0.1

    @override(AlgorithmConfig)
    def env_runners(self, *, rollout: str = NotProvided, **kwargs) -> Self:
        """Sets the env runner settings: the algorithm config's ``env_runners``'s, plus

        Args:
            rollout: how a sampled fragment reaches the learner (``ALLOWED_ROLLOUTS``).
                ``"episodes"`` (default): RLlib's way, one ``SingleAgentEpisode`` per sub-env and
                episode chunk, batched by the learner connector; works everywhere (remote env
                runners, remote learners). ``"device"`` (GazePPO only; ``rllib_gaze.rollout``): the
                env runner's buffers themselves go to the update as tensors where the env left them
                (the GPU, for a GPU simulator), GAE computed on them, minibatches drawn by index,
                observations uint8 until the encoder: no episodes in the train batch, no object
                store, no host copy. The same train batch and minibatches as ``"episodes"`` (a
                seeded run trains the same). Needs sampling and learning in one process:
                ``num_env_runners=0``, ``num_learners=0``, ``BatchedEnvRunner``,
                ``values_from_sampling=True``, single-agent, no custom learner connector, and one
                fragment (``rollout_fragment_length`` x ``num_envs_per_env_runner`` env steps) that
                fills ``train_batch_size_per_learner``.
        """
        super().env_runners(**kwargs)
        if rollout is not NotProvided:
            self.rollout = rollout
        return self

    @override(AlgorithmConfig)
    def training(self, *, adam_eps: float = NotProvided, **kwargs) -> Self:
        """Sets the training settings: the algorithm config's ``training``'s, plus

        Args:
            adam_eps: epsilon of the main Adam optimizer, > 0 (ppo_rgb's 1e-5; RLlib's default
                is 1e-8). The gaze's own Adam has ``.gaze(gaze_adam_eps=...)``.
        """
        super().training(**kwargs)
        if adam_eps is not NotProvided:
            self.adam_eps = adam_eps
        return self

    def gaze(
        self,
        *,
        attention: str = NotProvided,
        gaze_floor: float = NotProvided,
        gaze_sigma_min: float = NotProvided,
        gaze_init_sigma: float = NotProvided,
        gaze_rho_max: float = NotProvided,
        gaze_normalization: str = NotProvided,
        gaze_head_init_std: float = NotProvided,
        gaze_centre: str = NotProvided,
        gaze_oracle_sigma: float = NotProvided,
        gaze_fixed_sigma: float = NotProvided,
        gaze_rl_gradient: bool | None = NotProvided,
        gaze_lr: float | None = NotProvided,
        gaze_adam_eps: float = NotProvided,
        gaze_predict_coeff: float = NotProvided,
        gaze_input: str = NotProvided,
        contrastive: bool = NotProvided,
        contrastive_objective: str = NotProvided,
        fixation_pools: tuple[int, ...] = NotProvided,
        contrastive_similarity: str = NotProvided,
        contrastive_triplet_gaze: str = NotProvided,
        contrastive_return: str = NotProvided,
        contrastive_gamma: float = NotProvided,
        contrastive_coeff: float = NotProvided,
        contrastive_margin: float = NotProvided,
        contrastive_k: int = NotProvided,
        contrastive_num_anchors: int = NotProvided,
        contrastive_memory_capacity: int = NotProvided,
        label_rule: str = NotProvided,
        return_quantile: float = NotProvided,
        return_threshold: float | None = NotProvided,
        relative_gap: float = NotProvided,
        mining_chunk_size: int = NotProvided,
        mining_pool: int = NotProvided,
        mining_centred: bool = NotProvided,
        mining: str = NotProvided,
        mining_gap: int = NotProvided,
        mining_neighbours: str = NotProvided,
        contrastive_memory_checkpoint_mb: float = NotProvided,
        gaze_image_interval: int = NotProvided,
        gaze_image_count: int = NotProvided,
        augmentation: str = NotProvided,
        aug_coef: float = NotProvided,
    ) -> Self:
        """Sets the attention and contrastive-loss settings, and the image augmentation of the
        augmentation baselines (defaults: ``GazePPOConfig()``; the module-side ones in
        ``rllib_gaze.gaze.GAZE_DEFAULTS``). Every setting that differs between the suite's arms is
        here (``rllib_gaze.arms``).

        Args:
            attention: ``"foveal"`` (one Gaussian), ``"patch"`` (one free weight per cell),
                ``"oracle"`` (a fixed Gaussian on the true target: an upper bound, needs an env
                that exposes the target, e.g. clutter with ``expose_target=True``), ``"centre"`` (a
                fixed Gaussian on the image's centre: the control for narrowing alone) or ``"none"``
                (plain PPO).
            gaze_floor: minimum weight of any cell, in [0, 1).
            gaze_sigma_min, gaze_init_sigma, gaze_rho_max: foveal parameterisation (normalised
                units: the feature map spans [-1, 1]).
            gaze_normalization: ``"peak"`` (the Gaussian is 1 at its centre: widening raises every
                weight, so it is free) or ``"mean"`` (weights divided by their mean over the map:
                the total weight is fixed and widening dims the centre).
            gaze_head_init_std: std of the foveal head's output layer at init (> 0); too small
                starves the head's body of gradient, so the centre cannot follow the input.
            gaze_centre: how the foveal head places the centre: ``"mlp"`` (``tanh`` of the head's
                output) or ``"soft_argmax"`` (the expected cell position under a softmax over a
                learnt 1x1-conv relevance map: the centre goes where a feature fires).
            gaze_oracle_sigma: the oracle's fixed spread (> 0).
            gaze_fixed_sigma: the ``"centre"`` attention's fixed spread (> 0): a round Gaussian that
                never moves from the image's centre, the control for what narrowing alone gives.
            gaze_rl_gradient: False stops RL's gradient at the gaze weights, so only the
                contrastive loss trains the gaze (PPO still trains the encoder and heads through
                the attended map); ``None`` (default): stop it exactly when ``contrastive`` is on.
            gaze_lr: the gaze's own Adam with this learning rate (``None``: the gaze shares the
                main optimizer and its lr); its gradient is then clipped apart from the rest.
            gaze_adam_eps: epsilon of the gaze's own Adam (with ``gaze_lr``).
            gaze_predict_coeff: > 0 adds our own gaze objective (not the paper's; the
                ``gaze-predict`` arm): a small head predicts the standardised value target from the
                gaze's centre, what the fovea sees and the state, and its squared error, times this
                weight, trains that head and the gaze. 0 (default): off.
            gaze_input: what the gaze head reads: ``"map"`` (default, the paper) or ``"centred"``
                (ours: the map minus the contrastive memory's mean map, which the learner keeps in
                the module's ``gaze_input_centre`` buffer after each update; for a map with a large
                common offset, as GazeSAC's; needs ``contrastive``).
            contrastive: add the return-guided triplet loss (needs attention).
            contrastive_objective: what the mined triplets train the gaze with: ``"triplet"`` (the
                paper's triplet margin loss), ``"fixation"`` (ours, foveal only: the gaze centre is
                regressed onto the cell where the anchor's surroundings match the positive and not
                the negative, ``rllib_gaze.contrastive.fixation_targets``) or ``"fixation+triplet"``
                (both: the fixation places the centre, the triplet loss shapes the spread).
            fixation_pools: the fixation search's windows (odd integers >= 1), default (1, 3): 1
                compares single cells, 3 also the 3 x 3 surroundings, where a relation of two
                neighbouring things shows; their scores are summed. On the mechanism bench (1,)
                alone is a little better on marked targets and fails on relations.
            contrastive_similarity: what the triplet loss compares: ``"map"`` (cosine of the whole
                attended maps), ``"centred_map"`` (the same after subtracting the memory's mean
                map) or ``"glimpse"`` (cosine of the gaze-weighted mean channel vectors of the
                centred maps: what the fovea sees).
            contrastive_triplet_gaze: ``"anchor"``: the anchor's gaze weighs all three maps of a
                triplet; ``"each"``: each map under its own gaze (which lets the loss fall by
                pointing the negative's gaze elsewhere).
            contrastive_return: what labels a state: ``"value_target"`` (the GAE value target
                PPO regresses on), ``"value"`` (the critic's detached V(s)) or ``"return_to_go"``
                (the discounted return-to-go with ``contrastive_gamma``, bootstrapped from the
                critic's V where an episode chunk ends). GazeSAC: ``"value_target"`` is the
                critic's Bellman target, ``"value"`` its detached twin-min Q(s, a); no
                ``"return_to_go"`` (``ALLOWED_RETURNS``).
            contrastive_gamma: discount of ``"return_to_go"``, in [0, 1].
            contrastive_coeff: weight of the triplet loss next to the RL loss.
            contrastive_margin: triplet margin on cosine distance (>= 0).
            contrastive_k: neighbours searched per anchor (>= 1).
            contrastive_num_anchors: anchors (triplets at most) per minibatch.
            contrastive_memory_capacity: rows of the feature/return memory (>= num_anchors).
            label_rule: ``"threshold"``: positive = same side of the return threshold as the
                anchor; ``"above"``: positive = above the threshold, negative = below, whatever
                the anchor (the paper reviewers' reading); ``"relative"``: positive = return
                within ``relative_gap`` x (return std).
            return_quantile: threshold = this quantile of the memory's returns, in (0, 1).
            return_threshold: a fixed threshold instead of the quantile (``None``: use quantile).
            relative_gap: see ``label_rule``.
            mining_chunk_size: memory rows compared per matmul in the exact neighbour search.
            mining_pool: neighbours are searched on feature maps averaged over ``pool x pool``
                cells (1: the raw maps); 2 cuts the search cost ~4x.
            mining_centred: search neighbours by the cosine of maps minus the memory's mean map
                (what differs from the typical scene) instead of the raw maps, whose cosines are all
                0.96-0.98 and dominated by the background.
            mining: where an anchor's neighbours come from (``ALLOWED_MININGS``): ``"memory"`` (the
                paper's: the memory of earlier updates, any episode) or ``"episode"`` (ours, issue 28:
                the other steps of the anchor's own episode chunk in this update's batch, so a
                triplet shares the scene and differs in what changed within the episode; labels
                still split at the memory's return threshold). PPO only.
            mining_gap: with ``mining="episode"``, neighbours at least this many steps from the
                anchor (0: any other step).
            mining_neighbours: how often an anchor's neighbours are searched (``NEIGHBOURS``):
                ``"per_minibatch"`` (every minibatch draws its anchors and searches their neighbours)
                or ``"per_update"`` (only the first epoch's minibatches search; the later epochs' anchors
                are the rows searched then, with the positive and negative found then: the memory
                changes only between updates, so what changes is the encoder's drift within an
                update and that fewer distinct rows serve as anchors). docs/benchmarks.md has the
                cost and the mechanism bench of both.
            contrastive_memory_checkpoint_mb: checkpoints include the contrastive memory when it
                holds at most this many MB (0: never); a memory left out refills after a restore
                within ``contrastive_memory_capacity / train batch`` iterations.
            gaze_image_interval: every this many iterations, log ``gaze_image_count`` fixed
                observations with the gaze drawn on them to TensorBoard (``ray/tune/gaze_images``);
                0 = never.
            gaze_image_count: observations in that drawing (1 to 16).
            augmentation: ``"none"`` (default) or ``"shift"``: DrQ-v2's random shift of the image
                observations (``rllib_gaze.augmentation``), drawn anew for every minibatch on the
                learner. GazePPO uses it as DrAC does: PPO's clipped policy loss and value loss stay on
                the clean observations the rollout was sampled with, and the augmentation enters only
                through DrAC's two regularisers, ``-log pi(a'|f(s))`` with ``a' ~ pi(.|s)`` and
                ``0.5 (V(s) - V(f(s)))^2`` (``V(s)`` detached), weighted by ``aug_coef``. GazeSAC uses it
                as DrQ-v2 does: the replayed ``obs`` and ``next_obs`` are shifted (one draw each, no
                averaging over several) and the critic, the actor (on the encoder's detached output)
                and the temperature are trained on them. The gaze's metrics and its contrastive
                objective read the clean observations. Needs image observations.
            aug_coef: weight of DrAC's regularisers (>= 0; DrAC's default 0.1). GazePPO only: GazeSAC
                trains on the augmented observations themselves and ignores it.
        """
        for name, value in list(locals().items()):
            if name != "self" and value is not NotProvided:
                setattr(self, name, value)
        return self

    @property
    @override(AlgorithmConfig)
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {key: getattr(self, key) for key in GAZE_DEFAULTS} | {
            "gaze_rl_gradient": self.resolved_gaze_rl_gradient()}

    def resolved_gaze_rl_gradient(self) -> bool:
        """Whether RL's gradient reaches the gaze: ``gaze_rl_gradient``, or if it is ``None``, only
        when no other objective (contrastive, predict) trains the gaze."""
        if self.gaze_rl_gradient is None:
            return not (self.contrastive or self.gaze_predict_coeff > 0)
        return bool(self.gaze_rl_gradient)

    @override(AlgorithmConfig)
    def validate(self) -> None:
        super().validate()
        for message in gaze_config_errors(self):
            self._value_error(message)


class GazePPOConfig(GazeConfigMixin, PPOConfig):
    """PPOConfig with ppo_rgb's hyperparameters as defaults, Adam's ``eps`` in ``.training(adam_eps=...)``
    and a ``.gaze(...)`` section.

    The gaze settings in ``rllib_gaze.gaze.GAZE_DEFAULTS`` reach the RLModule through its
    model_config; the others are read by ``GazePPOLearner``.

    Example::

        config = (GazePPOConfig()
                  .environment("clutter")
                  .gaze(attention="foveal", contrastive=True, contrastive_margin=0.2))
        algo = config.build_algo()
    """

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class or GazePPO)
        # ManiSkill ppo_rgb defaults (docs/method.md, "PPO settings"). Every arm shares them.
        self.lr = 3e-4
        self.gamma = 0.8
        self.lambda_ = 0.9
        self.clip_param = 0.2
        self.num_epochs = 4
        self.entropy_coeff = 0.0
        self.vf_loss_coeff = 0.25        # RLlib's vf loss has no 0.5 factor: 0.25 == ppo_rgb's 0.5 * 0.5 * MSE
        self.vf_clip_param = 1e6         # ppo_rgb: clip_vloss=False
        self.grad_clip = 0.5
        self.grad_clip_by = "global_norm"
        self.use_kl_loss = False         # ppo_rgb has no KL penalty (it early-stops at target_kl instead)
        self.num_env_runners = 1
        # Batch-at-a-time sampling for the batched envs (rllib_gaze.env_runner; docs/benchmarks.md, "Batched
        # env runner"). RLlib's stock runner: .env_runners(env_runner_cls=SingleAgentEnvRunner).
        self.env_runner_cls = BatchedEnvRunner
        self.num_envs_per_env_runner = 512
        self.rollout_fragment_length = 50
        self.train_batch_size_per_learner = 512 * 50
        self.minibatch_size = 512 * 50 // 32
        self.adam_eps = 1e-5             # ppo_rgb's Adam(eps=1e-5); RLlib's default is 1e-8
        # GAE from the values of the sampling pass (rllib_gaze.gae): no critic pass over the whole batch
        # in the learner connector, no appended loss-masked rows.
        self.values_from_sampling = True
        # GazePPOLearner checks each gradient step once, on the norms its gradient clip computes, and
        # skips a step with a NaN/inf gradient (rllib_gaze.gradients). True turns RLlib's own checks off
        # (two per parameter tensor per step; with True RLlib 2.60 checks nothing).
        self.torch_skip_nan_gradients = True
        # RLlib's default lets each env runner be restarted 1000 times, 60 s apart, and then samples
        # nothing, iteration after iteration: an env that raises at every step would loop for ~17 hours.
        # 20 restarts per runner covers sporadic crashes; once every runner has used them up the
        # trial stops (GazePPO.training_step) and Tune's FailureConfig takes over.
        self.max_num_env_runner_restarts = ENV_RUNNER_RESTARTS
        # success_once / success_at_end per episode in env_runners/ (ManiSkill's metrics).
        # Gaze drawings in TensorBoard every gaze_image_interval iterations (rllib_gaze.overlay).
        self.callbacks_class = [SuccessMetrics, GazeImages]
        self._init_gaze_settings()
        # For tests only (tests/test_trial_restart.py), off by default: GazePPO.training_step raises
        # at this training iteration (0: never), in a trial not restored from a checkpoint unless
        # _fail_after_restore, to show Tune restarting a failed trial.
        self._fail_at_iteration = 0
        self._fail_after_restore = False

    @override(PPOConfig)
    def training(self, *, values_from_sampling: bool = NotProvided, **kwargs) -> Self:
        """Sets the training settings: ``PPOConfig.training``'s and ``adam_eps`` (``GazeConfigMixin``), plus

        Args:
            values_from_sampling: True (default): GAE reads the critic's values from the env runner's
                forward pass (the module emits them with the action, as ppo_rgb does), the bootstrap
                values come from one critic pass over the chunks' last observations, and the train
                batch has no appended loss-masked rows (``rllib_gaze.gae``): the same advantages and
                value targets as RLlib's connector, without its critic pass over the whole batch.
                Works with RLlib's stock ``SingleAgentEnvRunner`` and with ``BatchedEnvRunner``, for
                single-agent episodes of a stateless module that emits ``vf_preds`` (GazePPOModule
                does). False: RLlib's ``AddOneTsToEpisodesAndTruncate`` + ``GeneralAdvantageEstimation``.
        """
        super().training(**kwargs)
        if values_from_sampling is not NotProvided:
            self.values_from_sampling = values_from_sampling
        return self

    @property
    @override(GazeConfigMixin)
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {"values_from_sampling": self.values_from_sampling}

    @override(GazeConfigMixin)
    def validate(self) -> None:
        super().validate()
        if not isinstance(self.values_from_sampling, bool):
            self._value_error(f"values_from_sampling={self.values_from_sampling!r} must be True or False")
        user_model_config = self._model_config if isinstance(self._model_config, dict) else {}
        if user_model_config.get("values_from_sampling", self.values_from_sampling) != self.values_from_sampling:
            self._value_error(f"model_config['values_from_sampling']={user_model_config['values_from_sampling']!r} "
                              f"disagrees with .training(values_from_sampling={self.values_from_sampling!r}); set it "
                              "only through .training(values_from_sampling=...) so the module and the learner agree")
        if self.values_from_sampling and self.is_multi_agent:
            self._value_error("values_from_sampling=True supports single-agent training only; set "
                              ".training(values_from_sampling=False) for RLlib's GAE connector")
        for message in device_rollout_errors(self):
            self._value_error(message)

    @override(PPOConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from rllib_gaze.module import GazePPOModule

        return RLModuleSpec(module_class=GazePPOModule)

    @override(PPOConfig)
    def get_default_learner_class(self):
        from rllib_gaze.learner import GazePPOLearner

        return GazePPOLearner


def device_rollout_errors(c: GazePPOConfig) -> list[str]:
    """Why ``rollout="device"`` cannot hold with ``c`` (each naming the value and what it needs), or
    nothing (also for ``rollout="episodes"``, and for an evaluation config: evaluation samples episodes on
    its own env runners)."""
    if c.rollout != "device" or c.in_evaluation:
        return []
    errors = []
    why = "rollout='device' hands the env runner's buffers to the learner in one process"
    if c.num_env_runners:
        errors.append(f"{why}: it needs num_env_runners=0 (sampling in the learner's process), got "
                      f"num_env_runners={c.num_env_runners}; remote env runners send episodes (rollout='episodes')")
    if c.num_learners:
        errors.append(f"{why}: it needs num_learners=0 (the local learner), got num_learners={c.num_learners}; "
                      "remote learners take episodes or batches (rollout='episodes')")
    if not (isinstance(c.env_runner_cls, type) and issubclass(c.env_runner_cls, BatchedEnvRunner)):
        errors.append(f"{why}: it needs env_runner_cls=BatchedEnvRunner (or a subclass), got {c.env_runner_cls!r}")
    if not c.values_from_sampling:
        errors.append("rollout='device' computes GAE from the sampling pass's values: it needs "
                      ".training(values_from_sampling=True), got False")
    if c.is_multi_agent:
        errors.append("rollout='device' supports single-agent training only; use rollout='episodes'")
    if c._learner_connector is not None or not c.add_default_connectors_to_learner_pipeline:
        errors.append("rollout='device' builds the train batch without the learner connector pipeline, so custom "
                      "learner connector pieces would not run: use rollout='episodes' with them")
    if c.batch_mode != "truncate_episodes":
        errors.append(f"rollout='device' samples fragments of env steps: it needs batch_mode='truncate_episodes', "
                      f"got {c.batch_mode!r}")
    if c.count_steps_by != "env_steps":
        errors.append(f"rollout='device' counts env steps: it needs count_steps_by='env_steps', got "
                      f"{c.count_steps_by!r}")
    fragment = c.get_rollout_fragment_length() * c.num_envs_per_env_runner
    if fragment < c.train_batch_size_per_learner:
        errors.append(f"rollout='device' trains on one fragment per update: rollout_fragment_length x "
                      f"num_envs_per_env_runner = {fragment} env steps must be >= train_batch_size_per_learner="
                      f"{c.train_batch_size_per_learner}")
    return errors


def gaze_config_errors(c: GazeConfigMixin) -> list[str]:
    """Every problem with the gaze settings of ``c`` (and its ``adam_eps``), each naming the value
    and what is allowed. The module-side settings are checked by ``gaze_settings_errors``."""
    errors = []
    user_model_config = c._model_config if isinstance(c._model_config, dict) else {}
    for key in GAZE_DEFAULTS:
        if key in user_model_config and user_model_config[key] != getattr(c, key):
            errors.append(f"model_config[{key!r}]={user_model_config[key]!r} disagrees with .gaze({key}="
                          f"{getattr(c, key)!r}); set it only through .gaze({key}=...) so the module and the "
                          "learner see the same value")
    errors += gaze_settings_errors({key: getattr(c, key) for key in GAZE_DEFAULTS})
    if c.contrastive and c.attention in ("none", "oracle", "centre"):
        errors.append(f"contrastive=True needs a trainable attention: the contrastive loss trains the gaze, "
                      f"and attention={c.attention!r} has none to train; use attention='foveal' or 'patch', "
                      "or contrastive=False")
    if c.gaze_input == "centred" and not (c.contrastive and c.attention in ("foveal", "patch")):
        errors.append(f"gaze_input='centred' needs contrastive=True with a trainable attention (the centre is the "
                      f"contrastive memory's mean map); got contrastive={c.contrastive!r}, attention={c.attention!r}")
    if (c.attention in ("foveal", "patch") and c.gaze_rl_gradient is False and not c.contrastive
            and not c.gaze_predict_coeff > 0):
        errors.append(f"gaze_rl_gradient=False with contrastive=False leaves the {c.attention} gaze untrained; "
                      "set contrastive=True or gaze_rl_gradient=True")
    if c.gaze_lr is not None and not c.gaze_lr > 0:
        errors.append(f"gaze_lr={c.gaze_lr!r} must be > 0 (or None: share the main optimizer)")
    if not c.gaze_adam_eps > 0:
        errors.append(f"gaze_adam_eps={c.gaze_adam_eps!r} must be > 0")
    if c.contrastive_objective not in OBJECTIVES:
        errors.append(f"contrastive_objective={c.contrastive_objective!r} is not known; "
                      f"allowed values are {OBJECTIVES}")
    elif c.contrastive and c.contrastive_objective != "triplet" and c.attention != "foveal":
        errors.append(f"contrastive_objective={c.contrastive_objective!r} moves a foveal gaze's centre; "
                      f"attention={c.attention!r} has none (use attention='foveal' or contrastive_objective='triplet')")
    pools = c.fixation_pools
    if (not isinstance(pools, (tuple, list)) or not pools
            or not all(isinstance(p, int) and p >= 1 and p % 2 == 1 for p in pools)):
        errors.append(f"fixation_pools={pools!r} must be a non-empty tuple of odd integers >= 1")
    if c.contrastive_similarity not in SIMILARITIES:
        errors.append(f"contrastive_similarity={c.contrastive_similarity!r} is not known; "
                      f"allowed values are {SIMILARITIES}")
    if c.contrastive_triplet_gaze not in TRIPLET_GAZES:
        errors.append(f"contrastive_triplet_gaze={c.contrastive_triplet_gaze!r} is not known; "
                      f"allowed values are {TRIPLET_GAZES}")
    if not 0.0 <= c.contrastive_gamma <= 1.0:
        errors.append(f"contrastive_gamma={c.contrastive_gamma!r} must be in [0, 1]")
    if c.contrastive_return not in c.ALLOWED_RETURNS:
        errors.append(f"contrastive_return={c.contrastive_return!r} is not known; "
                      f"allowed values are {c.ALLOWED_RETURNS}")
    if c.contrastive_coeff < 0:
        errors.append(f"contrastive_coeff={c.contrastive_coeff!r} must be >= 0")
    if c.contrastive_margin < 0:
        errors.append(f"contrastive_margin={c.contrastive_margin!r} must be >= 0")
    if c.contrastive_k < 1:
        errors.append(f"contrastive_k={c.contrastive_k!r} must be >= 1")
    if c.contrastive_num_anchors < 1:
        errors.append(f"contrastive_num_anchors={c.contrastive_num_anchors!r} must be >= 1")
    if c.contrastive_memory_capacity < c.contrastive_num_anchors:
        errors.append(f"contrastive_memory_capacity={c.contrastive_memory_capacity!r} is smaller than one "
                      f"triplet batch (contrastive_num_anchors={c.contrastive_num_anchors!r}); it must be >= that")
    if c.label_rule not in LABEL_RULES:
        errors.append(f"label_rule={c.label_rule!r} is not known; allowed values are {LABEL_RULES}")
    if not 0.0 < c.return_quantile < 1.0:
        errors.append(f"return_quantile={c.return_quantile!r} must be in the open interval (0, 1)")
    if c.relative_gap < 0:
        errors.append(f"relative_gap={c.relative_gap!r} must be >= 0")
    if c.mining_chunk_size < 1:
        errors.append(f"mining_chunk_size={c.mining_chunk_size!r} must be >= 1")
    if not isinstance(c.mining_centred, bool):
        errors.append(f"mining_centred={c.mining_centred!r} must be True or False")
    if not isinstance(c.mining_pool, int) or c.mining_pool < 1:
        errors.append(f"mining_pool={c.mining_pool!r} must be an integer >= 1")
    if c.rollout not in c.ALLOWED_ROLLOUTS:
        errors.append(f"rollout={c.rollout!r} is not allowed with this algorithm; allowed values are "
                      f"{c.ALLOWED_ROLLOUTS}")
    if c.mining not in c.ALLOWED_MININGS:
        errors.append(f"mining={c.mining!r} is not allowed with this algorithm; allowed values are {c.ALLOWED_MININGS}")
    if not isinstance(c.mining_gap, int) or c.mining_gap < 0:
        errors.append(f"mining_gap={c.mining_gap!r} must be an integer >= 0")
    if c.mining_neighbours not in NEIGHBOURS:
        errors.append(f"mining_neighbours={c.mining_neighbours!r} is not known; allowed values are {NEIGHBOURS}")
    if not isinstance(c.gaze_image_interval, int) or c.gaze_image_interval < 0:
        errors.append(f"gaze_image_interval={c.gaze_image_interval!r} must be an integer >= 0 (0 = off)")
    if not isinstance(c.gaze_image_count, int) or not 1 <= c.gaze_image_count <= 16:
        errors.append(f"gaze_image_count={c.gaze_image_count!r} must be an integer in [1, 16]")
    if not c.contrastive_memory_checkpoint_mb >= 0:
        errors.append(f"contrastive_memory_checkpoint_mb={c.contrastive_memory_checkpoint_mb!r} must be >= 0")
    if c.adam_eps <= 0:
        errors.append(f"adam_eps={c.adam_eps!r} must be > 0")
    errors += augmentation_errors(c)
    return errors


def augmentation_errors(c: GazeConfigMixin) -> list[str]:
    """Problems with ``augmentation`` and ``aug_coef``, and an augmentation on observations without an
    image, where the config knows its observation space (``.environment(observation_space=...)``);
    otherwise the module refuses such observations when it is built, before any sampling."""
    errors = []
    if c.augmentation not in AUGMENTATIONS:
        errors.append(f"augmentation={c.augmentation!r} is not known; allowed values are {AUGMENTATIONS}")
    if not c.aug_coef >= 0:
        errors.append(f"aug_coef={c.aug_coef!r} must be >= 0")
    space = c.observation_space
    if c.augmentation != "none" and space is not None and not _has_image(space):
        errors.append(f"augmentation={c.augmentation!r} shifts images, and the observations ({space}) hold none; "
                      "use augmentation='none' (an arm without augmentation) or an env with camera images")
    return errors


def _has_image(space) -> bool:
    """Whether an observation space is, or holds, an image: a Box of shape (H, W, C)."""
    if isinstance(space, gym.spaces.Dict):
        return any(_has_image(sub) for sub in space.spaces.values())
    return isinstance(space, gym.spaces.Box) and len(space.shape) == 3


class GazePPO(PPO):
    """PPO with the foveal gaze and the return-guided contrastive loss (registered as ``"GazePPO"``)."""

    @classmethod
    @override(PPO)
    def get_default_config(cls) -> GazePPOConfig:
        return GazePPOConfig()

    @override(PPO)
    def training_step(self) -> None:
        fail_at = getattr(self.config, "_fail_at_iteration", 0)
        if fail_at and self.iteration + 1 == fail_at and (getattr(self.config, "_fail_after_restore", False)
                                                           or not self._restored):
            raise RuntimeError(f"_fail_at_iteration={fail_at}: a test's injected trial failure")
        if self.config.rollout == "device":
            self._training_step_on_device()
        else:
            super().training_step()
        stop_without_env_runners(self)

    def _training_step_on_device(self) -> None:
        """``PPO.training_step`` with the local env runner's fragment handed to the local learner as its
        buffers (``rollout="device"``, ``rllib_gaze.rollout``): the same metrics, timers, update
        arguments and weight sync, no episodes in between."""
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            rollout = self.env_runner.sample_rollout()
            self.metrics.aggregate([self.env_runner.get_metrics()], key=ENV_RUNNER_RESULTS)
        with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
            learner_results = self.learner_group.update(
                batch=rollout,
                timesteps={
                    NUM_ENV_STEPS_SAMPLED_LIFETIME: self.metrics.peek((ENV_RUNNER_RESULTS,
                                                                       NUM_ENV_STEPS_SAMPLED_LIFETIME)),
                    NUM_MODULE_STEPS_TRAINED_LIFETIME: self.metrics.peek(
                        (LEARNER_RESULTS, ALL_MODULES, NUM_MODULE_STEPS_TRAINED_LIFETIME), default=0),
                },
                num_epochs=self.config.num_epochs,
                minibatch_size=self.config.minibatch_size,
                shuffle_batch_per_epoch=self.config.shuffle_batch_per_epoch,
            )
            self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)
        del rollout   # the runner reuses its buffers once nothing holds them
        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group,
                                               policies=set(learner_results[0]) - {ALL_MODULES}, inference_only=True)


def stop_without_env_runners(algo) -> None:
    """Raises when every remote env runner has failed and used up its ``max_num_env_runner_restarts``:
    RLlib would otherwise go on training on no samples for ever."""
    group, config = algo.env_runner_group, algo.config
    runners = group.num_remote_env_runners() if group is not None else 0
    if (runners and config.restart_failed_env_runners and group.num_healthy_remote_workers() == 0
            and group.num_remote_worker_restarts() >= config.max_num_env_runner_restarts * runners):
        raise RuntimeError(
            f"all {runners} env runner(s) failed and were restarted max_num_env_runner_restarts="
            f"{config.max_num_env_runner_restarts} times each; the env runners' error is in their log "
            "(Ray's worker-*.err files, or the console with --verbose)")
