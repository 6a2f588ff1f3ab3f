"""rllib-gaze: "Gaze on the Prize" (foveal attention + return-guided contrastive loss) for RLlib PPO.

Importing the package registers the ``"GazePPO"`` trainable and the package's envs with Tune.
"""

from ray import tune

from rllib_gaze import envs  # noqa: F401  (registers env names)
from rllib_gaze.arms import ARMS
from rllib_gaze.config import GazePPO, GazePPOConfig

tune.register_trainable("GazePPO", GazePPO)

__all__ = ["ARMS", "GazePPO", "GazePPOConfig"]
