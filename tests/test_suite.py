"""The suite's presets, Tune grid and flags (no training here; tests/test_suite_job.py runs it)."""

from __future__ import annotations

import dataclasses

import pytest
from ray.tune.search.variant_generator import generate_variants

import rllib_gaze.cli as suite_cli
from rllib_gaze import ARMS, GazePPOConfig
from rllib_gaze.suite import DIAGNOSTIC, FOVEA, PRESETS, TASKS, param_space, pick_preset, planned_steps

suite_script = suite_cli


def _trials(preset) -> list[GazePPOConfig]:
    configs = []
    for _, spec in generate_variants(param_space(preset)):
        config = GazePPOConfig().update_from_dict(spec)
        config.validate()
        configs.append(config)
    return configs


def _differing_keys(a: GazePPOConfig, b: GazePPOConfig) -> set[str]:
    da, db = a.to_dict(), b.to_dict()
    return {k for k in da.keys() | db.keys() if k != "arm" and da.get(k) != db.get(k)}


def test_smoke_grid_is_tasks_x_arms_x_seeds_and_arms_differ_only_in_gaze_settings():
    preset = PRESETS["smoke"]
    trials = _trials(preset)
    assert len(trials) == len(preset.tasks) * len(preset.arms) * len(preset.seeds)
    arm_keys = {key for settings in ARMS.values() for key in settings}
    for task in preset.tasks:
        on_task = {c["arm"]: c for c in trials if c["task"] == task.name}
        assert set(on_task) == set(preset.arms) == {"ppo", "gaze", "gaze-rl", "patch"}
        for arm, config in on_task.items():
            assert all(getattr(config, key) == value for key, value in ARMS[arm].items()), arm
            assert config.env == task.env and config.env_config == task.env_config | (
                {"sim_backend": "physx_cpu"} if task.env == "maniskill" else {})
            assert config.train_batch_size_per_learner == task.num_envs * task.rollout_length
            assert config.evaluation_interval == task.eval_interval
            assert config.evaluation_config["explore"] is False
            assert config.evaluation_config["env_config"]["ignore_terminations"] is True
            assert _differing_keys(config, on_task["ppo"]) <= arm_keys
            assert config.gaze_image_interval == 0  # smoke: no TensorBoard drawings


def test_paper_preset_covers_the_seven_tasks_and_their_cluttered_variants_on_gpu_resources():
    preset = PRESETS["paper"]
    names = {t.name for t in preset.tasks}
    for env_id in ("PushCube-v1", "PickCube-v1", "PokeCube-v1", "PullCube-v1", "LiftPegUpright-v1", "PushT-v1",
                   "StackCube-v1"):
        assert {env_id, env_id + "-Clutter"} <= names
    assert len(preset.seeds) >= 3 and preset.num_gpus_per_env_runner > 0 and preset.num_gpus_per_learner > 0
    push = next(c for c in _trials(preset) if c["task"] == "PushCube-v1" and c["arm"] == "gaze")
    assert push.num_gpus_per_env_runner == preset.num_gpus_per_env_runner and push.evaluation_num_env_runners == 1
    assert push["suite_iterations"] * push.train_batch_size_per_learner >= TASKS["PushCube-v1"].budget == 1_000_000


def test_budget_rounds_up_to_whole_evaluation_intervals():
    iterations = DIAGNOSTIC.iterations(0)
    assert iterations % DIAGNOSTIC.eval_interval == 0
    assert (iterations - DIAGNOSTIC.eval_interval) * DIAGNOSTIC.batch_size(0) < DIAGNOSTIC.budget <= iterations * 1024
    assert planned_steps(PRESETS["smoke"].__class__("", (DIAGNOSTIC,))) == iterations * 1024 * 4 * 3


def test_local_and_evidence_presets_run_the_fovea_diagnostic_with_the_oracle():
    for name, seeds in (("local", 3), ("evidence", 5)):
        preset = PRESETS[name]
        assert [t.name for t in preset.tasks] == ["fovea"] and len(preset.seeds) == seeds
        assert {"ppo", "gaze", "oracle"} <= set(preset.arms)
        for config in _trials(preset):
            assert config.env_config["image_size"] == 96 and config.env_config["reward"] == "closeness"


def test_ablation_arms_each_undo_one_change_of_the_full_method():
    from rllib_gaze.arms import ABLATIONS

    preset = PRESETS["ablation"]
    trials = {c["arm"]: c for c in _trials(preset)}
    assert set(ABLATIONS) <= set(trials) and {"gaze", "gaze-rl", "oracle", "ppo"} <= set(trials)
    for name, change in ABLATIONS.items():
        differs = _differing_keys(trials[name], trials["gaze"])
        assert differs == {k for k, v in change.items() if getattr(trials["gaze"], k) != v}, name


def test_preset_is_paper_with_gpus_and_local_without_and_says_why():
    assert pick_preset(4)[0] == "paper" and "4 GPU" in pick_preset(4)[1]
    name, why = pick_preset(0)
    assert name == "local" and "no GPU" in why


def test_flags_override_the_preset():
    args = suite_script.parse_args(["--preset", "smoke", "--tasks", "clutter", "--arms", "ppo", "gaze", "--seeds", "3",
                                    "--budget", "512", "--gpus-per-learner", "0.5", "--gaze", "contrastive_coeff=10",
                                    "label_rule=relative"])
    name, presets = suite_script.chosen_preset(args, cluster_gpus=0)
    assert list(presets) == ["ppo"]  # --arms of one algorithm: one experiment
    preset = presets["ppo"]
    smoke_clutter = PRESETS["smoke"].tasks[0]
    assert name == "smoke" and preset.tasks == (dataclasses.replace(
        smoke_clutter, budget=512, gaze={**smoke_clutter.gaze, "contrastive_coeff": 10, "label_rule": "relative"}),)
    assert preset.arms == ("ppo", "gaze") and preset.seeds == (3,) and preset.tasks[0].budget == 512
    assert preset.num_gpus_per_learner == 0.5
    _, presets = suite_script.chosen_preset(suite_script.parse_args(["--preset", "local", "--tasks", "PushCube-v1"]), 0)
    local = presets["ppo"]
    assert local.tasks == (TASKS["PushCube-v1"],)  # not in the preset: the full task
    assert "oracle" in PRESETS["local"].arms and "oracle" not in local.arms  # PushCube has no exposed target


@pytest.mark.parametrize("text, value", [("True", True), ("true", True), ("False", False), ("None", None),
                                         ("null", None)])
def test_gaze_flag_reads_booleans_and_none_as_python_and_json_write_them(text, value):
    # gaze_rl_gradient's default is None, so its type cannot tell how to read the text: "True" was
    # passed on as the string 'True' and refused as not "True, False or None".
    args = suite_script.parse_args(["--preset", "smoke", "--tasks", "clutter", "--arms", "gaze",
                                    "--gaze", f"gaze_rl_gradient={text}"])
    _, presets = suite_script.chosen_preset(args, cluster_gpus=0)
    assert presets["ppo"].tasks[0].gaze["gaze_rl_gradient"] is value


def test_algo_sac_runs_the_sac_arms_as_gaze_sac_trials_that_differ_only_in_gaze_settings():
    from rllib_gaze import GazeSACConfig
    from rllib_gaze.arms import SAC_ARMS
    from rllib_gaze.suite import TRAINABLES, experiment_algorithm

    args = suite_script.parse_args(["--preset", "smoke", "--algo", "sac", "--tasks", "clutter"])
    _, presets = suite_script.chosen_preset(args, cluster_gpus=0)
    assert list(presets) == ["sac"]
    preset = presets["sac"]
    assert preset.arms == ("sac", "gaze-sac") and TRAINABLES[experiment_algorithm(preset.arms)] == "GazeSAC"
    trials = {}
    for _, spec in generate_variants(param_space(preset)):
        config = GazeSACConfig().update_from_dict(spec)
        config.validate()
        trials[spec["arm"]] = config
    task = preset.tasks[0]
    plain, full = trials["sac"], trials["gaze-sac"]
    assert (plain.attention, plain.contrastive) == ("none", False) and (full.attention, full.contrastive) == (
        "foveal", True)
    assert _differing_keys(full, plain) <= {key for settings in SAC_ARMS.values() for key in settings}
    # sac_rgbd's sampling shape, the task's SAC sizes; the task's env, gamma, evaluation and budget
    assert (plain.num_envs_per_env_runner, plain.rollout_fragment_length) == (16, 4)
    assert {key: getattr(plain, key) for key in task.sac} == task.sac == {
        "num_steps_sampled_before_learning_starts": 256, "train_batch_size_per_learner": 64, "training_intensity": 8}
    assert plain.env_config == task.env_config and plain.gamma == task.gamma
    assert plain.evaluation_interval == task.eval_interval and plain.evaluation_config["explore"] is False
    assert plain.min_sample_timesteps_per_iteration == task.batch_size(0) and plain.min_time_s_per_iteration == 0
    assert plain["suite_iterations"] == task.iterations(0)


def test_presets_with_sac_tasks_run_the_sac_arms_as_a_second_experiment():
    smoke = suite_script.experiments(suite_script.parse_args(["--preset", "smoke"]), "smoke")
    assert list(smoke) == ["ppo", "sac"]
    assert smoke["ppo"].arms == PRESETS["smoke"].arms and [t.name for t in smoke["ppo"].tasks] == [
        "clutter", "PushCube-v1"]
    assert smoke["sac"].arms == ("sac", "gaze-sac") and smoke["sac"].tasks == PRESETS["smoke"].sac_tasks
    assert planned_steps(smoke["sac"]) == 2 * 768
    paper = suite_script.experiments(suite_script.parse_args(["--preset", "paper"]), "paper")
    assert [t.name for t in paper["sac"].tasks] == ["PushCube-v1", "PushCube-v1-Clutter", "PickCube-v1",
                                                   "PickCube-v1-Clutter"]
    local = suite_script.experiments(suite_script.parse_args(["--preset", "local"]), "local")
    assert list(local) == ["ppo"]  # SAC on the diagnostic is a command of its own (docs/results.md)
    both = suite_script.experiments(suite_script.parse_args(["--preset", "smoke", "--arms", "gaze-sac", "ppo"]),
                                    "smoke")
    assert {algo: p.arms for algo, p in both.items()} == {"ppo": ("ppo",), "sac": ("gaze-sac",)}
    only_ppo = suite_script.experiments(suite_script.parse_args(["--preset", "smoke", "--algo", "ppo"]), "smoke")
    assert list(only_ppo) == ["ppo"]


def test_one_experiment_runs_the_arms_of_one_algorithm():
    with pytest.raises(ValueError, match="mix algorithms"):
        param_space(dataclasses.replace(PRESETS["smoke"], arms=("ppo", "sac")))
    assert suite_script.preset_with_flags(suite_script.parse_args(["--preset", "smoke"]), "smoke").arms == (
        PRESETS["smoke"].arms)  # --algo ppo, the default: the presets unchanged


def test_resume_takes_the_algorithm_of_the_experiments_trials(tmp_path):
    trial = tmp_path / "exp" / "clutter_gaze-sac_seed0_00001"
    trial.mkdir(parents=True)
    (tmp_path / "exp" / suite_script.EXPERIMENT_STATE).write_text("")
    (trial / "params.json").write_text('{"arm": "gaze-sac"}')
    args = suite_script.parse_args(["--resume", "exp", "--storage-path", str(tmp_path)])
    assert args.algo == "sac"  # GazeSAC restores it, without --algo


def test_paper_gives_the_policy_image_and_state_and_no_state_gives_the_image_alone():
    from rllib_gaze.envs import make_env

    with_state = suite_script.experiments(suite_script.parse_args(["--preset", "paper"]), "paper")
    pixels = suite_script.experiments(suite_script.parse_args(["--preset", "paper", "--no-state"]), "paper")
    for algo in ("ppo", "sac"):
        assert all(t.env_config["include_state"] is True for t in with_state[algo].tasks)   # ppo_rgb's default
        assert all(t.env_config["include_state"] is False for t in pixels[algo].tasks)
        task = pixels[algo].tasks[0]
        config = suite_script.trial_config(task, pixels[algo].arms[0], 0, pixels[algo])
        assert config.env_config["include_state"] is False
        assert config.evaluation_config["env_config"]["include_state"] is False
    # on the fovea diagnostic the switch leaves the policy an image and no state vector
    (fovea,) = suite_script.experiments(suite_script.parse_args(["--preset", "local", "--no-state"]), "local")[
        "ppo"].tasks
    env = make_env(fovea.env, {key: value for key, value in fovea.env_config.items() if key != "expose_target"}, 2)
    assert env.single_observation_space.shape == (96, 96, 3)
    default = make_env(FOVEA.env, {**FOVEA.env_config, "expose_target": False}, 2)
    assert set(default.single_observation_space.spaces) == {"rgb", "state"}


def test_paper_evaluates_by_maniskills_protocol():
    preset = PRESETS["paper"]
    config = next(c for c in _trials(preset) if c["task"] == "PickCube-v1-Clutter" and c["arm"] == "gaze")
    task = TASKS["PickCube-v1-Clutter"]
    # training: partial resets, the scene kept between episodes (ppo_rgb's reconfiguration_freq=None)
    assert not config.env_config.get("ignore_terminations") and config.env_config.get("reconfiguration_freq") is None
    # evaluation: a fixed number of envs, one episode each run to the time limit (no partial resets),
    # every scene rebuilt at its reset, the deterministic policy
    evaluation = config.evaluation_config
    assert evaluation["env_config"]["ignore_terminations"] is True and evaluation["env_config"][
        "reconfiguration_freq"] == 1
    assert evaluation["num_envs_per_env_runner"] == config.evaluation_duration == task.eval_episodes == 16
    assert config.evaluation_duration_unit == "episodes" and evaluation["explore"] is False
    assert config.evaluation_num_env_runners == 1
