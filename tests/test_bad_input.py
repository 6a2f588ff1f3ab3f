"""One table of bad inputs, one per user-facing entry point: each is refused before any work
starts, with a message naming the bad value and what is allowed."""

from __future__ import annotations

import gymnasium as gym
import pytest

import rllib_gaze.cli as suite_cli
from rllib_gaze import ARMS, GazePPOConfig, GazeSACConfig
from rllib_gaze.arms import SAC_ARMS
from rllib_gaze.envs import make_clutter, make_maniskill_env
from rllib_gaze.report import main as report_main
from rllib_gaze.visualize import main as visualize_main

suite = suite_cli


def _a_file(tmp):
    (tmp / "a-file").write_text("")
    return tmp / "a-file"


def _config(**gaze):
    GazePPOConfig().environment("clutter").gaze(**gaze).validate()


def _state_only_config(arm):
    """A config of ``arm`` on an env whose observations are a state vector, no image."""
    (GazeSACConfig() if arm in SAC_ARMS else GazePPOConfig()).environment(
        "clutter", observation_space=gym.spaces.Box(0.0, 1.0, (4,)), action_space=gym.spaces.Box(-1.0, 1.0, (2,))
    ).gaze(**ARMS[arm]).validate()


BAD_INPUTS = [
    # (entry point, call, texts the message must contain)
    ("config", lambda tmp: _config(attention="spotlight"),
     ["attention='spotlight'", "'foveal', 'patch', 'oracle', 'centre', 'none'"]),
    ("config", lambda tmp: _config(attention="none", contrastive=True), ["contrastive=True", "attention='foveal'"]),
    ("config", lambda tmp: _config(contrastive_margin=-1.0), ["contrastive_margin=-1.0", ">= 0"]),
    ("config", lambda tmp: _config(mining_neighbours="per_epoch"),
     ["mining_neighbours='per_epoch'", "('per_minibatch', 'per_update')"]),
    ("config", lambda tmp: _config(contrastive_similarity="dot"), ["contrastive_similarity='dot'", "'glimpse'"]),
    ("suite", lambda tmp: suite.main(["--preset", "smoke", "--arms", "ppo", "oracle"]),
     ["arm 'oracle'", "'PushCube-v1'", "expose_target"]),
    ("env_config", lambda tmp: make_clutter({"num_envs": 2, "reward": "sparse"}), ["reward='sparse'", "'closeness'"]),
    ("config", lambda tmp: _config(return_quantile=1.0), ["return_quantile=1.0", "(0, 1)"]),
    ("config", lambda tmp: _config(augmentation="flip"), ["augmentation='flip'", "'none', 'shift'"]),
    ("config", lambda tmp: _config(augmentation="shift", aug_coef=-0.1), ["aug_coef=-0.1", ">= 0"]),
    ("config", lambda tmp: _state_only_config("drac"), ["augmentation='shift'", "hold none", "camera images"]),
    ("config", lambda tmp: _state_only_config("gaze-drq-sac"), ["augmentation='shift'", "hold none"]),
    ("suite", lambda tmp: suite.main(["--arms", "drac", "--gaze", "augmentation=crop"]),
     ["'augmentation=crop'", "aug_coef"]),
    ("suite", lambda tmp: suite.main(["--arms", "drac", "--gaze", "aug_coef=-1"]), ["'drac'", "aug_coef=-1", ">= 0"]),
    ("config", lambda tmp: _config(gaze_image_count=0), ["gaze_image_count=0", "[1, 16]"]),
    ("config", lambda tmp: _config(contrastive_memory_checkpoint_mb=-1), ["contrastive_memory_checkpoint_mb=-1"]),
    ("env_config", lambda tmp: make_clutter({"num_envs": 2, "imagesize": 64}), ["'imagesize'", "image_size"]),
    ("env_config", lambda tmp: make_clutter({"num_envs": 2, "image_size": 8}), ["image_size=8", ">= 16"]),
    ("env_config", lambda tmp: make_clutter({"image_size": 64}), ["vector_entry_point"]),
    ("env_config", lambda tmp: make_maniskill_env({"num_envs": 1, "env_id": "PushCub-v1"}),
     ["'PushCub-v1'", "PushCube-v1"]),
    ("env_config", lambda tmp: make_maniskill_env({"num_envs": 1, "sim_backend": "gpu"}),
     ["sim_backend='gpu'", "physx_cuda", "physx_cpu"]),
    ("suite", lambda tmp: suite.main(["--preset", "huge", "--storage-path", str(tmp)]),
     ["'huge'", "smoke", "local", "paper"]),
    ("suite", lambda tmp: suite.main(["--tasks", "PushCube", "--storage-path", str(tmp)]),
     ["'PushCube'", "PushCube-v1"]),
    ("suite", lambda tmp: suite.main(["--arms", "ppo", "attention"]), ["'attention'", "gaze-rl", "patch"]),
    ("suite", lambda tmp: suite.main(["--algo", "dqn"]), ["--algo", "'dqn'", "['ppo', 'sac']"]),
    ("suite", lambda tmp: suite.main(["--algo", "sac", "--arms", "sac", "gaze"]), ["--arms", "'gaze'", "'gaze-sac'"]),
    ("suite", lambda tmp: suite.main(["--budget", "0"]), ["--budget=0", ">= 1"]),
    ("suite", lambda tmp: suite.main(["--num-env-runners", "-1"]), ["--num-env-runners=-1", ">= 0"]),
    ("suite", lambda tmp: suite.main(["--gpus-per-learner", "-0.5"]), ["--gpus-per-learner=-0.5", ">= 0"]),
    ("suite", lambda tmp: suite.main(["--seeds", "1", "1"]), ["--seeds", "each one once"]),
    ("suite", lambda tmp: suite.main(["--resume", "--preset", "smoke"]), ["--resume continues", "--preset"]),
    ("suite", lambda tmp: suite.main(["--resume", "x", "--checkpoint-every", "3"]), ["drop --checkpoint-every"]),
    ("suite", lambda tmp: suite.main(["--resume", "nope", "--storage-path", str(tmp)]),
     ["'nope'", "no Tune experiment"]),
    ("suite", lambda tmp: suite.main(["--tasks", "clutter", "clutter"]), ["--tasks", "each one once"]),
    ("suite", lambda tmp: suite.main(["--gaze", "contrastive_coeff=abc"]), ["contrastive_coeff=abc", "float"]),
    ("suite", lambda tmp: suite.main(["--preset", "smoke", "--gaze", "contrastive_num_anchors=128"]),
     ["'PushCube-v1'", "contrastive_memory_capacity=64"]),
    ("suite", lambda tmp: suite.main(["--resume", "--storage-path", str(tmp)]), ["no experiment to resume", "under"]),
    ("suite", lambda tmp: suite.main(["--resume", "exp", "--algo", "ppo", "--storage-path", str(_sac_experiment(tmp))]),
     ["--resume 'exp' --algo ppo", "trials are sac arms", "drop --algo"]),
    ("env_config", lambda tmp: make_maniskill_env({"num_envs": 1, "env_id": _no_camera_task(),
                                                   "sim_backend": "physx_cpu"}),
     ["env_id='NoCameraPushCube-v1'", "no camera image"]),
    ("suite", lambda tmp: suite.main(["--gaze", "coeff=2"]), ["'coeff=2'", "contrastive_coeff"]),
    ("suite", lambda tmp: suite.main(["--gaze", "contrastive_coeff=-2"]), ["contrastive_coeff=-2", ">= 0"]),
    ("suite", lambda tmp: suite.main(["--preset", "smoke", "--storage-path", str(_a_file(tmp) / "results")]),
     ["--storage-path", "a-file", "not a writable folder"]),
    ("report", lambda tmp: report_main([str(tmp / "missing")]), ["missing", "does not exist"]),
    ("report", lambda tmp: report_main([str(tmp)]), ["no Tune trials"]),
    ("report", lambda tmp: report_main([str(tmp), "--levels", "80"]), ["80", "(0, 1]"]),
    ("report", lambda tmp: report_main([str(tmp), "--until", "-5"]), ["until=-5", "> 0"]),
    ("visualize", lambda tmp: visualize_main([str(tmp), "--episodes", "0"]), ["--episodes=0", "[1, 64]"]),
    ("visualize", lambda tmp: visualize_main([str(tmp)]), ["is not an RLlib algorithm checkpoint"]),
]


def _sac_experiment(tmp):
    """``tmp`` holding experiment ``exp`` whose one trial is a gaze-sac trial."""
    trial = tmp / "exp" / "fovea_gaze-sac_seed0_00000"
    trial.mkdir(parents=True)
    (tmp / "exp" / suite.EXPERIMENT_STATE).write_text("")
    (trial / "params.json").write_text('{"arm": "gaze-sac"}')
    return tmp


def _no_camera_task() -> str:
    """A registered ManiSkill task without a camera: PushCube-v1 with its sensor camera removed (as
    ManiSkill's humanoid and mobile-manipulation tasks have none)."""
    from mani_skill.envs.tasks.tabletop.push_cube import PushCubeEnv
    from mani_skill.utils.registration import REGISTERED_ENVS, register_env

    name = "NoCameraPushCube-v1"
    if name not in REGISTERED_ENVS:
        class NoCameraPushCube(PushCubeEnv):
            @property
            def _default_sensor_configs(self):
                return []

        register_env(name, max_episode_steps=50)(NoCameraPushCube)
    return name


@pytest.mark.parametrize("entry, call, texts", BAD_INPUTS, ids=[f"{e}-{i}" for i, (e, _, _) in enumerate(BAD_INPUTS)])
def test_bad_input_is_refused_naming_value_and_allowed(entry, call, texts, tmp_path, capsys, monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the bad input was refused")

    monkeypatch.setattr(ray, "init", no_ray)  # a tripwire: refusing must come before any work
    with pytest.raises((ValueError, SystemExit)) as refused:
        call(tmp_path)
    message = str(refused.value) + capsys.readouterr().err
    for text in texts:
        assert text in message, message
