"""Optional Weights & Biases logging of the Tune suite (``pip install "rllib-gaze[wandb]"``).

``wandb_callback`` returns Ray Tune's ``WandbLoggerCallback`` with what the suite adds: one W&B run
per trial named by its label (``<task>_<arm>_seed<k>``), grouped by experiment, and the gaze
drawings (``gaze_images`` of ``rllib_gaze.callbacks.GazeImages``) as W&B images. The rest is Ray's:
the trial's config becomes the run's config at its start, and every result is logged flattened
with ``/`` at step ``training_iteration``, like TensorBoard's ``ray/tune/...`` keys without that
prefix. Ray leaves out ``config``, ``done`` and ``should_checkpoint``, moves ``trial_id``, ``pid``,
``hostname``, ``node_ip``, ``date``, ``experiment_id`` and ``experiment_tag`` into the run's config,
and drops what is not a number or a W&B media object (lists, strings, arrays).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from ray.air.integrations.wandb import WandbLoggerCallback
from ray.tune.experiment import Trial

from rllib_gaze.suite import trial_label

try:
    import wandb
except ImportError as e:  # optional: wandb_callback says how to install it
    wandb = None
    _wandb_missing: ImportError | None = e
else:
    _wandb_missing = None

INSTALL_HINT = '--wandb needs the wandb package: pip install "rllib-gaze[wandb]"'

# wandb.init settings read from the environment. Each trial logs from its own Ray actor, which has
# the environment its Ray node started with, not the driver's: passed explicitly so that e.g.
# `WANDB_MODE=offline` set for the driver holds for every run.
_ENV_SETTINGS = {"WANDB_MODE": "mode", "WANDB_DIR": "dir"}


class GazeWandbLoggerCallback(WandbLoggerCallback):
    """``WandbLoggerCallback`` that names each run by its trial label and logs ``gaze_images``
    (``(3, H, W)`` uint8) as a ``wandb.Image``."""

    def _start_logging_actor(self, trial: Trial, exclude_results: list[str], **wandb_init_kwargs: Any) -> None:
        # Ray names the run str(trial), which is the label only under the suite's trial_name_creator.
        if "name" not in self.kwargs:
            wandb_init_kwargs["name"] = trial_label(trial.config)
        super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)

    def log_trial_result(self, iteration: int, trial: Trial, result: dict) -> None:
        images = result.get("gaze_images")
        if isinstance(images, np.ndarray) and images.ndim == 3:
            # Ray would make any 3-D array a wandb.Image as it is, read as (H, W, C): the drawing is
            # (C, H, W) (TensorBoard's layout), which wandb rejects ("Un-supported shape") and the
            # error would stop the experiment. The image (a PNG in wandb's temporary directory on
            # this node) pickles to the trial's logging actor, which runs on this node too.
            image = wandb.Image(np.ascontiguousarray(images.transpose(1, 2, 0)), **self.image_kwargs)
            result = {**result, "gaze_images": image}  # a copy: Tune's other loggers get the same dict
        super().log_trial_result(iteration, trial, result)


def wandb_callback(project: str, group: str, **kwargs: Any) -> WandbLoggerCallback:
    """A Tune callback logging every trial to W&B: run ``<task>_<arm>_seed<k>`` in ``project``,
    group ``group`` (the suite passes its experiment's name).

    ``kwargs`` go to ``WandbLoggerCallback`` (e.g. ``api_key_file``, ``upload_checkpoints``) and on
    from there to ``wandb.init`` (e.g. ``entity``, ``tags``, ``mode``, ``name``), taking precedence.
    By default ``mode`` and ``dir`` come from the driver's ``WANDB_MODE`` and ``WANDB_DIR``, and
    ``resume="allow"``: a trial continued by ``--resume`` goes on logging into its run (its id
    is the trial's id) instead of replacing it.

    Raises:
        ImportError: wandb is not installed, with the command that installs it.
    """
    if wandb is None:
        raise ImportError(INSTALL_HINT) from _wandb_missing
    for variable, setting in _ENV_SETTINGS.items():
        if os.environ.get(variable):
            kwargs.setdefault(setting, os.environ[variable])
    kwargs.setdefault("resume", "allow")
    return GazeWandbLoggerCallback(project=project, group=group, **kwargs)
