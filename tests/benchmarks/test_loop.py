"""benchmarks/loop.py at a tiny size: both sides train the same network and count the env steps they say."""

import math

import pytest
from helpers import load_benchmark

loop = load_benchmark("loop")

TINY = ["--iterations", "2", "--warmup", "1", "--num-envs", "4", "--rollout-length", "8", "--image-size", "48",
        "--threads", "1"]


def _check(report: dict) -> None:
    assert report["single"]["module"] == report["rllib"]["module"]   # same class and parameter count
    assert report["single"]["module"][0] == "GazePPOModule"
    for side in report.values():
        iterations = side["iterations"]
        assert [it["timed"] for it in iterations] == [False, True, True]
        assert all(it["steps"] == 4 * 8 for it in iterations), iterations   # RLlib's lifetime counter, per iteration
        assert all(math.isfinite(it["loss"]) and it["seconds"] > 0 for it in iterations), iterations


@pytest.mark.parametrize("arm", loop.ARMS)
def test_both_sides_train_the_same_module_on_cpu(ray_session, arm, capsys):
    report = loop.main(TINY + ["--arm", arm])
    _check(report)
    out = capsys.readouterr().out
    assert "single / rllib:" in out
    assert ("PPO's loss only" in out) == (arm != "ppo")


def test_the_device_rollout_side_next_to_the_episodes_one_profiled(ray_session, capsys):
    report = loop.main(TINY + ["--rollout", "both", "--profile", "5"])
    _check(report)
    assert report["rllib-device"]["module"] == report["rllib"]["module"]
    out = capsys.readouterr().out
    assert "single / rllib-device:" in out
    profile = out.split("cProfile, ms per timed iteration")[1]
    for side in ("rllib", "rllib-device", "single"):   # each side's own time by place, torch's among them
        (line,) = [line for line in profile.splitlines() if line.split()[:1] == [side]]
        assert "torch " in line and "env " in line, line
        assert f"{side}: the 5 functions of most cumulative time" in profile
    assert "loop.py" in profile.split("rllib: the 5 functions")[1]   # the timed iteration is the top entry


def test_a_negative_profile_length_is_refused(capsys):
    with pytest.raises(SystemExit):
        loop.main(TINY + ["--profile", "-1"])
    assert "--profile=-1: must be >= 0" in capsys.readouterr().err


def test_the_rllib_side_with_a_remote_env_runner(ray_session):
    _check(loop.main(TINY + ["--env-runners", "1"]))


@pytest.mark.gpu
def test_both_sides_on_cuda(ray_session):
    _check(loop.main(TINY + ["--device", "cuda"]))


@pytest.mark.gpu
def test_the_device_rollout_on_cuda(ray_session):
    _check(loop.main(TINY + ["--device", "cuda", "--rollout", "both"]))
