"""A rollout that stays where the env put it: ``.env_runners(rollout="device")`` (issue 29, item 3).

RLlib's PPO hands the learner episodes: the env runner cuts its fragment into one
``SingleAgentEpisode`` per sub-env and episode chunk, and the learner connector concatenates their
arrays again into a train batch (a host copy of every observation, then a host-to-device copy when
the learner is on a GPU). When the env, the sampling and the learner share one process and device
(one local learner, ``num_env_runners=0``, as ManiSkill's ppo_rgb.py runs), none of that is needed:
``BatchedEnvRunner`` already holds the fragment as ``(rows, N, ...)`` buffers on the env's device.
With ``rollout="device"``:

- ``BatchedEnvRunner.sample_rollout`` samples the fragment as ``sample`` does (the episodes are still
  built, as views, for the episode callbacks and RLlib's episode metrics: returns, lengths, success)
  and returns a ``Rollout``: the buffers themselves, the observations uint8 where the env wrote
  them, and where each episode chunk lies in them;
- ``GazePPO.training_step`` hands it to ``learner_group.update(batch=rollout)``;
- ``GazePPOLearner`` turns it into the train batch (``rollout_batch``): every column the episode path's
  learner connector builds, for the same rows in the same order (chunk by chunk, in the order of the
  episodes ``sample`` returns), GAE computed by the same code (``rllib_gaze.gae.gae_columns``) from
  the sampling pass's values, except the observations, which stay in the rollout's buffers;
- ``RolloutMinibatches`` then draws the minibatches by index, the observations gathered from the
  buffers per minibatch: the rows ``MiniBatchCyclicIterator`` would draw from the episode path's
  batch, with the same ``np.random.permutation`` calls, so a seeded run trains exactly as on the
  episode path (``tests/test_rollout.py``).

Host copies of the observations per iteration: none on the way to the update where the env gives
tensors on the learner's device (on a GPU, no device-to-host copy either: the episodes get
zero-stride placeholders for their observations, which no callback of ours reads); env observations on
another device reach the learner's in one copy per minibatch gather. What stays on the host either
way: the per-step rewards, terminated/truncated flags and infos (the sampling loop reads them) and
GAE's arithmetic over ``(B,)`` rows (``chunk_gae``; its values come from the device once).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import tree
from ray.rllib.connectors.common.batch_individual_items import BatchIndividualItems
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModule
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.annotations import override
from ray.rllib.utils.spaces.space_utils import BatchedNdArray

from rllib_gaze.gae import gae_columns

# config.rollout: how a fragment reaches the learner (GazeConfigMixin.env_runners).
ROLLOUTS = ("episodes", "device")


@dataclasses.dataclass
class Rollout:
    """One fragment of ``BatchedEnvRunner``, as its buffers (``T`` rows, ``N`` sub-envs).

    Attributes:
        obs: observation row ``t`` of sub-env ``i`` at ``[t, i]`` (a tensor, or a dict of them for a
            Dict space), the env's dtype, on the env's device; row ``t`` is the observation after
            step ``t`` (before it, the fragment's first observation).
        steps: per step column (``ACTIONS``, ``REWARDS``, the module's extra outputs such as
            ``VF_PREDS`` and ``ACTION_LOGP``), ``(T, N, ...)`` tensors (on the env's or module's device)
            or numpy arrays; row ``t`` is the step from observation ``t - 1`` to ``t``.
        chunks: ``(K, 3)`` int64 numpy: each episode chunk's sub-env, first observation row and last
            row (its last step's), in the order of the episodes ``sample`` returned.
        terminated: ``(K,)`` bool numpy: whether each chunk ends in a termination.
    """

    obs: Any
    steps: dict[str, Any]
    chunks: np.ndarray
    terminated: np.ndarray

    def __len__(self) -> int:
        """Env steps (train-batch rows)."""
        return int((self.chunks[:, 2] - self.chunks[:, 1]).sum())

    def step_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """``(B,)`` row and sub-env of every step, chunk by chunk."""
        lengths = self.chunks[:, 2] - self.chunks[:, 1]
        env = np.repeat(self.chunks[:, 0], lengths)
        first = np.repeat(self.chunks[:, 1] + 1 - (np.cumsum(lengths) - lengths), lengths)
        return first + np.arange(len(env)), env


def _take(column: Any, rows: np.ndarray, env: np.ndarray, device: torch.device) -> torch.Tensor:
    """``column[rows, env]`` as a tensor on ``device`` (indexed where it lies)."""
    if isinstance(column, torch.Tensor):
        index = (torch.as_tensor(rows, device=column.device), torch.as_tensor(env, device=column.device))
        return column[index].to(device)
    return torch.as_tensor(column[rows, env]).to(device)


def rollout_batch(rollout: Rollout, module, gamma: float, lambda_: float, device: torch.device
                  ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The train batch of ``rollout`` without its observations: the columns of the episode path's
    learner connector (``SampledValuesGAE`` + RLlib's defaults) for the same rows in the same order,
    as tensors on ``device``; and the ``(B,)`` observation row and sub-env of each row, on the
    observations' device, for ``RolloutMinibatches``. ``module``: the learner's, for the critic's
    values of the chunks' last observations (one pass over ``K`` rows, as ``SampledValuesGAE``)."""
    if Columns.VF_PREDS not in rollout.steps:
        raise ValueError(f"rollout='device' computes GAE from the sampling pass's values, and the env runner's "
                         f"forward pass gave no {Columns.VF_PREDS!r} (GazePPOModule emits it when the config's "
                         "values_from_sampling reaches its model_config); use rollout='episodes' with this module")
    rows, env = rollout.step_rows()
    lengths = rollout.chunks[:, 2] - rollout.chunks[:, 1]
    columns = {name: _take(column, rows, env, device) for name, column in rollout.steps.items()}
    for name, column in columns.items():   # NumpyToTensor's float64 -> float32
        if column.is_floating_point() and column.dtype != torch.float16:
            columns[name] = column.float()
    last = tree.map_structure(lambda o: _take(o, rollout.chunks[:, 2], rollout.chunks[:, 0], device), rollout.obs)
    with torch.no_grad():
        last_values = module.compute_values({Columns.OBS: last}).float().cpu().numpy()
    rewards = columns[Columns.REWARDS].cpu().numpy()
    values = columns[Columns.VF_PREDS].cpu().numpy()
    gae = gae_columns(rewards, values, lengths, last_values, rollout.terminated, gamma, lambda_)
    columns.update({name: torch.as_tensor(column).to(device) for name, column in gae.items()})
    obs_device = tree.flatten(rollout.obs)[0].device
    return columns, (torch.as_tensor(rows - 1, device=obs_device), torch.as_tensor(env, device=obs_device))


class RolloutMinibatches:
    """``MiniBatchCyclicIterator`` on a rollout's train batch, by index: the same minibatches, in the
    same order, with the same ``np.random.permutation`` draws (one at each pass over the end of the
    batch, the first pass unshuffled), without permuting the batch in memory; each minibatch's
    observations are gathered from the rollout's buffers (uint8)."""

    def __init__(self, module_id: str, columns: dict[str, torch.Tensor], obs: Any,
                 obs_rows: tuple[torch.Tensor, torch.Tensor], *, num_epochs: int, minibatch_size: int | None,
                 shuffle: bool, num_total_minibatches: int = 0):
        self.module_id, self.columns, self.obs, self.obs_rows = module_id, columns, obs, obs_rows
        self.count = len(obs_rows[0])
        self.num_epochs, self.shuffle, self.num_total_minibatches = num_epochs, shuffle, num_total_minibatches
        self.minibatch_size = minibatch_size or self.count

    def __iter__(self) -> Iterator[MultiAgentBatch]:
        n, device = self.count, next(iter(self.columns.values())).device
        order = torch.arange(n, device=device)
        start, epochs, minibatches = 0, 0, 0
        while ((self.num_total_minibatches == 0 and epochs < self.num_epochs)
               or (self.num_total_minibatches > 0 and minibatches < self.num_total_minibatches)):
            size, parts = self.minibatch_size, []
            while start + size >= n:   # MiniBatchCyclicIterator's wrap, shuffle and epoch count
                parts.append(order[start:])
                size -= n - start
                start = 0
                epochs += 1
                if self.shuffle:
                    order = order[torch.from_numpy(np.random.permutation(n)).to(device)]
            if size > 0:
                parts.append(order[start: start + size])
            start += size
            index = parts[0] if len(parts) == 1 else torch.cat(parts)
            yield self._minibatch(index)
            minibatches += 1

    def _minibatch(self, index: torch.Tensor) -> MultiAgentBatch:
        batch = {name: column[index] for name, column in self.columns.items()}
        rows, env = (r[index.to(r.device)] for r in self.obs_rows)
        device = index.device
        batch[Columns.OBS] = tree.map_structure(lambda o: o[rows, env].to(device), self.obs)
        return MultiAgentBatch({self.module_id: SampleBatch(batch)}, self.count)


class PinnedBatchIndividualItems(BatchIndividualItems):
    """RLlib's ``BatchIndividualItems`` for a single-agent learner on a GPU (``GazePPOLearner`` puts it in
    the learner connector pipeline there; the remote path of ``rollout="episodes"``): each column whose
    items are arrays, one per episode chunk, is concatenated straight into pinned host memory, a torch
    tensor, which ``NumpyToTensor`` then copies to the GPU without blocking (the caching host allocator
    keeps that memory until the copy is done). RLlib's concatenates into pageable memory, whose copy to
    the GPU is synchronous and goes through the driver's own staging buffer. Still one host copy of the
    observations. Other columns (infos, dict observations) are RLlib's."""

    @override(BatchIndividualItems)
    def __call__(self, *, rl_module, batch: dict[str, Any], episodes, explore=None, shared_data=None,
                 **kwargs) -> Any:
        pinned = {}
        for column, column_data in list(batch.items()):
            if self._multi_agent or column == Columns.INFOS or not isinstance(column_data, dict):
                continue
            items = [item for values in column_data.values() for item in values]
            if not items or not all(isinstance(i, BatchedNdArray) and i.dtype != object for i in items):
                continue
            dtype = torch.from_numpy(np.empty(0, items[0].dtype)).dtype
            out = torch.empty((sum(len(i) for i in items), *items[0].shape[1:]), dtype=dtype,
                              pin_memory=torch.cuda.is_available())   # (unpinned on a CPU machine's tests)
            np.concatenate(items, axis=0, out=out.numpy())
            pinned[column] = out
            if column == Columns.OBS and shared_data is not None:   # as RLlib's piece records it
                shared_data["memorized_map_structure"] = [
                    key[0] for key, values in column_data.items() for item in values for _ in range(len(item))]
            del batch[column]
        batch = super().__call__(rl_module=rl_module, batch=batch, episodes=episodes, explore=explore,
                                 shared_data=shared_data, **kwargs)
        # where RLlib's piece puts a single agent's columns
        (batch.setdefault(DEFAULT_MODULE_ID, {}) if isinstance(rl_module, MultiRLModule) else batch).update(pinned)
        return batch


def pin_learner_batches(pipeline) -> bool:
    """Puts ``PinnedBatchIndividualItems`` in place of RLlib's ``BatchIndividualItems`` in a learner
    connector pipeline; whether it found one."""
    for i, piece in enumerate(pipeline.connectors):
        if type(piece) is BatchIndividualItems:
            pipeline.connectors[i] = PinnedBatchIndividualItems(piece.input_observation_space,
                                                                piece.input_action_space,
                                                                multi_agent=piece._multi_agent)
            return True
    return False
