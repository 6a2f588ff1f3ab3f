"""rllib-gaze: "Gaze on the Prize" (foveal attention + return-guided contrastive loss) for RLlib PPO and SAC.

Importing the package registers the ``"GazePPO"`` and ``"GazeSAC"`` trainables and the package's envs with Tune.
"""

from ray import tune

from rllib_gaze import envs  # noqa: F401  (registers env names)
from rllib_gaze.arms import ARMS
from rllib_gaze.config import GazePPO, GazePPOConfig
from rllib_gaze.env_runner import BatchedEnvRunner
from rllib_gaze.sac_config import GazeSAC, GazeSACConfig

tune.register_trainable("GazePPO", GazePPO)
tune.register_trainable("GazeSAC", GazeSAC)

__all__ = ["ARMS", "BatchedEnvRunner", "GazePPO", "GazePPOConfig", "GazeSAC", "GazeSACConfig"]
