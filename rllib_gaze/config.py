"""GazePPOConfig / GazePPO: PPO with ManiSkill ppo_rgb's defaults plus the gaze knobs.

Plain PPO, the baseline arm, is ``GazePPOConfig().gaze(attention="none", contrastive=False)``:
every other setting is identical between arms.
"""

from __future__ import annotations

from typing import Any

from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.algorithms.ppo import PPO, PPOConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override

from rllib_gaze.contrastive import LABEL_RULES
from rllib_gaze.gaze import ATTENTION_MODES

# The compared arms (METHOD.md): name -> (attention, contrastive), i.e. the .gaze() settings that
# differ between them; everything else is shared.
ARMS = {
    "ppo": ("none", False),        # plain CNN baseline
    "gaze": ("foveal", True),      # the full method
    "gaze-rl": ("foveal", False),  # foveal gaze trained by RL only
    "patch": ("patch", True),      # unconstrained per-cell attention + contrastive loss
}

# Settings of .gaze() that go to the RLModule through model_config.
_MODULE_KEYS = ("attention", "gaze_floor", "gaze_sigma_min", "gaze_init_sigma", "gaze_rho_max")


class GazePPOConfig(PPOConfig):
    """PPOConfig with ppo_rgb's hyperparameters as defaults and a ``.gaze(...)`` section.

    Example::

        config = (GazePPOConfig()
                  .environment("clutter")
                  .gaze(attention="foveal", contrastive=True, contrastive_margin=0.2))
        algo = config.build_algo()
    """

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or GazePPO)
        # ManiSkill ppo_rgb defaults (RLLIB_NOTES 7.2). Both arms share them.
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
        self.num_envs_per_env_runner = 512
        self.rollout_fragment_length = 50
        self.train_batch_size_per_learner = 512 * 50
        self.minibatch_size = 512 * 50 // 32
        self.adam_eps = 1e-5
        # success_once / success_at_end per episode in env_runners/ (ManiSkill's metrics).
        # Gaze drawings in TensorBoard every gaze_image_interval iterations (rllib_gaze.overlay).
        from rllib_gaze.envs.metrics import SuccessMetrics
        from rllib_gaze.overlay import GazeImages

        self.callbacks_class = [SuccessMetrics, GazeImages]

        # Gaze (module side).
        self.attention = "foveal"
        self.gaze_floor = 0.0
        self.gaze_sigma_min = 0.05
        self.gaze_init_sigma = 1.0
        self.gaze_rho_max = 0.9
        # Return-guided contrastive loss (learner side).
        self.contrastive = True
        self.contrastive_coeff = 1.0
        self.contrastive_margin = 0.2
        self.contrastive_k = 16
        self.contrastive_num_anchors = 128
        self.contrastive_buffer_capacity = 8192
        self.label_rule = "threshold"
        self.return_quantile = 0.5
        self.return_threshold = None
        self.relative_gap = 0.5
        self.mining_chunk_size = 4096
        self.mining_pool = 2
        self.contrastive_memory_checkpoint_mb = 64.0
        # TensorBoard drawings of the gaze (off by default).
        self.gaze_image_interval = 0
        self.gaze_image_count = 4

    def gaze(
        self,
        *,
        attention: str | None = NotProvided,
        gaze_floor: float | None = NotProvided,
        gaze_sigma_min: float | None = NotProvided,
        gaze_init_sigma: float | None = NotProvided,
        gaze_rho_max: float | None = NotProvided,
        contrastive: bool | None = NotProvided,
        contrastive_coeff: float | None = NotProvided,
        contrastive_margin: float | None = NotProvided,
        contrastive_k: int | None = NotProvided,
        contrastive_num_anchors: int | None = NotProvided,
        contrastive_buffer_capacity: int | None = NotProvided,
        label_rule: str | None = NotProvided,
        return_quantile: float | None = NotProvided,
        return_threshold: float | None = NotProvided,
        relative_gap: float | None = NotProvided,
        mining_chunk_size: int | None = NotProvided,
        mining_pool: int | None = NotProvided,
        contrastive_memory_checkpoint_mb: float | None = NotProvided,
        adam_eps: float | None = NotProvided,
        gaze_image_interval: int | None = NotProvided,
        gaze_image_count: int | None = NotProvided,
    ) -> "GazePPOConfig":
        """Sets the attention and contrastive-loss settings.

        Args:
            attention: ``"foveal"`` (one Gaussian), ``"patch"`` (one free weight per cell) or
                ``"none"`` (plain PPO).
            gaze_floor: minimum weight of any cell, in [0, 1).
            gaze_sigma_min, gaze_init_sigma, gaze_rho_max: foveal parameterisation (normalised
                units: the feature map spans [-1, 1]).
            contrastive: add the return-guided triplet loss (needs attention).
            contrastive_coeff: weight of the triplet loss next to the PPO loss.
            contrastive_margin: triplet margin on cosine distance (>= 0).
            contrastive_k: neighbours searched per anchor (>= 1).
            contrastive_num_anchors: anchors (triplets at most) per minibatch.
            contrastive_buffer_capacity: rows of the feature/return memory (>= num_anchors).
            label_rule: ``"threshold"``: positive = same side of the return threshold as the
                anchor; ``"relative"``: positive = return within ``relative_gap`` x (return std).
            return_quantile: threshold = this quantile of the memory's returns, in (0, 1).
            return_threshold: a fixed threshold instead of the quantile (``None``: use quantile).
            relative_gap: see ``label_rule``.
            mining_chunk_size: memory rows compared per matmul in the exact neighbour search.
            mining_pool: neighbours are searched on feature maps averaged over ``pool x pool``
                cells (1: the raw maps); 2 cuts the search cost ~4x.
            contrastive_memory_checkpoint_mb: checkpoints include the contrastive memory when it
                holds at most this many MB (0: never); a memory left out refills after a restore
                within ``contrastive_buffer_capacity / train batch`` iterations.
            adam_eps: Adam's epsilon (ppo_rgb: 1e-5).
            gaze_image_interval: every this many iterations, log ``gaze_image_count`` fixed
                observations with the gaze drawn on them to TensorBoard (``ray/tune/gaze_images``);
                0 = never.
            gaze_image_count: observations in that drawing (1 to 16).
        """
        for name, value in list(locals().items()):
            if name != "self" and value is not NotProvided:
                setattr(self, name, value)
        return self

    @property
    @override(PPOConfig)
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {key: getattr(self, key) for key in _MODULE_KEYS}

    @override(PPOConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from rllib_gaze.module import GazePPOModule

        return RLModuleSpec(module_class=GazePPOModule)

    @override(PPOConfig)
    def get_default_learner_class(self):
        from rllib_gaze.learner import GazePPOLearner

        return GazePPOLearner

    @override(PPOConfig)
    def validate(self) -> None:
        super().validate()
        for message in gaze_config_errors(self):
            self._value_error(message)


def gaze_config_errors(c: GazePPOConfig) -> list[str]:
    """Every problem with the gaze settings of ``c``, each naming the value and what is allowed."""
    errors = []
    user_model_config = c._model_config if isinstance(c._model_config, dict) else {}
    for key in _MODULE_KEYS:
        if key in user_model_config and user_model_config[key] != getattr(c, key):
            errors.append(f"model_config[{key!r}]={user_model_config[key]!r} disagrees with .gaze({key}="
                          f"{getattr(c, key)!r}); set it only through .gaze({key}=...) so the module and the "
                          "learner see the same value")
    if c.attention not in ATTENTION_MODES:
        errors.append(f"attention={c.attention!r} is not known; allowed values are {ATTENTION_MODES}")
    if c.contrastive and c.attention == "none":
        errors.append("contrastive=True needs attention: the contrastive loss trains the gaze, "
                      "and attention='none' has none; use attention='foveal' or 'patch', or contrastive=False")
    if not 0.0 <= c.gaze_floor < 1.0:
        errors.append(f"gaze_floor={c.gaze_floor!r} must be in [0, 1)")
    if not 0.0 < c.gaze_sigma_min < c.gaze_init_sigma:
        errors.append(f"gaze_sigma_min={c.gaze_sigma_min!r}, gaze_init_sigma={c.gaze_init_sigma!r}: "
                      "need 0 < gaze_sigma_min < gaze_init_sigma")
    if not 0.0 <= c.gaze_rho_max < 1.0:
        errors.append(f"gaze_rho_max={c.gaze_rho_max!r} must be in [0, 1)")
    if c.contrastive_coeff < 0:
        errors.append(f"contrastive_coeff={c.contrastive_coeff!r} must be >= 0")
    if c.contrastive_margin < 0:
        errors.append(f"contrastive_margin={c.contrastive_margin!r} must be >= 0")
    if c.contrastive_k < 1:
        errors.append(f"contrastive_k={c.contrastive_k!r} must be >= 1")
    if c.contrastive_num_anchors < 1:
        errors.append(f"contrastive_num_anchors={c.contrastive_num_anchors!r} must be >= 1")
    if c.contrastive_buffer_capacity < c.contrastive_num_anchors:
        errors.append(f"contrastive_buffer_capacity={c.contrastive_buffer_capacity!r} is smaller than one "
                      f"triplet batch (contrastive_num_anchors={c.contrastive_num_anchors!r}); it must be >= that")
    if c.label_rule not in LABEL_RULES:
        errors.append(f"label_rule={c.label_rule!r} is not known; allowed values are {LABEL_RULES}")
    if not 0.0 < c.return_quantile < 1.0:
        errors.append(f"return_quantile={c.return_quantile!r} must be in the open interval (0, 1)")
    if c.relative_gap < 0:
        errors.append(f"relative_gap={c.relative_gap!r} must be >= 0")
    if c.mining_chunk_size < 1:
        errors.append(f"mining_chunk_size={c.mining_chunk_size!r} must be >= 1")
    if not isinstance(c.mining_pool, int) or c.mining_pool < 1:
        errors.append(f"mining_pool={c.mining_pool!r} must be an integer >= 1")
    if not isinstance(c.gaze_image_interval, int) or c.gaze_image_interval < 0:
        errors.append(f"gaze_image_interval={c.gaze_image_interval!r} must be an integer >= 0 (0 = off)")
    if not isinstance(c.gaze_image_count, int) or not 1 <= c.gaze_image_count <= 16:
        errors.append(f"gaze_image_count={c.gaze_image_count!r} must be an integer in [1, 16]")
    if not c.contrastive_memory_checkpoint_mb >= 0:
        errors.append(f"contrastive_memory_checkpoint_mb={c.contrastive_memory_checkpoint_mb!r} must be >= 0")
    if c.adam_eps <= 0:
        errors.append(f"adam_eps={c.adam_eps!r} must be > 0")
    return errors


class GazePPO(PPO):
    """PPO with the foveal gaze and the return-guided contrastive loss (registered as ``"GazePPO"``)."""

    @classmethod
    @override(PPO)
    def get_default_config(cls) -> GazePPOConfig:
        return GazePPOConfig()
