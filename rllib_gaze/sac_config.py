"""GazeSACConfig / GazeSAC: RLlib's SAC with ManiSkill sac_rgbd's defaults plus the gaze knobs.

Plain SAC, the baseline arm, is ``GazeSACConfig().gaze(attention="none", contrastive=False)``:
every other setting is identical between arms. docs/method.md ("GazeSAC") maps every sac_rgbd
setting onto RLlib's and says what RLlib does differently.
"""

from __future__ import annotations

import numpy as np
from ray.rllib.algorithms.sac import SAC, SACConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override

from rllib_gaze.callbacks import GazeImages, SuccessMetrics
from rllib_gaze.config import ENV_RUNNER_RESTARTS, GazeConfigMixin, stop_without_env_runners

# Replay buffer rows (env steps) by default: sac_rgbd keeps 1M on the GPU; RLlib keeps episodes in
# host memory, and 50k steps of 128x128 RGB observations are ~2.5 GB (64x64: ~0.6 GB).
REPLAY_CAPACITY = 50_000
# sac_rgbd: every training_freq = 64 env steps (16 envs x 4 steps), utd x training_freq = 16
# gradient steps of 512 rows.
TRAINING_FREQ, UTD, BATCH = 64, 0.25, 512


class GazeSACConfig(GazeConfigMixin, SACConfig):
    """SACConfig with sac_rgbd's hyperparameters as defaults, Adam's ``eps`` in
    ``.training(adam_eps=...)`` and the ``.gaze(...)`` section of ``GazePPOConfig``.

    The labels of the contrastive loss are the critic's Bellman target (``"value_target"``) or its
    detached Q (``"value"``); ``gaze_predict_coeff`` (a PPO-only objective) must stay 0.

    Example::

        config = (GazeSACConfig()
                  .environment("clutter", env_config={"include_state": True})
                  .gaze(attention="foveal", contrastive=True))
        algo = config.build_algo()
    """

    ALLOWED_RETURNS = ("value_target", "value")
    ALLOWED_MININGS = ("memory",)   # replayed rows carry no episode chunks
    ALLOWED_ROLLOUTS = ("episodes",)   # rollout="device" hands PPO's on-policy fragment to its update

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class or GazeSAC)
        # ManiSkill sac_rgbd defaults (docs/method.md, "GazeSAC"). Every arm shares them.
        self.num_env_runners = 0                 # RLlib's training_intensity counts runners + 1 samplers
        self.num_envs_per_env_runner = 16
        self.rollout_fragment_length = TRAINING_FREQ // 16
        self.train_batch_size_per_learner = BATCH
        # Replayed rows per sampled env step: 16 steps of 512 per 64 sampled = 128.
        self.training_intensity = UTD * TRAINING_FREQ * BATCH / TRAINING_FREQ
        self.num_steps_sampled_before_learning_starts = 4_000
        self.replay_buffer_config = {"type": "EpisodeReplayBuffer", "capacity": REPLAY_CAPACITY}
        self.gamma = 0.8
        self.tau = 0.01
        self.target_network_update_freq = 0      # soft update after every gradient step
        self.actor_lr = 3e-4
        self.critic_lr = 3e-4
        self.alpha_lr = 3e-4                     # sac_rgbd: the alpha Adam takes q_lr
        self.initial_alpha = 1.0                 # sac_rgbd: log_alpha = 0
        self.target_entropy = "auto"             # -|A|, as sac_rgbd
        self.twin_q = True
        self.n_step = 1
        self.adam_eps = 1e-8                     # torch's default, as sac_rgbd; RLlib's SAC uses 1e-7
        self.max_num_env_runner_restarts = ENV_RUNNER_RESTARTS  # as GazePPOConfig: then the trial stops
        self.callbacks_class = [SuccessMetrics, GazeImages]
        self._init_gaze_settings()

    @override(SACConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from rllib_gaze.sac_module import GazeSACModule

        return RLModuleSpec(module_class=GazeSACModule)

    @override(SACConfig)
    def get_default_learner_class(self):
        from rllib_gaze.sac_learner import GazeSACLearner

        return GazeSACLearner

    @override(GazeConfigMixin)
    def validate(self) -> None:
        super().validate()
        if self.gaze_predict_coeff:
            self._value_error(f"gaze_predict_coeff={self.gaze_predict_coeff!r}: the gaze-predict objective is "
                              "GazePPO's only; GazeSAC needs 0")


class GazeSAC(SAC):
    """SAC with the foveal gaze and the return-guided contrastive loss (registered as ``"GazeSAC"``)."""

    @classmethod
    @override(SAC)
    def get_default_config(cls) -> GazeSACConfig:
        return GazeSACConfig()

    @override(SAC)
    def setup(self, config) -> None:
        super().setup(config)
        # RLlib's EpisodeReplayBuffer draws its batches from an unseeded generator: without this, two
        # runs with the same .debugging(seed=...) replay different rows and learn differently.
        buffer = self.local_replay_buffer
        if buffer is not None and self.config.seed is not None and hasattr(buffer, "rng"):
            buffer.rng = np.random.default_rng(self.config.seed)

    @override(SAC)
    def training_step(self) -> None:
        super().training_step()
        stop_without_env_runners(self)
