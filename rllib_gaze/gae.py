"""GAE from the sampling pass's values: the learner connector piece that ``.training(values_from_sampling=True)``
(GazePPOConfig's default) puts where RLlib's PPO learner has two (issue 29).

RLlib's PPO learner appends one artificial step to every episode chunk (``AddOneTsToEpisodesAndTruncate``)
and runs the critic over the whole train batch (``GeneralAdvantageEstimation``): the encoder once more
over every observation the env runner has already encoded, and one loss-masked row per chunk that
every epoch then carries through its minibatches (a whole extra minibatch per epoch when the chunks
are many). ppo_rgb takes the value from the forward pass that picks the action; so does this path.
The module emits ``Columns.VF_PREDS`` with the action (``GazePPOModule`` with model_config
``values_from_sampling``), either env runner (RLlib's stock one or ``BatchedEnvRunner``) keeps it per
step as it keeps the action's log-prob, and ``SampledValuesGAE``, at the head of the learner pipeline:

- runs the critic once over the chunks' last observations, one row per chunk (the observation after
  its last step: what RLlib's appended row holds);
- computes GAE's advantages and value targets with RLlib's recursion and conventions: a chunk that
  ends in a termination bootstraps 0, one that is truncated or cut at the end of a fragment the value
  of its last observation, and the recursion never crosses a chunk's end;
- standardises the advantages with RLlib's statistics (below);
- writes the learner-side ``TERMINATEDS``/``TRUNCATEDS`` of RLlib's pipeline (a chunk's last row is
  terminated, or else truncated) and ``BOOTSTRAP_VALUES``, and adds no row: the train batch holds
  exactly the sampled env steps, with no loss mask.

The values come from the env runner's copy of the module. PPO syncs it from the learner after every
update, before the next sample, so it holds the weights of the update that reads the values (the same
numbers up to the float rounding of another batch size; ``tests/test_gae.py`` checks them against
RLlib's pair on the same weights). A sampler that runs ahead of the learner would make them stale.

RLlib's statistics: its connector standardises the advantages over the whole batch, appended rows
included. Those rows are loss-masked, but their advantages are not zero: the recursion does not stop
at an appended row (neither terminated nor truncated), so chunk k's gets ``gamma * V(first observation
of chunk k + 1) - V(last observation of chunk k) + gamma * lambda * A(first row of chunk k + 1)``, the
next chunk in the batch's order (0 after the batch's last chunk). With one such row per chunk (about
one in 30 to 50 rows at the suite's shapes) and values larger than the TD errors, they widen the
standard deviation. They are reproduced here for the mean and the standard deviation only, so that
this path trains exactly as RLlib's (the suite's results before issue 29 stay comparable); it costs
the critic on the last observations of the terminated chunks too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import tree
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.env.multi_agent_episode import MultiAgentEpisode
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from ray.rllib.utils.annotations import override
from ray.rllib.utils.torch_utils import convert_to_torch_tensor

# Train-batch column: at each chunk's last row, the critic's value of the observation after that
# row's step (0 where the chunk ends in a termination); 0 on every other row.
BOOTSTRAP_VALUES = "bootstrap_values"


@torch.no_grad()
def backward_discounted_sum(value: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """``x (N,)`` in float64 with ``x_t = value_t + coeff_t * x_{t+1}`` and ``x_N = 0``: a discounted sum
    from the end, where ``coeff_t = 0`` cuts it (a chunk's end).

    Computed where the rows are, without reading them on the host: an associative scan in
    ``ceil(log2 N)`` vector steps, in float64; with ``|coeff| <= 1`` nothing can overflow whatever
    the chunk lengths."""
    value, coeff = value.to(torch.float64), coeff.to(torch.float64)
    offset = 1
    while offset < value.shape[0]:
        # (coeff, value)[t] now says x_t = coeff_t * x_{t+offset} + value_t; x past the last row is 0
        value = torch.cat([value[:-offset] + coeff[:-offset] * value[offset:], value[-offset:]])
        coeff = torch.cat([coeff[:-offset] * coeff[offset:], coeff[-offset:]])
        offset *= 2
    return value


def chunk_gae(rewards: np.ndarray, values: np.ndarray, lengths: np.ndarray, last_values: np.ndarray,
              terminated: np.ndarray, gamma: float, lambda_: float) -> tuple[np.ndarray, np.ndarray]:
    """GAE over ``K`` episode chunks laid end to end, as RLlib's ``compute_value_targets`` computes it on
    its layout (the same float64 arithmetic in the same order, the results rounded to float32 where it
    rounds them).

    Args:
        rewards, values: ``(N,)`` float32, each row's reward and ``V(s_t)``.
        lengths: ``(K,)`` rows of each chunk (>= 1; they sum to ``N``).
        last_values: ``(K,)`` ``V`` of the observation after each chunk's last step.
        terminated: ``(K,)`` whether each chunk ends in a termination (its bootstrap is then 0).

    Returns:
        The advantages ``(N,)`` in float64 (RLlib's running sums) and the value targets ``(N,)``
        float32 (``advantage + V``).
    """
    ends = np.cumsum(lengths) - 1
    next_values = np.append(values[1:], 0.0)
    next_values[ends] = last_values
    non_terminal = np.ones(len(values))
    non_terminal[ends[terminated]] = 0.0
    deltas = rewards + gamma * non_terminal * next_values - values
    coeff = np.full(len(values), gamma * lambda_)
    coeff[ends] = 0.0    # RLlib's chunk ends are terminated or truncated: no propagation across
    advantages = backward_discounted_sum(torch.from_numpy(deltas), torch.from_numpy(coeff)).numpy()
    return advantages, (advantages.astype(np.float32) + values).astype(np.float32)


def rllib_advantage_statistics(advantages: np.ndarray, value_targets: np.ndarray, values: np.ndarray,
                               lengths: np.ndarray, last_values: np.ndarray, gamma: float,
                               lambda_: float) -> tuple[np.float32, np.float32]:
    """The mean and standard deviation by which RLlib's GAE connector standardises the advantages of the
    same chunks: over the real rows' ``value_targets - values`` and, per chunk, its appended row's (module
    docstring), which ``advantages`` (float64, ``chunk_gae``'s) and the values give without the rows."""
    starts = np.cumsum(lengths) - lengths
    next_first_values = np.append(values[starts[1:]], 0.0)
    next_first_advantages = np.append(advantages[starts[1:]], 0.0)
    appended = np.float32(0.0) + gamma * 1.0 * next_first_values - last_values + gamma * lambda_ * next_first_advantages
    appended_targets = (appended.astype(np.float32) + last_values).astype(np.float32)
    every_row = np.concatenate([value_targets - values, appended_targets - last_values])
    return every_row.mean(), every_row.std()


def gae_columns(rewards: np.ndarray, values: np.ndarray, lengths: np.ndarray, last_values: np.ndarray,
                terminated: np.ndarray, gamma: float, lambda_: float) -> dict[str, np.ndarray]:
    """The train-batch columns ``SampledValuesGAE`` writes for ``K`` episode chunks laid end to end
    (arguments as ``chunk_gae``'s): ``ADVANTAGES`` (standardised with RLlib's statistics),
    ``VALUE_TARGETS``, the learner-side ``TERMINATEDS``/``TRUNCATEDS`` (a chunk's last row is
    terminated, or else truncated: a cut counts as a truncation) and ``BOOTSTRAP_VALUES``, ``(N,)``
    each, in the chunks' order. ``rllib_gaze.rollout`` computes them from a fragment's buffers."""
    advantages, value_targets = chunk_gae(rewards, values, lengths, last_values, terminated, gamma, lambda_)
    mean, std = rllib_advantage_statistics(advantages, value_targets, values, lengths, last_values, gamma, lambda_)
    ends = np.cumsum(lengths) - 1
    last = np.zeros(len(values), bool)
    last[ends] = True
    ends_terminated = np.zeros(len(values), bool)
    ends_terminated[ends[terminated]] = True
    bootstrap = np.zeros(len(values), np.float32)
    bootstrap[ends] = np.where(terminated, 0.0, last_values).astype(np.float32)
    return {
        Columns.ADVANTAGES: (value_targets - values - mean) / max(1e-4, std),
        Columns.VALUE_TARGETS: value_targets,
        Columns.TERMINATEDS: ends_terminated,
        Columns.TRUNCATEDS: last & ~ends_terminated,
        BOOTSTRAP_VALUES: bootstrap,
    }


class SampledValuesGAE(ConnectorV2):
    """Learner connector piece: GAE advantages and value targets from the values the env runner's forward
    pass emitted (``Columns.VF_PREDS``), bootstrapped by one critic pass over the chunks' last
    observations; no appended rows (module docstring). Single-agent episodes of a stateless module."""

    def __init__(self, input_observation_space=None, input_action_space=None, *, gamma: float, lambda_: float):
        super().__init__(input_observation_space, input_action_space)
        self.gamma, self.lambda_ = gamma, lambda_

    @override(ConnectorV2)
    def __call__(self, *, rl_module, batch: dict[str, Any], episodes: list, **kwargs) -> Any:
        if not episodes:
            return batch
        if any(isinstance(e, MultiAgentEpisode) for e in episodes):
            raise ValueError("values_from_sampling=True supports single-agent episodes only; set "
                             ".training(values_from_sampling=False) for RLlib's GAE connector")
        module = rl_module[DEFAULT_MODULE_ID]
        module = module.unwrapped() if hasattr(module, "unwrapped") else module
        if module.is_stateful():
            raise ValueError("values_from_sampling=True needs a stateless module (RLlib's GAE connector "
                             "zero-pads sequences for a stateful one): set .training(values_from_sampling=False)")
        chunks: list[SingleAgentEpisode] = [e for e in episodes if len(e)]   # a chunk of no step has no row
        for i, chunk in enumerate(chunks):
            # As AddOneTsToEpisodesAndTruncate: two chunks of one episode in the batch stay two chunks
            # (the pipeline groups rows by episode id).
            chunk.id_ += f"_{i}"
        missing = [c for c in chunks if Columns.VF_PREDS not in c.extra_model_outputs]
        if missing:
            raise ValueError(
                f"values_from_sampling=True: {len(missing)} of {len(chunks)} episode chunks have no "
                f"{Columns.VF_PREDS!r} from the env runner's forward pass (GazePPOModule emits it when the "
                "config's values_from_sampling reaches its model_config); a module that does not emit it "
                "needs .training(values_from_sampling=False)")
        lengths = np.array([len(c) for c in chunks])
        rewards = np.concatenate([np.asarray(c.get_rewards(), np.float32) for c in chunks])
        values = np.concatenate([np.asarray(c.get_extra_model_outputs(Columns.VF_PREDS), np.float32)
                                 for c in chunks])
        terminated = np.array([c.is_terminated for c in chunks])
        last_values = self._last_values(module, chunks)
        columns = gae_columns(rewards, values, lengths, last_values, terminated, self.gamma, self.lambda_)
        for chunk, start, length in zip(chunks, np.cumsum(lengths) - lengths, lengths):
            for column, items in columns.items():
                self.add_n_batch_items(batch, column, items[start: start + length], length, chunk)
        return batch

    @staticmethod
    def _last_values(module, chunks: list[SingleAgentEpisode]) -> np.ndarray:
        """``(K,)`` float32 critic values of each chunk's last observation, in one forward pass on the
        module's device."""
        last = tree.map_structure(lambda *rows: np.stack(rows), *[c.get_observations(-1) for c in chunks])
        device = next(module.parameters()).device
        with torch.no_grad():
            values = module.compute_values({Columns.OBS: convert_to_torch_tensor(last, device=device)})
        return values.float().cpu().numpy()
