"""Per-episode success metrics in RLlib's results, from the ``success`` flag every env here reports."""

from __future__ import annotations

from ray.rllib.callbacks.callbacks import RLlibCallback


def _success(episode) -> bool:
    info = episode.get_infos(-1)
    return bool(info.get("success", False)) if isinstance(info, dict) else False


class SuccessMetrics(RLlibCallback):
    """Logs ``success_once`` (success at any step) and ``success_at_end`` (at the last step) per
    finished episode, averaged over the episodes of an iteration: ``env_runners/success_once``,
    ``env_runners/success_at_end`` (ManiSkill's ``success_once`` / ``success_at_end``).

    Episodes can span several sampling calls; "once" is therefore tracked step by step per episode.
    """

    def __init__(self):
        super().__init__()
        self._succeeded: set[str] = set()

    def on_episode_step(self, *, episode, **kwargs) -> None:
        if _success(episode):
            self._succeeded.add(episode.id_)

    def on_episode_end(self, *, episode, metrics_logger=None, **kwargs) -> None:
        at_end = _success(episode)
        once = at_end or episode.id_ in self._succeeded
        self._succeeded.discard(episode.id_)
        if metrics_logger is not None:
            metrics_logger.log_value("success_once", float(once), reduce="mean")
            metrics_logger.log_value("success_at_end", float(at_end), reduce="mean")
