"""GazePPO inside a real local Ray: every arm trains, DDP with two learners, checkpoints, Tune."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import running, tiny_config
from ray import tune
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.core.columns import Columns
from ray.rllib.utils.test_utils import check, check_train_results_new_api_stack

from rllib_gaze import ARMS
from rllib_gaze.results import (
    CONTRASTIVE_LOSS_KEY,
    CONTRASTIVE_MEMORY_FILL_KEY,
    CONTRASTIVE_VALID_ANCHOR_FRAC_KEY,
    DRAC_VALUE_LOSS_KEY,
    GAZE_TARGET_DISTANCE_KEY,
    GAZE_WEIGHT_MEAN_KEY,
)

MID = "default_policy"


def finite(value) -> bool:
    return bool(np.isfinite(float(value)))


@pytest.mark.parametrize("arm", ["ppo", "gaze", "gaze-rl", "patch", "oracle", "gaze-soft-argmax", "gaze-first",
                                 "gaze-predict", "gaze-drac"])
def test_each_arm_trains_with_a_remote_env_runner(ray_session, arm):
    attention, contrastive = ARMS[arm]["attention"], ARMS[arm]["contrastive"]
    config = (tiny_config().gaze(**ARMS[arm]).env_runners(num_env_runners=1)
              .environment("clutter", env_config={"image_size": 48, "num_distractors": 3, "seed": 0,
                                                  "expose_target": True}))
    with running(config) as algo:
        for _ in range(2):
            results = algo.train()
            check_train_results_new_api_stack(results)
        learner = results["learners"][MID]
        assert finite(learner["total_loss"])
        assert ("gaze_mu_x_mean" in learner) == (attention in ("foveal", "oracle"))
        assert (GAZE_TARGET_DISTANCE_KEY in learner) == (attention in ("foveal", "oracle"))
        assert (GAZE_WEIGHT_MEAN_KEY in learner) == (attention == "patch")
        assert (CONTRASTIVE_LOSS_KEY in learner) == contrastive
        assert (DRAC_VALUE_LOSS_KEY in learner) == (ARMS[arm].get("augmentation", "none") != "none")
        if contrastive:  # the second iteration mines against the first one's memory
            assert learner[CONTRASTIVE_MEMORY_FILL_KEY] > 0
            assert finite(learner[CONTRASTIVE_LOSS_KEY])


@pytest.mark.parametrize("num_learners", [1, 2], ids=["one_remote_learner", "two_learners_ddp"])
def test_remote_learners_train_the_full_method(ray_session, num_learners):
    config = tiny_config().learners(num_learners=num_learners, num_cpus_per_learner=0.5)
    with running(config) as algo:
        for _ in range(3):
            results = algo.train()
        check_train_results_new_api_stack(results)
        learner = results["learners"][MID]
        assert learner[CONTRASTIVE_MEMORY_FILL_KEY] > 0
        assert learner[CONTRASTIVE_VALID_ANCHOR_FRAC_KEY] > 0
        assert finite(learner[CONTRASTIVE_LOSS_KEY]) and finite(learner["total_loss"])
        weights = [r.get() for r in algo.learner_group.foreach_learner(
            lambda lrn: [p.detach().cpu().numpy() for p in lrn.module[MID].unwrapped().gaze_parameters()])]
        assert len(weights) == num_learners
        if num_learners == 2:  # DDP kept both replicas identical
            for first, second in zip(*weights, strict=True):
                np.testing.assert_allclose(first, second, rtol=0, atol=1e-6)


def test_checkpoint_round_trip_reproduces_actions(ray_session, tmp_path):
    with running(tiny_config()) as algo:
        algo.train()
        path = algo.save_to_path(str(tmp_path / "ckpt"))
        obs = np.stack([algo.env_runner.env.unwrapped.single_observation_space.sample() for _ in range(6)])
        batch = {Columns.OBS: torch.as_tensor(obs)}
        before = algo.get_module().forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
        learner_before = [p.clone() for p in algo.learner_group._learner.module[MID].gaze_parameters()]
    restored = Algorithm.from_checkpoint(path)
    try:
        assert type(restored.config).__name__ == "GazePPOConfig" and restored.config.attention == "foveal"
        after = restored.get_module().forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
        torch.testing.assert_close(after, before)
        torch.testing.assert_close(restored.learner_group._learner.module[MID].gaze_parameters(), learner_before)
        check_train_results_new_api_stack(restored.train())  # and it keeps training
    finally:
        restored.stop()


def _learner_state(algo):
    learner = algo.learner_group._learner
    return learner.contrastive_memory(MID), learner.get_state()["optimizer"]


@pytest.mark.parametrize("limit_mb, kept", [(64.0, True), (0.0, False)])
def test_checkpoint_carries_the_contrastive_memory_and_the_gaze_optimiser(ray_session, tmp_path, limit_mb, kept):
    with running(tiny_config(contrastive_memory_checkpoint_mb=limit_mb)) as algo:
        algo.train()
        algo.train()
        path = algo.save_to_path(str(tmp_path / "ckpt"))
        memory, optimizer = _learner_state(algo)
        rows = memory.state_dict()
    restored = Algorithm.from_checkpoint(path)
    try:
        restored_memory, restored_optimizer = _learner_state(restored)
        # Adam's moments of every parameter, the gaze's included, come back in any case
        check(restored_optimizer, optimizer)
        if kept:
            check(restored_memory.state_dict(), rows)  # the same rows, in the same age order
            fill = restored.train()["learners"][MID][CONTRASTIVE_MEMORY_FILL_KEY]
            assert fill > 0  # the first update after the restore already mines against the memory
        else:  # too big for the limit: left out, refills from the next iteration on
            assert restored_memory is None
            assert restored.train()["learners"][MID][CONTRASTIVE_MEMORY_FILL_KEY] == 0
            assert restored.train()["learners"][MID][CONTRASTIVE_MEMORY_FILL_KEY] > 0
    finally:
        restored.stop()


def test_tune_runs_gazeppo_by_name(ray_session, tmp_path):
    config = tiny_config().gaze(attention=tune.grid_search(["foveal", "none"]),
                                contrastive=tune.grid_search([False]), gaze_image_interval=1)
    results = tune.Tuner(
        "GazePPO",
        param_space=config,
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="by_name", stop={"training_iteration": 1},
                                  verbose=0),
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
    ).fit()
    assert not results.errors
    attentions = sorted(r.config["attention"] for r in results)
    assert attentions == ["foveal", "none"]
    for r in results:
        assert ("gaze_mu_x_mean" in r.metrics["learners"][MID]) == (r.config["attention"] == "foveal")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for r in results:
        (events,) = list(Path(r.path).glob("events.out.tfevents.*"))
        tags = EventAccumulator(str(events)).Reload().Tags()
        assert "ray/tune/learners/default_policy/policy_loss" in tags["scalars"]
        # the gaze drawing (rllib_gaze.callbacks.GazeImages) only where there is a gaze
        assert ("ray/tune/gaze_images" in tags["images"]) == (r.config["attention"] == "foveal")
