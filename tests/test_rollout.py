"""How a rollout's observations travel to the update (issue 29, item 3): the host copies they take on
the way, counted (``rllib_gaze.profiling.HostCopies``), and the object store's out-of-band transfer of
the episodes a remote env runner sends; no Ray needed."""

import pickle

import numpy as np
import pytest
from ray.rllib.core.columns import Columns

from rllib_gaze import GazePPOConfig
from rllib_gaze.env_runner import BatchedEnvRunner
from rllib_gaze.profiling import HostCopies

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
