"""The RLlib callbacks every GazePPO trial runs (``GazePPOConfig`` sets them).

- ``SuccessMetrics``: per-episode success in the results, from the ``success`` flag every env here
  reports.
- ``GazeImages``: drawings of the gaze in the results, for TensorBoard (and W&B).
"""

from __future__ import annotations

import logging
import math

from ray.rllib.callbacks.callbacks import RLlibCallback

logger = logging.getLogger(__name__)


def _succeeded(info) -> bool:
    return bool(info.get("success", False)) if isinstance(info, dict) else False


class SuccessMetrics(RLlibCallback):
    """Logs ``success_once`` (success at any step) and ``success_at_end`` (at the last step) per
    finished episode, averaged over the episodes of an iteration: ``env_runners/success_once``,
    ``env_runners/success_at_end`` (ManiSkill's ``success_once`` / ``success_at_end``).

    An episode can span several sampling calls: "once" reads the infos of every chunk, the earlier
    ones from ``prev_episode_chunks``. All of it happens at the episode's end: a per-step callback
    cost a fifth of ``BatchedEnvRunner``'s sampling time (docs/benchmarks.md, "Batched env runner").
    """

    def on_episode_end(self, *, episode, prev_episode_chunks=None, metrics_logger=None, **kwargs) -> None:
        at_end = _succeeded(episode.get_infos(-1))
        chunks = [*(prev_episode_chunks or []), episode]
        once = at_end or any(_succeeded(info) for chunk in chunks for info in chunk.get_infos())
        if metrics_logger is not None:
            metrics_logger.log_value("success_once", float(once), reduce="mean")
            metrics_logger.log_value("success_at_end", float(at_end), reduce="mean")


class GazeImages(RLlibCallback):
    """Every ``gaze_image_interval`` iterations (config, 0 = off) puts ``gaze_images`` into the
    result: ``(3, H', W')`` uint8, ``gaze_image_count`` fixed observations of the training env with
    the current gaze drawn on them, tiled. Tune's TensorBoard logger writes it as the image
    ``ray/tune/gaze_images`` of the trial."""

    def __init__(self):
        super().__init__()
        self._obs = None
        self._failed = False

    def on_train_result(self, *, algorithm, metrics_logger=None, result: dict, **kwargs) -> None:
        config = algorithm.config
        interval = getattr(config, "gaze_image_interval", 0)
        iteration = result.get("training_iteration", algorithm.iteration)  # called after Tune counted it
        if not interval or iteration % interval or config.attention == "none" or self._failed:
            return
        from rllib_gaze.overlay import draw_batch, fixed_observations, tile  # drawing code only when drawing

        try:
            if self._obs is None:
                self._obs = fixed_observations(config.env, dict(config.env_config), config.gaze_image_count,
                                               config.seed or 0)
            images = draw_batch(algorithm.get_module(), self._obs, config.gaze_floor)
        except Exception as e:  # drawing must never stop training
            self._failed = True
            logger.warning("gaze images disabled for this trial: %s", e)
            return
        columns = math.ceil(math.sqrt(len(images)))
        scale = max(1, 128 // images[0].shape[0])
        result["gaze_images"] = tile(images, columns, scale).transpose(2, 0, 1)
