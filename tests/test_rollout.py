"""How a rollout's observations travel to the update (issue 29, item 3): the host copies they take on
the way, counted (``rllib_gaze.profiling.HostCopies``), and the object store's out-of-band transfer of
the episodes a remote env runner sends; no Ray needed."""

import copy
import pickle
import re

import numpy as np
import pytest
import torch
from helpers import running, tiny_sac_config
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, LEARNER_RESULTS

from rllib_gaze import GazePPOConfig
from rllib_gaze import env_runner as env_runner_module
from rllib_gaze import learner as learner_module
from rllib_gaze.env_runner import BatchedEnvRunner
from rllib_gaze.profiling import HostCopies
from rllib_gaze.rollout import pin_learner_batches, rollout_batch

MID = "default_policy"
ENV = {"image_size": 64, "num_distractors": 1, "max_episode_steps": 6, "step_size": 0.5, "success_radius": 0.3,
       "terminate_on_success": True, "bootstrap_at_done": False, "seed": 0}
ROW_BYTES = 64 * 64 * 3   # one uint8 observation


def config(values_from_sampling=True, **training):
    return (GazePPOConfig()
            .environment("clutter", env_config=ENV)
            .env_runners(num_env_runners=0, num_envs_per_env_runner=4, rollout_fragment_length=8,
                         gym_env_vectorize_mode="vector_entry_point")
            .training(**{"train_batch_size_per_learner": 32, "minibatch_size": 16, "num_epochs": 2, "gamma": 0.9,
                         "lambda_": 0.8, "values_from_sampling": values_from_sampling, **training})
            .rl_module(model_config={"conv_filters": ((8, 4, 2), (8, 3, 2)), "head_hidden": 32,
                                     "image_feature_dim": 32})
            .gaze(attention="foveal", contrastive=False)
            .debugging(seed=3))


def through_object_store(value):
    """``value`` as a remote caller gets it: pickled with protocol 5, its out-of-band buffers handed over
    as memory (the object store's shared memory), not as pickled bytes; and the in-band bytes."""
    buffers = []
    data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    return pickle.loads(data, buffers=[b.raw() for b in buffers]), len(data), sum(b.raw().nbytes for b in buffers)


def test_episode_arrays_are_contiguous_views_that_travel_out_of_band():
    runner = BatchedEnvRunner(config=config())
    runner.sample(num_timesteps=32)
    episodes = runner.sample(num_timesteps=32)   # chunks with lookback rows from the fragment before
    obs_bytes = sum(np.asarray(e.observations.data).nbytes for e in episodes)
    assert all(e.observations.data.flags.c_contiguous for e in episodes)
    # views of the runner's buffers: no copy on its side
    assert all(any(np.shares_memory(e.observations.data, b) for b in runner._buffers["obs/"]) for e in episodes)
    _, in_band, out_of_band = through_object_store(episodes)
    assert out_of_band >= obs_bytes
    assert in_band < obs_bytes / 10, (in_band, obs_bytes)   # ids, infos, spaces: no observation bytes


@pytest.mark.parametrize("values_from_sampling", [True, False])
def test_the_remote_path_copies_observations_at_most_once_each_way(values_from_sampling):
    """The runner's side: its rows go into the episodes as views (on the CPU the env's tensors are
    written into the host buffers themselves); the learner's: one concatenation into the train batch,
    which ``NumpyToTensor`` takes as it is. RLlib's GAE pair (values_from_sampling=False) appends a row
    to each chunk first and runs the critic over the whole batch: more copies, which the count sees."""
    c = config(values_from_sampling)
    runner = BatchedEnvRunner(config=c)
    learner = c.build_learner(env=runner.env.unwrapped)
    runner.sample(num_timesteps=32)   # the buffers exist; the next fragment reuses them
    nbytes = 32 * ROW_BYTES           # at least a fragment's observations
    with HostCopies(nbytes) as sampling:
        episodes = runner.sample(num_timesteps=32)
    assert (sampling.numpy, sampling.torch) == (0, 0)
    received, _, _ = through_object_store(episodes)
    with HostCopies(nbytes) as building:
        batch = learner._learner_connector(rl_module=learner.module, batch={}, episodes=received, shared_data={},
                                           metrics=learner.metrics)
    copies = building.numpy + building.torch
    assert copies == 1 if values_from_sampling else copies >= 2, (building.numpy, building.torch)
    assert batch[MID][Columns.OBS].dtype.itemsize == 1   # uint8 until the encoder


def numpy(x):
    return {k: numpy(v) for k, v in x.items()} if isinstance(x, dict) else torch.as_tensor(x).cpu().numpy()


@pytest.mark.parametrize("staging", ["host", "device"])
def test_a_device_rollout_gives_the_episode_paths_train_batch_row_for_row(staging, monkeypatch):
    """Two runners of one config and seed, one sampling episodes, the other rollouts, over uneven fragments
    with terminations, truncations and a forced reset: the rollout's train batch is the learner connector's,
    column by column (GAE included), in the same row order, and its observations are the buffers'. With
    ``staging="device"`` the runners stage the env's tensors apart from the host buffers as on a GPU: the
    rollout's observations are then those staging buffers, never copied to the host, and the episodes
    (metrics, callbacks) get placeholders."""
    if staging == "device":
        monkeypatch.setattr(env_runner_module, "_shares_host_memory", lambda device: False)
    c = config()
    episodes_runner, rollout_runner = BatchedEnvRunner(config=c), BatchedEnvRunner(config=c)
    rollout_runner.module.set_state(episodes_runner.module.get_state())
    learner = c.build_learner(env=episodes_runner.env.unwrapped)
    for seed, (num_timesteps, force_reset) in enumerate(((8, False), (5, False), (9, True), (13, False))):
        torch.manual_seed(seed)   # the same actions drawn
        episodes = episodes_runner.sample(num_timesteps=num_timesteps, force_reset=force_reset)
        torch.manual_seed(seed)
        rollout = rollout_runner.sample_rollout(num_timesteps=num_timesteps, force_reset=force_reset)
        expected = numpy(dict(learner._learner_connector(rl_module=learner.module, batch={}, episodes=episodes,
                                                         shared_data={}, metrics=learner.metrics)[MID]))
        columns, (rows, env) = rollout_batch(rollout, learner.module[MID], c.gamma, c.lambda_, learner._device)
        got = numpy(columns) | {Columns.OBS: rollout.obs[rows, env].numpy()}
        assert sorted(got) == sorted(expected)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
        assert len(rollout) == len(expected[Columns.REWARDS]) >= num_timesteps
        # the runner's own buffer, not a copy
        buffers = ([rollout_runner._device_buffers["obs/"].numpy()] if staging == "device"
                   else rollout_runner._buffers["obs/"])
        assert any(np.shares_memory(rollout.obs.numpy(), b) for b in buffers)
    assert metrics(rollout_runner) == metrics(episodes_runner)


def metrics(runner) -> dict:
    out = runner.get_metrics()
    return {k: out[k] for k in ("episode_return_mean", "episode_len_mean", "num_episodes", "num_env_steps_sampled",
                                "success_once", "success_at_end") if k in out}


def trained(c: GazePPOConfig, iterations: int, monkeypatch) -> tuple[dict, list[dict], int]:
    """The learner module's weights, each iteration's results and the number of rollouts the learner
    got after training ``c``."""
    rollouts = []
    original = learner_module.rollout_batch
    monkeypatch.setattr(learner_module, "rollout_batch", lambda *a, **k: rollouts.append(1) or original(*a, **k))
    with running(c) as algo:
        results = [algo.train() for _ in range(iterations)]
        return algo.learner_group._learner.module[MID].state_dict(), results, len(rollouts)


@pytest.mark.parametrize("contrastive", [False, True])
def test_a_seeded_run_on_a_device_rollout_trains_exactly_as_on_episodes(contrastive, monkeypatch, ray_session):
    """GazePPO, the same seed and config but ``rollout``: the same weights after three iterations (the same
    train batches, minibatches and permutation draws), and the same episode and learner metrics."""
    c = config().gaze(contrastive=contrastive, contrastive_num_anchors=8, contrastive_memory_capacity=64,
                      contrastive_k=4)
    episodes_weights, episodes_results, no_rollouts = trained(copy.deepcopy(c), 3, monkeypatch)
    device_weights, device_results, rollouts = trained(copy.deepcopy(c).env_runners(rollout="device"), 3, monkeypatch)
    assert (no_rollouts, rollouts) == (0, 3)
    for name, value in episodes_weights.items():
        torch.testing.assert_close(device_weights[name], value, rtol=0, atol=0, msg=name)
    for ours, theirs in zip(device_results, episodes_results):
        runners, learners = ours[ENV_RUNNER_RESULTS], theirs[ENV_RUNNER_RESULTS]
        for key in ("episode_return_mean", "episode_len_mean", "num_episodes", "num_env_steps_sampled",
                    "num_env_steps_sampled_lifetime", "success_once", "success_at_end"):
            assert runners.get(key) == learners.get(key), key
        assert learner_numbers(ours) == learner_numbers(theirs)


def learner_numbers(result: dict) -> dict:
    """The module's learner metrics that are numbers (not throughputs: those are timings)."""
    return {k: float(v) for k, v in result[LEARNER_RESULTS][MID].items()
            if isinstance(v, (int, float, np.number)) and "throughput" not in k}


@pytest.mark.parametrize("rollout", ["device", "episodes"])
def test_the_device_path_makes_no_host_copy_of_the_observations(rollout):
    """From sampling to the end of the update (two epochs of minibatches): no copy of the fragment's
    observations on the device path (a minibatch's gather is a minibatch, not the fragment). On the episode
    path the count sees the learner connector's concatenation (numpy) and RLlib's minibatch iterator
    permuting the whole batch at the end of each epoch (torch; on a GPU those are device copies)."""
    c = config().env_runners(rollout=rollout)
    runner = BatchedEnvRunner(config=c)
    learner = c.build_learner(env=runner.env.unwrapped)
    kwargs = dict(timesteps={"num_env_steps_sampled_lifetime": 32}, num_epochs=2, minibatch_size=16,
                  shuffle_batch_per_epoch=True)
    for _ in range(2):   # the second time, the runner's buffers and the learner's state exist
        with HostCopies(32 * ROW_BYTES) as copies:
            if rollout == "device":
                learner.update(batch=runner.sample_rollout(num_timesteps=32), **kwargs)
            else:
                learner.update(episodes=runner.sample(num_timesteps=32), **kwargs)
    assert (copies.numpy, copies.torch) == ((0, 0) if rollout == "device" else (1, kwargs["num_epochs"]))


@pytest.mark.parametrize("setting, message", [
    (lambda c: c.env_runners(num_env_runners=1), "needs num_env_runners=0"),
    (lambda c: c.learners(num_learners=1), "needs num_learners=0"),
    (lambda c: c.training(values_from_sampling=False), "needs .training(values_from_sampling=True)"),
    (lambda c: c.env_runners(env_runner_cls=SingleAgentEnvRunner), "needs env_runner_cls=BatchedEnvRunner"),
    (lambda c: c.training(train_batch_size_per_learner=64), "must be >= train_batch_size_per_learner=64"),
    (lambda c: c.learners(learner_connector=lambda *a: []), "custom learner connector pieces"),
    (lambda c: c.env_runners(rollout="gpu"), "rollout='gpu' is not allowed"),
    (lambda c: c.env_runners(batch_mode="complete_episodes"), "needs batch_mode='truncate_episodes'"),
])
def test_the_device_rollout_is_refused_where_it_cannot_hold(setting, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        setting(config().env_runners(rollout="device")).validate()


def test_sac_refuses_the_device_rollout():
    with pytest.raises(ValueError, match=re.escape("rollout='device' is not allowed with this algorithm")):
        tiny_sac_config().env_runners(rollout="device").validate()


def test_pinned_batching_gives_rllibs_batch_in_one_copy():
    """The learner connector with ``PinnedBatchIndividualItems`` (a GPU learner's; pinned only where CUDA
    is): the same train batch as RLlib's piece, the observations copied once, into a torch tensor."""
    c = config()
    runner = BatchedEnvRunner(config=c)
    learner = c.build_learner(env=runner.env.unwrapped)
    episodes = runner.sample(num_timesteps=32)
    expected = learner._learner_connector(rl_module=learner.module, batch={}, episodes=copy.deepcopy(episodes),
                                          shared_data={}, metrics=learner.metrics)[MID]
    assert pin_learner_batches(learner._learner_connector)
    assert "PinnedBatchIndividualItems" in [type(p).__name__ for p in learner._learner_connector.connectors]
    received, _, _ = through_object_store(episodes)
    with HostCopies(32 * ROW_BYTES) as copies:
        got = learner._learner_connector(rl_module=learner.module, batch={}, episodes=received, shared_data={},
                                         metrics=learner.metrics)[MID]
    assert copies.numpy + copies.torch == 1, (copies.numpy, copies.torch)
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(numpy(got[name]), numpy(expected[name]), err_msg=name)


def cuda_config(rollout: str) -> GazePPOConfig:
    """``config()`` with the env and the local learner on the GPU."""
    return (config().environment(env_config={**ENV, "device": "cuda"}).learners(num_gpus_per_learner=1)
            .env_runners(rollout=rollout))


@pytest.mark.gpu
def test_on_a_gpu_the_rollout_stays_there_and_gives_the_episode_paths_batch(ray_session):
    """The env and the learner on the GPU: the runner samples with its module there, the rollout's
    observations are the GPU buffers (uint8), nothing of them comes to the host from sampling to the end
    of an update, and the train batch is the episode path's (values to float tolerance: the critic's
    passes run on the GPU)."""
    device_runner = BatchedEnvRunner(config=cuda_config("device"))
    episodes_runner = BatchedEnvRunner(config=cuda_config("episodes"))
    assert next(device_runner.module.parameters()).device.type == "cuda"
    device_runner.module.set_state(episodes_runner.module.get_state())
    learner = cuda_config("device").build_learner(env=device_runner.env.unwrapped)
    assert learner._device.type == "cuda"
    torch.manual_seed(0)
    rollout = device_runner.sample_rollout(num_timesteps=32)
    torch.manual_seed(0)
    episodes = episodes_runner.sample(num_timesteps=32)
    assert rollout.obs.device.type == "cuda" and rollout.obs.dtype == torch.uint8
    expected = numpy(dict(learner._learner_connector(rl_module=learner.module, batch={}, episodes=episodes,
                                                     shared_data={}, metrics=learner.metrics)[MID]))
    columns, (rows, env) = rollout_batch(rollout, learner.module[MID], 0.9, 0.8, learner._device)
    got = numpy(columns) | {Columns.OBS: rollout.obs[rows, env].cpu().numpy()}
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5, err_msg=name)
    with HostCopies(32 * ROW_BYTES) as copies:
        learner.update(batch=device_runner.sample_rollout(num_timesteps=32), num_epochs=2, minibatch_size=16,
                       timesteps={"num_env_steps_sampled_lifetime": 64}, shuffle_batch_per_epoch=True)
    assert (copies.numpy, copies.torch) == (0, 0)


@pytest.mark.gpu
def test_on_a_gpu_learner_the_episodes_are_batched_in_pinned_memory(ray_session, monkeypatch):
    c = cuda_config("episodes").environment(env_config=ENV)   # the env on the CPU, as a remote runner's host copy
    runner = BatchedEnvRunner(config=c)
    learner = c.build_learner(env=runner.env.unwrapped)
    assert "PinnedBatchIndividualItems" in [type(p).__name__ for p in learner._learner_connector.connectors]
    pinned = []
    original = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: (
        self.dtype == torch.uint8 and pinned.append(self.is_pinned())) or original(self, *a, **k))
    batch = learner._learner_connector(rl_module=learner.module, batch={}, episodes=runner.sample(num_timesteps=32),
                                       shared_data={}, metrics=learner.metrics)[MID]
    monkeypatch.undo()
    assert batch[Columns.OBS].device.type == "cuda" and batch[Columns.OBS].dtype == torch.uint8
    assert pinned and all(pinned)   # the observations went to the GPU from pinned memory
