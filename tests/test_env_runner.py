"""BatchedEnvRunner against RLlib's stock SingleAgentEnvRunner on the same config and seed."""

import numpy as np
import pytest
import torch
from helpers import running
from ray.rllib.core import COMPONENT_ENV_TO_MODULE_CONNECTOR, COMPONENT_MODULE_TO_ENV_CONNECTOR, COMPONENT_RL_MODULE
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.utils.test_utils import check_train_results_new_api_stack

from rllib_gaze import GazePPOConfig
from rllib_gaze import env_runner as env_runner_module
from rllib_gaze.env_runner import BatchedEnvRunner

# Steps of 0.5 reach a target within a few steps of a 6-step episode: some episodes succeed (and, with
# terminate_on_success, end early), so success metrics, terminations and truncations all occur.
ENV = {"image_size": 32, "num_distractors": 1, "max_episode_steps": 6, "step_size": 0.5, "success_radius": 0.3,
       "terminate_on_success": True, "seed": 0}
METRICS = ("episode_return_mean", "episode_len_mean", "episode_len_min", "episode_len_max", "num_episodes",
           "num_env_steps_sampled", "num_env_steps_sampled_lifetime", "success_once", "success_at_end")


def config(runner_cls=BatchedEnvRunner, explore=True, **env):
    return (GazePPOConfig()
            .environment("clutter", env_config={**ENV, **env})
            .env_runners(num_env_runners=0, num_envs_per_env_runner=4, rollout_fragment_length=8,
                         gym_env_vectorize_mode="vector_entry_point", explore=explore, env_runner_cls=runner_cls)
            .training(train_batch_size_per_learner=32, minibatch_size=16, num_epochs=1)
            .rl_module(model_config={"conv_filters": ((8, 4, 2), (8, 3, 2)), "head_hidden": 32,
                                     "image_feature_dim": 32})
            .gaze(contrastive_num_anchors=8, contrastive_memory_capacity=64, contrastive_k=4)
            .debugging(seed=3))


def chunk(e):
    """Everything an episode chunk carries, except its (random) id."""
    return (e.t_started, len(e), e.is_terminated, e.is_truncated, e.observations.lookback,
            np.asarray(e.observations.data).tobytes(), np.asarray(e.get_actions()).tobytes(),
            np.asarray(e.get_rewards()).tobytes(), [bool(i["success"]) for i in e.infos.data],
            sorted(e.extra_model_outputs),
            {k: np.round(np.asarray(v.data, np.float64), 5).tobytes() for k, v in e.extra_model_outputs.items()})


def exact(e):
    """``chunk`` with the extra model outputs' exact bytes and the arrays' types: for runs that must agree
    to the bit."""
    return (chunk(e), {k: np.asarray(v.data).tobytes() for k, v in e.extra_model_outputs.items()},
            e.is_numpy, type(e.observations.data), type(e.actions.data), type(e.rewards.data),
            sorted({type(v.data).__name__ for v in e.extra_model_outputs.values()}))


def id_pattern(fragments):
    """Which chunks belong to the same episode, as first-seen indices (ids differ between runners)."""
    first = {}
    return [first.setdefault(e.id_, len(first)) for f in fragments for e in f]


def metrics(runner):
    out = runner.get_metrics()
    return {k: (None if out.get(k) is None else float(out[k].peek())) for k in METRICS}


@pytest.mark.parametrize("explore", [False, True])
@pytest.mark.parametrize("bootstrap_at_done", [True, False])
def test_same_episodes_and_metrics_as_the_stock_runner(explore, bootstrap_at_done):
    # Fragments of uneven sizes cut episodes anywhere, including right at a done and at a reset step.
    sizes = (8, 5, 8, 4, 9, 13)   # 4 sub-envs: vector steps 2, 2, 2 (the 6-step episodes end here), ...
    results = []
    for cls in (SingleAgentEnvRunner, BatchedEnvRunner):
        runner = cls(config=config(cls, explore, bootstrap_at_done=bootstrap_at_done))
        fragments = [runner.sample(num_timesteps=n) for n in sizes]
        results.append(([[chunk(e) for e in f] for f in fragments], id_pattern(fragments), metrics(runner)))
        runner.stop()
    (stock_chunks, stock_ids, stock_metrics), (chunks, ids, batched_metrics) = results
    assert chunks == stock_chunks
    assert ids == stock_ids
    assert batched_metrics == stock_metrics
    assert stock_metrics["num_episodes"] >= 4
    flags = {(c[2], c[3]) for f in chunks for c in f}
    assert (False, True) in flags
    if explore:   # the untrained policy's mean action rarely reaches a target; its samples do
        assert ((True, False) in flags) == (not bootstrap_at_done)
        assert 0 < stock_metrics["success_once"] and stock_metrics["success_at_end"] <= stock_metrics["success_once"]


def recorded(monkeypatch, obj, name: str, log: list, what=lambda *args, result: result):
    """Patch ``obj.name`` to append ``what(*args, result=...)`` of every call to ``log``."""
    original = getattr(obj, name)

    def call(*args, **kwargs):
        result = original(*args, **kwargs)
        log.append(what(*args, result=result))
        return result

    monkeypatch.setattr(obj, name, call)


def test_the_forward_pass_reads_the_envs_own_tensors(monkeypatch):
    # Issue 22: with the env's torch observations (the bridge's default) each step's forward pass gets the
    # tensors the env returned, not a numpy round trip of them, and no observation goes through numpy
    # while a fragment is sampled (the episodes' host copy is written through torch, on the CPU in place).
    runner = BatchedEnvRunner(config=config(max_episode_steps=3, terminate_on_success=False))
    env = runner.env.unwrapped.env   # the ClutterEnv behind the bridge
    returned, seen, to_numpy = [], [], []
    for name in ("step", "reset"):
        recorded(monkeypatch, env, name, returned, lambda *_, result: result[0])
    recorded(monkeypatch, runner.module, "forward_exploration", seen, lambda batch, result: batch[Columns.OBS])
    runner.sample(num_timesteps=8)
    recorded(monkeypatch, torch.Tensor, "numpy", to_numpy, lambda tensor, result: tuple(tensor.shape))
    episodes = runner.sample(num_timesteps=24)   # continues the first fragment: 6 vector steps, resets among them
    monkeypatch.undo()
    assert len(seen) == 10   # 2 vector steps, then 6 and 2 reset steps (the 3-step episodes end at steps 3 and 7)
    assert len(returned) == 1 + 10 + 2   # the first reset, the steps, the partial resets in the reset steps
    assert all(any(obs is r for r in returned) for obs in seen)   # the env's own tensors, every step
    assert seen[2] is returned[2]             # the second fragment starts from the first one's last observation
    assert not [shape for shape in to_numpy if shape[-3:] == (32, 32, 3)]
    assert all(isinstance(e.get_observations(), np.ndarray) and e.is_numpy for e in episodes)
    runner.stop()


@pytest.mark.parametrize("explore, staging, env", [
    (True, "host", {}),            # CPU: the tensor rows written into the numpy buffers' own memory
    (False, "host", {}),
    (True, "device", {}),          # as on a GPU: separate tensor buffers, copied to the host per fragment
    # A reset every other step: 40 env steps take 19 vector steps, past the 10 + 2 + 2 rows foreseen.
    (True, "device", {"max_episode_steps": 1, "terminate_on_success": False}),
])
def test_torch_observations_give_the_same_episodes_as_numpy_ones(monkeypatch, explore, staging, env):
    # The same seeds with the bridge's numpy observations (the runner as before issue 22) and its torch
    # ones: bit-identical chunks, episode ids alike, same metrics, over uneven fragments (episodes cut at
    # a done and at a reset step), evaluation by episodes and a forced reset in between.
    if staging == "device":
        monkeypatch.setattr(env_runner_module, "_shares_host_memory", lambda device: False)
    results = []
    for torch_observations in (False, True):
        runner = BatchedEnvRunner(config=config(explore=explore, torch_observations=torch_observations, **env))
        assert runner.batched_loop_unsupported() is None
        assert runner.env.unwrapped.torch_observations is torch_observations
        grown = []
        recorded(monkeypatch, runner, "_grow", grown, lambda name, *_, result: name)
        torch.manual_seed(0)
        fragments = [runner.sample(num_timesteps=n) for n in (8, 5, 8, 4)]
        fragments.append(runner.sample(num_episodes=5, explore=explore))
        fragments += [runner.sample(num_timesteps=n, force_reset=reset) for n, reset in ((9, False), (40, True))]
        results.append(([[exact(e) for e in f] for f in fragments], id_pattern(fragments), metrics(runner),
                        grown, set(runner._device_buffers)))
        runner.stop()
    (numpy_chunks, numpy_ids, numpy_metrics, numpy_grown, _), (chunks, ids, torch_metrics, grown, device) = results
    assert chunks == numpy_chunks
    assert ids == numpy_ids
    assert torch_metrics == numpy_metrics
    assert grown == numpy_grown and bool(grown) == bool(env)
    assert (False, True) in {(c[0][2], c[0][3]) for f in chunks for c in f}
    assert device == (set() if staging == "host"
                      else {"obs/", "actions", "action_logp", "action_dist_inputs", "vf_preds"})


def test_continuing_chunks_keep_their_episode_for_gae():
    runner = BatchedEnvRunner(config=config(max_episode_steps=50, terminate_on_success=False))
    first, second = runner.sample(num_timesteps=8), runner.sample(num_timesteps=8)
    assert [e.id_ for e in first] == [e.id_ for e in second]           # 4 sub-envs, one 50-step episode each
    for a, b in zip(first, second):
        assert b.t_started == a.t == 2 and len(b) == 2 and b.observations.lookback == 1
        assert np.array_equal(b.get_observations(0), a.get_observations(-1))
        assert np.array_equal(b.get_observations(-1, neg_index_as_lookback=True), a.get_observations(-2))
        assert np.array_equal(b.get_actions(-1, neg_index_as_lookback=True), a.get_actions(-1))
        assert not a.is_done and not b.is_done and a.is_numpy
    runner.stop()


def test_buffers_are_reused_only_once_their_episodes_are_gone():
    # Episodes are views of the fragment's buffers: kept ones must not change when later fragments
    # are sampled, and dropped ones let the runner write the same memory again.
    runner = BatchedEnvRunner(config=config())
    kept = runner.sample(num_timesteps=16)
    before = [chunk(e) for e in kept]
    for _ in range(3):
        runner.sample(num_timesteps=16)
    assert [chunk(e) for e in kept] == before
    assert all(len(pool) <= 2 for pool in runner._buffers.values())
    rgb = id(runner._buffers["obs/"][0])
    del kept
    runner.sample(num_timesteps=16)
    runner.sample(num_timesteps=16)
    assert rgb in [id(b) for b in runner._buffers["obs/"]]   # written again, not a fresh allocation
    runner.stop()


@pytest.mark.parametrize("explore", [False, True])
def test_sampling_by_episodes_gives_the_stock_runners_episodes(explore):
    # By episodes (evaluation): from a seeded reset every call, the first n episodes in the order they
    # finished (4 sub-envs, episodes of 1-6 steps: several finish in the same step, so n cuts a step's
    # finished episodes), the running ones dropped; env steps counted alike. Exploring, the policy's
    # samples come from torch's global generator: seeded alike before each runner.
    results = []
    for cls in (SingleAgentEnvRunner, BatchedEnvRunner):
        runner = cls(config=config(cls, explore))
        assert cls is SingleAgentEnvRunner or runner.batched_loop_unsupported() is None
        torch.manual_seed(0)
        calls = [runner.sample(num_episodes=n, explore=explore) for n in (5, 3, 9, 2)]
        results.append(([[chunk(e) for e in f] for f in calls], metrics(runner)))
        runner.stop()
    (stock_chunks, stock_metrics), (chunks, batched_metrics) = results
    assert chunks == stock_chunks
    assert batched_metrics == stock_metrics
    assert [len(f) for f in chunks] == [5, 3, 9, 2]
    assert all(c[0] == 0 and (c[2] or c[3]) for f in chunks for c in f)   # whole episodes, all done
    if not explore:
        assert chunks[0][:3] == chunks[1]                                  # each call from the same seeded reset


def test_timesteps_after_episodes_start_from_a_reset_and_random_actions():
    runner = BatchedEnvRunner(config=config(explore=False))
    runner.sample(num_episodes=5)
    after = runner.sample(num_timesteps=8)
    assert all(e.t_started == 0 for e in after) and 8 <= sum(len(e) for e in after) < 12
    episodes = runner.sample(num_timesteps=20, random_actions=True)
    assert 20 <= sum(len(e) for e in episodes) < 24    # whole vector steps, as the stock runner
    assert all(set(e.extra_model_outputs) >= {"weights_seq_no"} for e in episodes)
    runner.stop()


def test_checkpoint_state_round_trip():
    runner = BatchedEnvRunner(config=config())
    runner.sample(num_timesteps=16)
    state = runner.get_state()
    assert {COMPONENT_RL_MODULE, COMPONENT_ENV_TO_MODULE_CONNECTOR, COMPONENT_MODULE_TO_ENV_CONNECTOR} <= set(state)
    restored = BatchedEnvRunner(config=config().debugging(seed=4))
    restored.set_state(state)
    assert restored.num_env_steps_sampled_lifetime == runner.num_env_steps_sampled_lifetime
    for key, value in runner.module.get_state().items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored.module.get_state()[key])), key
    # Same weights, deterministic actions: both runners act alike from a fresh reset of the same env seed.
    a = BatchedEnvRunner(config=config(explore=False))
    a.set_state(state)
    b = BatchedEnvRunner(config=config(explore=False))
    b.set_state(runner.get_state())
    assert [chunk(e) for e in a.sample(num_timesteps=12)] == [chunk(e) for e in b.sample(num_timesteps=12)]
    for r in (runner, restored, a, b):
        r.stop()


def test_gazeppo_trains_and_evaluates_with_the_batched_runner(ray_session):
    assert GazePPOConfig().env_runner_cls is BatchedEnvRunner
    cfg = (config()
           .env_runners(num_env_runners=1)
           .evaluation(evaluation_interval=1, evaluation_num_env_runners=0, evaluation_duration=4,
                       evaluation_duration_unit="episodes", evaluation_config={"explore": False}))
    with running(cfg) as algo:
        for _ in range(2):
            results = algo.train()
        check_train_results_new_api_stack(results)
        assert results["env_runners"]["num_env_steps_sampled_lifetime"] >= 64
        assert 0.0 <= results["env_runners"]["success_once"] <= 1.0
        assert results["evaluation"]["env_runners"]["num_episodes"] >= 4
        assert algo.env_runner_group.foreach_env_runner(lambda r: type(r).__name__, local_env_runner=False) == \
            ["BatchedEnvRunner"]


def test_a_failed_env_step_recreates_the_env_and_samples_the_fragment_anew(tmp_path):
    cfg = config(fail_at_step=3, fail_once_file=str(tmp_path / "failed")).fault_tolerance(
        restart_failed_sub_environments=True)
    runner = BatchedEnvRunner(config=cfg)
    episodes = runner.sample(num_timesteps=16)
    assert (tmp_path / "failed").exists()
    assert all(e.t_started == 0 for e in episodes) and 16 <= sum(len(e) for e in episodes) < 20
    assert runner.get_metrics()["num_env_step_failures"].peek() == 1
    runner.stop()
    with pytest.raises(RuntimeError, match="restart_failed_sub_environments is False"):
        BatchedEnvRunner(config=config(fail_at_step=3)).sample(num_timesteps=16)
