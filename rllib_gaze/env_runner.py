"""``BatchedEnvRunner``: RLlib's ``SingleAgentEnvRunner`` with a sampling loop over whole batches.

RLlib's stock runner does Python work per sub-env per step: it adds every step to one
``SingleAgentEpisode`` per sub-env, runs the connector pipelines on lists of per-sub-env items and
stacks each episode's observations again at the end (docs/benchmarks.md: ~40k env-steps/s at most
per runner at 64 px, whatever the simulator). ``BatchedEnvRunner`` keeps everything else of the
stock runner (``make_env``, spaces, ``get_state``/``set_state`` with connector states and module
weights, ``get_metrics``, evaluation runners, fault tolerance) and replaces only ``_sample``:

- the current observations stay one batch; each step runs the module's forward pass
  (``forward_exploration`` when exploring, ``forward_inference`` otherwise) on the whole batch and
  the default module-to-env logic (sample or take the mean of the action distribution, its log-prob,
  unsquash or clip into the action space) on the batch;
- observations, actions, rewards, terminated/truncated, infos and the module's extra outputs
  (``action_logp``, ``action_dist_inputs``, ...: the stock runner's ``extra_model_outputs``) go into
  ``(rows, N, ...)`` numpy buffers allocated once per fragment, laid out sub-env by sub-env in memory,
  so that an episode chunk's arrays are contiguous views, which Ray's object store takes out of band
  (a remote runner's episodes are not pickled byte by byte);
- where the env gives torch tensors (``BatchedEnvBridge`` with ``torch_observations``, its default;
  issue 22), the forward pass reads the env's own observation tensors, actions go back to the env as
  tensors, and the rows of every tensor value (observations, actions, extra outputs) are written into
  buffers on its device, copied into the numpy buffers once at the end of the fragment; on the CPU
  those buffers are the numpy buffers' own memory, so nothing is copied twice. A GPU simulation's
  observations then reach a policy on the GPU without a device -> host -> device trip per step.
  Rewards, terminated/truncated and infos come to the host every step: the loop's bookkeeping needs
  them. The episodes are the same either way;
- at the end of the fragment one ``SingleAgentEpisode`` per sub-env and episode chunk is built from
  views of those buffers, with the stock runner's semantics through ``BatchedEnvBridge``
  (next-step autoreset: the step after a done returns the reset observation, starts a new episode
  and is not counted as an env step; chunks continuing across fragments keep their episode id,
  ``t_started`` and ``episode_lookback_horizon`` steps of lookback, as ``SingleAgentEpisode.cut``
  gives them);
- the episode callbacks (``on_episode_created``/``start``/``step``/``end``) are called at the end
  of the fragment, once per episode chunk and, for ``on_episode_step``, once per step with the
  episode as it was after that step (its buffers cut to that step), so ``SuccessMetrics`` logs the
  same values. Differences from the stock runner: the calls come after the fragment rather than
  interleaved with env steps (a callback that looks at the env itself sees its state at the end of
  the fragment), and ``on_episode_created``/``on_episode_start`` of an episode whose reset is the
  last step of a fragment come in the next ``sample`` call. ``on_episode_step`` is only replayed
  when a callback overrides it: its per-step, per-sub-env calls are the one Python cost left per
  env step.
- The episodes' arrays are views of the fragment's buffers, which the runner writes again once no
  episode of theirs is alive any more; so the earlier chunks RLlib keeps for its episode metrics
  (and hands ``on_episode_end`` as ``prev_episode_chunks``) are summaries: length, return, rewards,
  infos, custom data and duration, not full episodes.

``sample(num_episodes=...)`` (evaluation by episodes) runs the same loop from a seeded reset until
that many episodes are done and returns the first of them in the order they finished, as the stock
runner does; the episodes still running then are dropped without their callbacks being replayed (the
stock runner has called ``on_episode_created``/``start``/``step`` for them).

Where the batched loop does not apply, ``_sample`` falls back to the stock loop (same results, stock
speed): a stateful module, env-to-module or module-to-env pipelines other than RLlib's defaults
(custom connectors, e.g. frame stacking), observation spaces other than a Box or a flat Dict of
Boxes, action spaces other than a Box or Discrete, and ``episodes_to_numpy=False``. If an env step raises and
``restart_failed_sub_environments`` is on, the env is recreated and the fragment is sampled again
from a reset (the stock runner keeps the episodes that were done before the failure).

``GazePPOConfig`` uses this runner; back to the stock one with
``config.env_runners(env_runner_cls=SingleAgentEnvRunner)``.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.connectors.common.add_observations_from_episodes_to_batch import AddObservationsFromEpisodesToBatch
from ray.rllib.connectors.common.add_states_from_episodes_to_batch import AddStatesFromEpisodesToBatch
from ray.rllib.connectors.common.add_time_dim_to_batch_and_zero_pad import AddTimeDimToBatchAndZeroPad
from ray.rllib.connectors.common.batch_individual_items import BatchIndividualItems
from ray.rllib.connectors.common.numpy_to_tensor import NumpyToTensor
from ray.rllib.connectors.common.tensor_to_numpy import TensorToNumpy
from ray.rllib.connectors.module_to_env.get_actions import GetActions
from ray.rllib.connectors.module_to_env.listify_data_for_vector_env import ListifyDataForVectorEnv
from ray.rllib.connectors.module_to_env.normalize_and_clip_actions import NormalizeAndClipActions
from ray.rllib.connectors.module_to_env.remove_single_ts_time_rank_from_batch import RemoveSingleTsTimeRankFromBatch
from ray.rllib.connectors.module_to_env.unbatch_to_individual_items import UnBatchToIndividualItems
from ray.rllib.core.columns import Columns
from ray.rllib.env.env_errors import StepFailedRecreateEnvError
from ray.rllib.env.env_runner import ENV_STEP_FAILURE, NUM_ENV_STEP_FAILURES_LIFETIME
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from ray.rllib.env.utils.infinite_lookback_buffer import InfiniteLookbackBuffer
from ray.rllib.utils import force_list
from ray.rllib.utils.annotations import override
from ray.rllib.utils.framework import get_device
from ray.rllib.utils.metrics import ENV_RESET_TIMER, ENV_STEP_TIMER, RLMODULE_INFERENCE_TIMER, WEIGHTS_SEQ_NO
from ray.rllib.utils.numpy import convert_to_numpy
from ray.rllib.utils.spaces.space_utils import clip_action, unsquash_action
from ray.rllib.utils.torch_utils import convert_to_torch_tensor

from rllib_gaze.envs.bridge import to_numpy
from rllib_gaze.rollout import Rollout

logger = logging.getLogger("ray.rllib")

# RLlib's default connector pieces for a single-agent, stateless module: for these the batched loop
# computes exactly what the pipelines compute item by item.
_DEFAULT_ENV_TO_MODULE = (AddObservationsFromEpisodesToBatch, AddTimeDimToBatchAndZeroPad,
                          AddStatesFromEpisodesToBatch, BatchIndividualItems, NumpyToTensor)
_DEFAULT_MODULE_TO_ENV = (GetActions, TensorToNumpy, UnBatchToIndividualItems, RemoveSingleTsTimeRankFromBatch,
                          NormalizeAndClipActions, ListifyDataForVectorEnv)


def _overrides(callback: RLlibCallback, name: str) -> bool:
    return getattr(type(callback), name) is not getattr(RLlibCallback, name)


class _Carry:
    """What one fragment hands the next, per sub-env (``N`` sub-envs, lookback ``lb``).

    ``obs``, ``infos`` and ``other`` are the last rows of the previous fragment's buffers (``lb + 1``
    observation and info rows, the last of them the current observation, and ``lb`` rows of everything
    else); ``current`` is the current observation as the env gave it (numpy arrays or its torch
    tensors), which the next step's forward pass reads;
    ``t[i]`` is the env steps of sub-env ``i``'s ongoing episode so far (0: a new episode starts at
    the current observation), ``pending[i]`` that its episode ended at the last step (the next step
    is the reset step), ``ids[i]`` and ``custom_data[i]`` its ongoing episode's id and custom data.
    """

    def __init__(self, current: dict[str, Any], infos: dict, num_envs: int, lookback: int):
        self.current = current
        self.obs = {k: np.repeat(to_numpy(v)[None], lookback + 1, 0) for k, v in current.items()}   # (lb + 1, N, ...)
        self.infos = [infos] * (lookback + 1)
        self.other: dict[str, np.ndarray] = {}   # actions, rewards, extra outputs: (lb, N, ...)
        self.t = np.zeros(num_envs, np.int64)
        self.pending = np.zeros(num_envs, bool)
        self.ids: list[str | None] = [None] * num_envs
        self.custom_data: list[dict | None] = [None] * num_envs


class BatchedEnvRunner(SingleAgentEnvRunner):
    """A ``SingleAgentEnvRunner`` whose ``sample(num_timesteps=...)`` steps the vector env batch by
    batch and builds the episodes once per fragment from array slices (module docstring)."""

    @override(SingleAgentEnvRunner)
    def __init__(self, *, config, **kwargs):
        super().__init__(config=config, **kwargs)
        self._carry: _Carry | None = None
        self._episodes_rows = 64   # vector steps that sample(num_episodes=...) sizes its buffers for
        self._buffers: dict[str, list[np.ndarray]] = {}
        self._device_buffers: dict[str, torch.Tensor] = {}   # see _staging
        self._on_device = False   # whether the env gives torch observations (set at each reset)
        self._action_bounds: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}   # see _normalize_and_clip
        self._step_callbacks = [c for c in self._callbacks if _overrides(c, "on_episode_step")]
        self._step_functions = list(force_list(self.config.callbacks_on_episode_step))
        self._replay_steps = bool(self._step_callbacks or self._step_functions)
        self._keep_rollout = False   # see sample_rollout
        self._rollout: Rollout | None = None
        self._chunk_rows: list[tuple[int, int, int, bool]] = []

    # ---- which loop ---------------------------------------------------------------------------------------------

    def batched_loop_unsupported(self, random_actions: bool = False) -> str | None:
        """Why ``sample(num_timesteps=...)`` falls back to the stock loop with this config, or None."""
        if not self.config.episodes_to_numpy:
            return "episodes_to_numpy=False"
        if self.env is None or not isinstance(getattr(self.env, "env", None), gym.vector.VectorEnv):
            return "no vector env"
        obs_space = self.env.single_observation_space
        boxes = obs_space.spaces.values() if isinstance(obs_space, gym.spaces.Dict) else [obs_space]
        if not all(isinstance(s, gym.spaces.Box) for s in boxes):
            return f"observation space {obs_space} (a Box or a flat Dict of Boxes is supported)"
        if not isinstance(self.env.single_action_space, (gym.spaces.Box, gym.spaces.Discrete)):
            return f"action space {self.env.single_action_space}"
        if random_actions:
            return None
        if self.module is None:
            return "no module"
        if self.module.is_stateful():
            return "stateful module"
        if [type(c) for c in self._env_to_module.connectors] != list(_DEFAULT_ENV_TO_MODULE):
            return "custom env-to-module connectors"
        if [type(c) for c in self._module_to_env.connectors] != list(_DEFAULT_MODULE_TO_ENV):
            return "custom module-to-env connectors"
        return None

    @override(SingleAgentEnvRunner)
    def make_module(self):
        if getattr(self.config, "rollout", "episodes") == "device" and not self.worker_index \
                and not self.config.in_evaluation:
            # rollout="device": the local runner samples with its module on the learner's device, the env's
            # (as ppo_rgb, one device for all); RLlib puts a local runner's module on the CPU.
            self._device = get_device(self.config, self.config.num_gpus_per_learner)
        super().make_module()

    def sample_rollout(self, *, num_timesteps: int | None = None, explore: bool | None = None,
                       force_reset: bool = False) -> Rollout:
        """``sample(num_timesteps=...)``, the fragment returned as its buffers rather than episodes
        (``rllib_gaze.rollout``, ``.env_runners(rollout="device")``). The episodes are built all the
        same, for the episode callbacks and the episode metrics (``get_metrics``), and dropped."""
        reason = self.batched_loop_unsupported()
        if reason is not None:
            raise ValueError(f"rollout='device' needs BatchedEnvRunner's batched loop, which this config cannot use "
                             f"({reason}); use rollout='episodes'")
        self._keep_rollout = True
        try:
            self.sample(num_timesteps=num_timesteps, explore=explore, force_reset=force_reset)
        finally:
            self._keep_rollout = False
        rollout, self._rollout = self._rollout, None
        if rollout is None:
            raise RuntimeError("sample_rollout: the fragment sampled no step (num_timesteps=0?)")
        return rollout

    @override(SingleAgentEnvRunner)
    def _sample(self, *, num_timesteps: int | None = None, num_episodes: int | None = None, explore: bool,
                random_actions: bool = False, force_reset: bool = False) -> list[SingleAgentEpisode]:
        if (num_timesteps is None and num_episodes is None) or self.batched_loop_unsupported(random_actions):
            self._carry = None   # the stock loop steps the env: start the next batched fragment from a reset
            return super()._sample(num_timesteps=num_timesteps, num_episodes=num_episodes, explore=explore,
                                   random_actions=random_actions, force_reset=force_reset)
        if num_episodes is not None:
            return self._sample_episodes(num_episodes, explore, random_actions)
        return self._sample_batched(num_timesteps, explore, random_actions, force_reset)

    # ---- env access without DictInfoToList (it builds one info dict per sub-env per step) ------------------------

    def _vector_reset(self, seed: int | None) -> tuple[Any, dict]:
        env = self.env.env
        self._on_device = bool(getattr(env, "torch_observations", False))
        try:
            with self.metrics.log_time(ENV_RESET_TIMER):
                return (env.reset_on_device if self._on_device else env.reset)(seed=seed)
        except Exception:
            if not self.config.restart_failed_sub_environments:
                raise
            self.make_env()
            return self._vector_reset(seed)

    def _vector_step(self, actions: np.ndarray | torch.Tensor):
        # EnvRunner._try_env_step, on the vector env inside DictInfoToList.
        env = self.env.env
        try:
            with self.metrics.log_time(ENV_STEP_TIMER):
                return (env.step_on_device if self._on_device else env.step)(actions)
        except Exception as e:
            self.metrics.log_value(NUM_ENV_STEP_FAILURES_LIFETIME, 1, reduce="lifetime_sum")
            if self.config.restart_failed_sub_environments:
                if not isinstance(e, StepFailedRecreateEnvError):
                    logger.exception("%s: env step failed; recreating the env: %s", type(self).__name__, e)
                self.make_env()
                return ENV_STEP_FAILURE
            raise RuntimeError(f"{type(self).__name__}: environment step failed and "
                               "restart_failed_sub_environments is False") from e

    def _reset(self) -> None:
        obs, infos = self._vector_reset(self._seed if self._needs_initial_reset else None)
        self._needs_initial_reset = False
        self._shared_data = {}
        self._ongoing_episodes_for_metrics.clear()   # as the stock reset: those episodes never end
        lookback = self.config.episode_lookback_horizon
        self._carry = _Carry(self._flat(obs), infos, self.num_envs, lookback)

    def _flat(self, obs: Any) -> dict[str, np.ndarray | torch.Tensor]:
        """An observation's arrays by key (``""`` for a single one); torch tensors stay tensors."""
        items = obs.items() if isinstance(obs, dict) else [("", obs)]
        return {k: v if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in items}

    def _tree(self, flat: dict[str, Any]) -> Any:
        return flat[""] if "" in flat and len(flat) == 1 else flat

    # ---- actions for a batch ------------------------------------------------------------------------------------

    @torch.no_grad()
    def _act(self, obs: dict[str, np.ndarray | torch.Tensor], explore: bool, ts: int) -> tuple[Any, Any, dict]:
        """Actions (as stored in episodes), actions for the env and extra outputs, each ``(N, ...)``:
        the default connector pipelines' results, computed on the batch. Numpy arrays, or, where the
        env gives torch observations, torch tensors on the module's device (no TensorToNumpy)."""
        batch = {Columns.OBS: convert_to_torch_tensor(self._tree(obs), device=self._device)}
        runners = self.config.num_env_runners or 1
        with self.metrics.log_time(RLMODULE_INFERENCE_TIMER):
            if explore:
                # The stock runner's estimate of the global env steps (for exploration schedules).
                t = (self.num_env_steps_sampled_lifetime // runners + ts) * runners
                out = self.module.forward_exploration(batch, t=t)
            else:
                out = self.module.forward_inference(batch)
        # GetActions
        if Columns.ACTIONS not in out and Columns.ACTION_DIST_INPUTS in out:
            dist_cls = (self.module.get_exploration_action_dist_cls() if explore
                        else self.module.get_inference_action_dist_cls())
            dist = dist_cls.from_logits(out[Columns.ACTION_DIST_INPUTS])
            if not explore:
                dist = dist.to_deterministic()
            out[Columns.ACTIONS] = dist.sample()
            if Columns.ACTION_LOGP not in out:
                out[Columns.ACTION_LOGP] = dist.logp(out[Columns.ACTIONS])
        out = dict(out) if self._on_device else convert_to_numpy(dict(out))   # TensorToNumpy
        actions = out.pop(Columns.ACTIONS)
        for_env = out.pop(Columns.ACTIONS_FOR_ENV, None)
        if for_env is None:
            for_env = self._normalize_and_clip(actions)
        return actions, for_env, out

    def _normalize_and_clip(self, actions: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """NormalizeAndClipActions on the batch: RLlib's ``unsquash_action`` or ``clip_action`` on numpy
        actions; on tensors the same arithmetic in the same order (so the same float32 results), for the
        Box or Discrete action space the batched loop supports (neither changes a Discrete action)."""
        piece = self._module_to_env.connectors[_DEFAULT_MODULE_TO_ENV.index(NormalizeAndClipActions)]
        space = piece._action_space_struct
        if not (piece.normalize_actions or piece.clip_actions):
            return actions
        if not isinstance(actions, torch.Tensor):
            return (unsquash_action if piece.normalize_actions else clip_action)(actions.copy(), space)
        if not isinstance(space, gym.spaces.Box):
            return actions
        key = (id(space), actions.device)   # the bounds on the actions' device once, not a copy per step
        if key not in self._action_bounds:
            self._action_bounds[key] = tuple(torch.as_tensor(b, device=actions.device) for b in (space.low, space.high))
        low, high = self._action_bounds[key]
        if piece.normalize_actions:
            if not (np.all(space.bounded_below) and np.all(space.bounded_above)):
                return actions
            if np.issubdtype(space.dtype, np.integer):
                return low + actions
            if space.dtype not in (np.float32, np.float64):
                return actions
            actions = low + (actions + 1.0) * (high - low) / 2.0
        return torch.minimum(torch.maximum(actions, low), high)   # np.clip

    # ---- the loop -----------------------------------------------------------------------------------------------

    def _sample_batched(self, num_timesteps: int, explore: bool, random_actions: bool,
                        force_reset: bool) -> list[SingleAgentEpisode]:
        if force_reset or self._needs_initial_reset or self._carry is None:
            self._reset()
        while True:
            result = self._fragment(num_timesteps, explore, random_actions)
            if result is not None:
                return result
            self._reset()   # an env step failed and the env was recreated: sample the fragment anew

    def _sample_episodes(self, num_episodes: int, explore: bool, random_actions: bool) -> list[SingleAgentEpisode]:
        """The stock runner's ``sample(num_episodes=...)``: from a reset, seeded each time (the stock runner
        sets ``_needs_initial_reset`` again), until ``num_episodes`` episodes are done; the first of them in
        the order they finished (step, then sub-env), the still running ones dropped."""
        while True:
            self._reset()
            self._needs_initial_reset = True
            result = self._fragment(None, explore, random_actions, num_episodes)
            if result is not None:
                self._carry = None   # the next sample starts from a reset, as the stock runner's
                return result

    def _fragment(self, num_timesteps: int | None, explore: bool, random_actions: bool,
                  num_episodes: int | None = None) -> list[SingleAgentEpisode] | None:
        """``num_timesteps`` env steps (from the carry on), or, where ``num_episodes`` is given, steps until
        that many episodes are done (from a reset; the running ones are dropped)."""
        carry, n, lb = self._carry, self.num_envs, self.config.episode_lookback_horizon
        if num_episodes is None:
            steps_cap = max(1, math.ceil(num_timesteps / n))
        else:   # the rows the last call by episodes took; the buffers grow if needed
            steps_cap = self._episodes_rows
        cap = lb + 1 + steps_cap + steps_cap // 4 + 2     # rows; resets add steps, the buffers grow if needed
        obs = {k: self._buffer(f"obs/{k}", cap, v.shape[1:], v.dtype) for k, v in carry.obs.items()}
        for k, v in obs.items():
            v[: lb + 1] = carry.obs[k]
        infos = list(carry.infos)                            # one dict of (N,) arrays per row
        other: dict[str, np.ndarray] = {}                    # actions, rewards, extra outputs; row p = step into p
        staged: dict[str, torch.Tensor] = {}                 # rows of torch values, by buffer name (see write)
        flags = {name: np.zeros((cap, n), bool) for name in ("terminated", "truncated", "resetting")}
        times = np.zeros(cap)
        times[: lb + 1] = time.perf_counter()

        def buffers() -> dict[str, np.ndarray]:   # the host buffers by pool name
            return {**{f"obs/{k}": v for k, v in obs.items()}, **other}

        def write(name: str, buf: np.ndarray, p: int, value: np.ndarray | torch.Tensor) -> None:
            """Row ``p`` of host buffer ``buf``: numpy values go there at once, torch tensors into a buffer
            on their device (``_staging``) that is copied into ``buf`` at the end of the fragment."""
            if isinstance(value, torch.Tensor):
                stage = staged.get(name)
                if stage is None:
                    stage = staged[name] = self._staging(name, buf, value.device)
                stage[p] = value
            else:
                buf[p] = value

        def put(name: str, p: int, value: np.ndarray | torch.Tensor) -> None:
            buf = other.get(name)
            if buf is None:
                value = value if isinstance(value, torch.Tensor) else np.asarray(value)
                buf = other[name] = self._buffer(name, cap, tuple(value.shape), _numpy_dtype(value))
                tail = carry.other.get(name)
                if tail is not None and tail.shape[1:] == buf.shape[1:]:
                    buf[1: lb + 1] = tail
            write(name, buf, p, value)

        pending = carry.pending.copy()
        current = carry.current
        keep = self._keep_rollout and num_episodes is None   # sample_rollout: the buffers are the result
        if keep:
            for k, v in current.items():   # the first step's observation, where the rollout's rows are
                write(f"obs/{k}", obs[k], lb, v)
        p, ts, seq_no, finished = lb, 0, self._weights_seq_no, 0
        while ts < num_timesteps if num_episodes is None else finished < num_episodes:
            if random_actions:
                actions = for_env = self.env.action_space.sample()
                extra = {}
            else:
                actions, for_env, extra = self._act(current, explore, ts)
            result = self._vector_step(for_env)
            if result is ENV_STEP_FAILURE:
                return None
            new_obs, reward, terminated, truncated, info = result
            p += 1
            if p == cap:   # more reset steps than foreseen
                cap = 2 * cap
                obs = {k: self._grow(f"obs/{k}", v, cap) for k, v in obs.items()}
                other = {k: self._grow(k, v, cap) for k, v in other.items()}
                flags = {k: _grown(v, cap) for k, v in flags.items()}
                times = _grown(times, cap)
                hosts = buffers()
                staged.update({name: self._staging(name, hosts[name], v.device, v) for name, v in staged.items()})
            current = self._flat(new_obs)   # what the next forward pass reads: the env's own arrays or tensors
            for k, v in current.items():
                write(f"obs/{k}", obs[k], p, v)
            put(Columns.ACTIONS, p, actions)
            put(Columns.REWARDS, p, np.asarray(reward, np.float32))
            for k, v in extra.items():
                put(k, p, v)
            put(WEIGHTS_SEQ_NO, p, np.full(n, seq_no))
            flags["resetting"][p] = pending
            flags["terminated"][p] = np.asarray(terminated, bool) & ~pending
            flags["truncated"][p] = np.asarray(truncated, bool) & ~pending
            infos.append(info)
            times[p] = time.perf_counter()
            ts += n - int(pending.sum())
            pending = flags["terminated"][p] | flags["truncated"][p]
            finished += int(pending.sum())
        if p == lb:   # nothing sampled (num_timesteps=0): the carry stays as it is
            return []
        hosts = buffers()
        # A rollout's observations stay on their device; the episodes (for callbacks and metrics) then
        # get zero-stride placeholders in their place.
        on_device = {k for k in obs if keep and not _shares_host_memory(staged.get(f"obs/{k}", _HOST).device)}
        for name, stage in staged.items():   # the fragment's tensor rows to the host, one copy per buffer
            if not (name.startswith("obs/") and name[len("obs/"):] in on_device):
                _copy_to_host(hosts[name][lb + 1: p + 1], stage[lb + 1: p + 1])
        if num_episodes is not None:
            self._episodes_rows = max(self._episodes_rows, p - lb)
        self._log_env_steps(metric=self._metrics_num_try_env_step, num_steps=p - lb)
        episode_obs = {k: np.broadcast_to(np.zeros((), v.dtype), v.shape) if k in on_device else v
                       for k, v in obs.items()}
        done, ongoing = self._episodes(episode_obs, infos, other, flags, times, p, pending, num_episodes)
        for k in on_device:   # the next fragment's first rows, as the carry keeps them (a few rows per sub-env)
            self._carry.obs[k] = staged[f"obs/{k}"][p - lb: p + 1].cpu().numpy()
        if keep:
            def rows(name: str, host: np.ndarray) -> torch.Tensor | np.ndarray:
                stage = staged.get(name)
                return (stage if stage is not None else torch.from_numpy(host) if name.startswith("obs/")
                        else host)[: p + 1]

            chunks = np.array([c[:3] for c in self._chunk_rows], np.int64).reshape(-1, 3)
            self._rollout = Rollout(obs=self._tree({k: rows(f"obs/{k}", v) for k, v in obs.items()}),
                                    steps={name: rows(name, v) for name, v in other.items()}, chunks=chunks,
                                    terminated=np.array([c[3] for c in self._chunk_rows], bool))
        if num_episodes is None:
            self._carry.current = current
        # Summaries, not the chunks: those are views that would keep the fragment's buffers from reuse.
        self._done_episodes_for_metrics.extend(_ChunkSummary(e) for e in done)
        for episode in ongoing:
            self._ongoing_episodes_for_metrics[episode.id_].append(_ChunkSummary(episode))
        self._log_env_steps(metric=self._metrics_num_env_steps_sampled, num_steps=ts)
        self._increase_sampled_metrics(ts, len(done))
        return done + ongoing

    def _buffer(self, name: str, rows: int, shape: tuple, dtype) -> np.ndarray:
        """A ``(rows, *shape)`` buffer for this fragment (``shape[0]`` the sub-envs), laid out sub-env by
        sub-env in memory (``_env_major``), so that a sub-env's rows, an episode chunk's arrays, are one
        contiguous block: the object store then takes them out of band, without pickling their bytes.
        The episodes hold views of it, so a buffer is only reused once no view of it is alive any more
        (the learner has dropped the episodes): fresh arrays of these sizes come from mmap and fault in
        every page on first write, which costs more than the writes themselves. Two per name cover a
        caller that keeps the last fragment while sampling the next."""
        pool = self._buffers.setdefault(name, [])
        for base in pool:   # the (N, rows, ...) arrays that own the memory
            # References: the pool's list, `base` here and getrefcount's argument; any more are views.
            if (sys.getrefcount(base) == 3 and base.shape[1] >= rows and base.dtype == dtype
                    and (base.shape[0], *base.shape[2:]) == tuple(shape)):
                return base.swapaxes(0, 1)[:rows]
        buffer = _env_major(rows, shape, dtype)
        pool.insert(0, buffer.base)
        del pool[2:]   # a buffer dropped here lives on as long as its episodes
        return buffer

    def _staging(self, name: str, host: np.ndarray, device: torch.device, old: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """Where a fragment's rows of torch values on ``device`` wait for the end of the fragment, for host
        buffer ``host`` of pool ``name``: on the CPU the host buffer's own memory (nothing left to copy),
        elsewhere one buffer per name on that device, which every fragment reuses (the episodes hold the
        host copies), with ``old``'s rows in it when a fragment's buffers grow."""
        if _shares_host_memory(device):
            return torch.from_numpy(host)
        dtype = torch.from_numpy(host[:0]).dtype
        stage = self._device_buffers.get(name)
        if (stage is None or len(stage) < len(host) or stage.shape[1:] != host.shape[1:] or stage.dtype != dtype
                or stage.device != device):
            # the host buffer's layout (sub-env by sub-env), so each sub-env's rows copy in one block
            stage = self._device_buffers[name] = torch.empty(
                (host.shape[1], host.shape[0], *host.shape[2:]), dtype=dtype, device=device).transpose(0, 1)
        if old is not None:
            stage[: len(old)] = old
        return stage[: len(host)]

    def _grow(self, name: str, buffer: np.ndarray, rows: int) -> np.ndarray:
        grown = _env_major(rows, buffer.shape[1:], buffer.dtype)
        grown[: len(buffer)] = buffer
        self._buffers.setdefault(name, []).insert(0, grown.base)
        del self._buffers[name][2:]
        return grown

    # ---- episodes from the buffers ------------------------------------------------------------------------------

    def _episodes(self, obs, infos, other, flags, times, last: int, pending: np.ndarray, num_episodes: int | None):
        """Done and ongoing ``SingleAgentEpisode`` chunks of the fragment whose rows end at ``last``;
        updates the carry for the next fragment and replays the episode callbacks. With ``num_episodes``
        only the first that many done episodes, no ongoing ones, and no carry: the stock runner stops
        at the sub-env whose episode was the last one needed and drops every running episode (their
        callbacks are not replayed here)."""
        carry, n, lb = self._carry, self.num_envs, self.config.episode_lookback_horizon
        info_rows = _InfoRows(infos, last + 1, n)
        done_rows = flags["terminated"][: last + 1] | flags["truncated"][: last + 1]
        starts = flags["resetting"][: last + 1].copy()
        starts[lb] = ~carry.pending   # the current observation starts (or continues) a chunk
        done_chunks, ongoing_chunks = [], []
        new_t = np.zeros(n, np.int64)
        new_ids: list[str | None] = [None] * n
        new_custom: list[dict | None] = [None] * n
        for i in range(n):
            chunk_starts = np.flatnonzero(starts[:, i])
            chunk_ends = np.flatnonzero(done_rows[:, i])
            for j, s in enumerate(chunk_starts):
                e = int(chunk_ends[j]) if j < len(chunk_ends) else None
                continuing = j == 0 and s == lb and carry.t[i] > 0
                t_started = int(carry.t[i]) if continuing else 0
                if e is None and (s == last or num_episodes is not None):
                    # A reset obs at the very end: the episode starts next fragment. By episodes, the
                    # running ones are dropped: no chunk to build.
                    break
                episode = self._chunk(i, int(s), last if e is None else e, t_started,
                                      min(lb, t_started), obs, info_rows, other, flags, times,
                                      carry.ids[i] if continuing else None,
                                      carry.custom_data[i] if continuing else None)
                (done_chunks if e is not None else ongoing_chunks).append((e if e is not None else last, i, episode))
                if e is None:
                    new_t[i], new_ids[i], new_custom[i] = len(episode) + t_started, episode.id_, episode.custom_data
        done_chunks.sort(key=lambda c: (c[0], c[1]))
        ongoing_chunks.sort(key=lambda c: c[1])
        if num_episodes is not None:
            done_chunks = done_chunks[:num_episodes]
        for _, i, episode in done_chunks + ongoing_chunks:
            self._replay_callbacks(i, episode)
        if num_episodes is not None:
            return [c[2] for c in done_chunks], []
        # where each chunk lies in the buffers, in the episodes' order (sample_rollout)
        self._chunk_rows = [(i, e - len(episode), e, episode.is_terminated)
                            for e, i, episode in done_chunks + ongoing_chunks]
        # The carry for the next fragment.
        nxt = self._carry = copy.copy(carry)
        nxt.obs = {k: v[last - lb: last + 1].copy() for k, v in obs.items()}
        nxt.infos = infos[last - lb: last + 1]
        nxt.other = {k: v[last - lb + 1: last + 1].copy() for k, v in other.items()} if lb else {}
        nxt.t, nxt.pending, nxt.ids = new_t, pending.copy(), new_ids
        nxt.custom_data = [copy.deepcopy(c) if c else None for c in new_custom]
        return [c[2] for c in done_chunks], [c[2] for c in ongoing_chunks]

    def _chunk(self, i: int, s: int, e: int, t_started: int, k: int, obs, info_rows, other, flags, times,
               episode_id: str | None, custom_data: dict | None) -> SingleAgentEpisode:
        """Sub-env ``i``'s chunk with observation rows ``s..e`` and ``k`` steps of lookback before them."""
        # Views of the fragment's buffers: no copy (see _buffer for when a buffer is written again).
        observations = InfiniteLookbackBuffer(data=self._tree({key: v[s - k: e + 1, i] for key, v in obs.items()}))
        observations.lookback = k   # set after: for a dict, the constructor caps it by the number of keys
        episode = SingleAgentEpisode(
            id_=episode_id,
            observations=observations,
            observation_space=self.env.single_observation_space,
            infos=info_rows.rows(s - k, e + 1, i),
            actions=other[Columns.ACTIONS][s - k + 1: e + 1, i],
            action_space=self.env.single_action_space,
            rewards=other[Columns.REWARDS][s - k + 1: e + 1, i],
            terminated=bool(flags["terminated"][e, i]),
            truncated=bool(flags["truncated"][e, i]),
            extra_model_outputs={key: v[s - k + 1: e + 1, i] for key, v in other.items()
                                 if key not in (Columns.ACTIONS, Columns.REWARDS)},
            t_started=t_started,
            len_lookback_buffer=k,
        )
        if custom_data:
            episode._custom_data = copy.deepcopy(custom_data)   # as SingleAgentEpisode.cut
        # Durations as the stock runner measures them: a new episode from its reset, a continuing chunk
        # from its first step.
        episode._start_time = times[s] if t_started == 0 else times[min(s + 1, e)]
        episode._last_step_time = times[e] if e > s else None
        return episode

    # ---- callbacks ----------------------------------------------------------------------------------------------

    def _replay_callbacks(self, i: int, episode: SingleAgentEpisode) -> None:
        """The stock runner's episode callbacks for this chunk, in its order, each seeing the episode
        as it was at that point (its buffers cut to that step)."""
        length, chunk = len(episode), {i: episode}
        if episode.t_started == 0 or self._replay_steps:
            view = _StepView(episode)
            if episode.t_started == 0:
                view.show(-1)
                self._make_on_episode_callback("on_episode_created", i, chunk)
                view.show(0)
                self._make_on_episode_callback("on_episode_start", i, chunk)
            if self._replay_steps:
                kwargs = dict(episode=episode, env_runner=self, metrics_logger=self.metrics, env=self.env.unwrapped,
                              rl_module=self.module, env_index=i)
                calls = [c.on_episode_step for c in self._step_callbacks] + self._step_functions
                for step in range(1, length + 1):
                    view.show(step)
                    for call in calls:   # make_callback's loop, without its per-call list building
                        call(**kwargs)
            view.restore()
        if episode.is_done:
            self._make_on_episode_callback("on_episode_end", i, chunk)


class _ChunkSummary:
    """What RLlib's ``get_metrics`` reads of an episode chunk (length, return, duration) plus its
    rewards, infos and custom data, without its observations, actions and model outputs."""

    def __init__(self, episode: SingleAgentEpisode):
        self.id_, self.t_started, self.t = episode.id_, episode.t_started, episode.t
        self.is_terminated, self.is_truncated = episode.is_terminated, episode.is_truncated
        self.rewards = np.array(episode.get_rewards())
        self.infos = episode.get_infos()
        self.custom_data = episode.custom_data
        self.duration_s = episode.get_duration_s()

    @property
    def is_done(self) -> bool:
        return self.is_terminated or self.is_truncated

    def __len__(self) -> int:
        return self.t - self.t_started

    def get_return(self) -> float:
        return sum(self.rewards)   # as SingleAgentEpisode.get_return: the same float32 rounding

    def get_rewards(self) -> np.ndarray:
        return self.rewards

    def get_infos(self) -> list[dict]:
        return self.infos

    def get_duration_s(self) -> float:
        return self.duration_s


class _StepView:
    """Shows an episode chunk as it was ``step`` steps into it (-1: before its reset), in place, by
    pointing its buffers at prefixes of their data; ``restore()`` puts the full data back."""

    def __init__(self, episode: SingleAgentEpisode):
        self.episode = episode
        self.lookback = episode.observations.lookback
        self.length = len(episode)
        # (buffer, full data, whether a dict, rows it has beyond the actions: observations and infos one more)
        self.slots = [(b, b.data, isinstance(b.data, dict), extra) for b, extra in
                      [(episode.observations, 1), (episode.infos, 1), (episode.actions, 0), (episode.rewards, 0)]
                      + [(b, 0) for b in episode.extra_model_outputs.values()]]
        self.state = (episode.t, episode.is_terminated, episode.is_truncated)

    def show(self, step: int) -> None:
        n = max(step, 0)
        for buffer, data, is_dict, extra in self.slots:
            rows = self.lookback + n + (extra if step >= 0 else 0)
            buffer.data = {key: v[:rows] for key, v in data.items()} if is_dict else data[:rows]
        e = self.episode
        e.t = e.t_started + n
        e.is_terminated, e.is_truncated = (self.state[1], self.state[2]) if step == self.length else (False, False)

    def restore(self) -> None:
        for buffer, data, _, _ in self.slots:
            buffer.data = data
        self.episode.t, self.episode.is_terminated, self.episode.is_truncated = self.state


class _InfoRows:
    """Per-row, per-sub-env info dicts (what gymnasium's ``DictInfoToList`` hands the stock runner) from
    the vector env's info dicts of ``(N,)`` arrays, built only for the rows an episode needs."""

    def __init__(self, infos: list[dict], rows: int, n: int):
        self.infos, self.n = infos[:rows], n
        keys = set(infos[0]) if infos else set()
        simple = all(set(d) == keys and all(isinstance(v, np.ndarray) and v.shape == (n,) for v in d.values())
                     for d in self.infos) and not any(k.startswith("_") for k in keys)
        # Common case (the bridge: {"success": (N,) bool}): one (rows, N) array per key.
        self.columns = {k: np.stack([d[k] for d in self.infos]) for k in sorted(keys)} if simple else None

    def rows(self, start: int, stop: int, i: int) -> list[dict]:
        if self.columns is not None:
            if not self.columns:
                return [{} for _ in range(start, stop)]
            if len(self.columns) == 1:
                (key, column), = self.columns.items()
                return [{key: v} for v in column[start:stop, i]]
            keys = list(self.columns)
            return [dict(zip(keys, values)) for values in zip(*(c[start:stop, i] for c in self.columns.values()))]
        return [_info_of(self.infos[p], i) for p in range(start, stop)]


def _info_of(info: dict, i: int) -> dict:
    """Sub-env ``i``'s info dict, as ``DictInfoToList`` makes it (``_key`` masks say which keys it has)."""
    out = {}
    for key, value in info.items():
        if key.startswith("_"):
            continue
        mask = info.get(f"_{key}")
        if mask is not None and not mask[i]:
            continue
        out[key] = _info_of(value, i) if isinstance(value, dict) else value[i]
    return out


def _numpy_dtype(value: np.ndarray | torch.Tensor) -> np.dtype:
    if isinstance(value, torch.Tensor):
        return torch.empty(0, dtype=value.dtype).numpy().dtype
    return value.dtype


_HOST = torch.empty(0)   # a tensor on the host, for "where is it" defaults
# A sub-env's rows of a column at least this large are copied from the device one sub-env at a time.
_PER_ENV_COPY_BYTES = 1 << 16


def _shares_host_memory(device: torch.device) -> bool:
    """Whether tensor rows on ``device`` are written straight into the host buffers (``_staging``)."""
    return device.type == "cpu"


def _copy_to_host(host: np.ndarray, stage: torch.Tensor) -> None:
    """Rows ``stage (rows, N, ...)`` into ``host``, both laid out sub-env by sub-env. Where a sub-env's
    rows are large (observations), one contiguous copy per sub-env, straight into the host buffer (a copy
    of the strided whole goes through a contiguous temporary on each side); small columns in one copy."""
    if _shares_host_memory(stage.device):
        return
    target = torch.from_numpy(host)
    if stage[:, 0].numel() * stage.element_size() < _PER_ENV_COPY_BYTES:
        target.copy_(stage)
        return
    for i in range(stage.shape[1]):
        target[:, i].copy_(stage[:, i])


def _env_major(rows: int, shape: tuple, dtype) -> np.ndarray:
    """An uninitialised ``(rows, *shape)`` array whose memory is ``(shape[0], rows, *shape[1:])``: row ``p``
    of sub-env ``i`` is ``a[p, i]`` as in a plain array, and ``a[s:e, i]`` is contiguous. ``a.base``
    owns the memory."""
    return np.empty((shape[0], rows, *shape[1:]), dtype).swapaxes(0, 1)


def _grown(buffer: np.ndarray, rows: int) -> np.ndarray:
    out = np.zeros((rows, *buffer.shape[1:]), buffer.dtype)
    out[: len(buffer)] = buffer
    return out
