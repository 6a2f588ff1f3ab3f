"""The suite as users run it on a cluster: `ray start --head` + one worker node on loopback, the
smoke preset submitted with `ray job submit`, its trials spread over both nodes, the report and
TensorBoard files written. This is also the end-to-end run of the smoke preset."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from loopback import RAY, free_ports, node_ports, stop, wait_for

from rllib_gaze.results import result_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def loopback_cluster():
    """A head (1 CPU) and one worker node (1 CPU) on 127.0.0.1, shared by this module's tests (the plan,
    which starts no trial, runs first), each a `ray start --block` process we stop ourselves (never
    `ray stop`, which would kill every Ray on the machine). Its own --temp-dir keeps
    /tmp/ray/ray_current_cluster, which a bare ray.init() reads, untouched."""
    temp_dir = tempfile.mkdtemp(prefix="rg", dir="/tmp")  # short: Ray's socket paths live under it
    gcs, dashboard, client = free_ports(3)  # client: Ray Client's port, 10001 unless given
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    common = ["--block", "--num-cpus", "1", "--num-gpus", "0", "--node-ip-address", "127.0.0.1"]
    head = subprocess.Popen([RAY, "start", "--head", "--port", str(gcs), "--temp-dir", temp_dir,
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                             "--ray-client-server-port", str(client), *common,
                             *node_ports()],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes = [head]
    try:
        from ray.job_submission import JobSubmissionClient

        address = f"http://127.0.0.1:{dashboard}"
        client = wait_for(lambda: _client(JobSubmissionClient, address), 120, "the head's job server")
        processes.append(subprocess.Popen([RAY, "start", "--address", f"127.0.0.1:{gcs}", *common, *node_ports()],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: _alive_nodes(address) == 2, 120, "the worker node")
        yield address, client, env
    finally:
        for process in reversed(processes):
            stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _client(cls, address):
    try:
        return cls(address)
    except Exception:  # the dashboard is not up yet
        return None


def _alive_nodes(address: str) -> int:
    from ray.util.state import list_nodes

    try:
        return sum(node.state == "ALIVE" for node in list_nodes(address=address))
    except Exception:
        return 0


def test_plan_via_ray_job_submit_plans_for_the_cluster_it_joins_and_starts_no_trial(loopback_cluster):
    address, client, env = loopback_cluster
    command = [RAY, "job", "submit", "--address", address, "--submission-id", "smoke-plan", "--",
               sys.executable, os.path.join(ROOT, "tune_configs", "maniskill_suite.py"), "--preset", "smoke", "--plan"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    logs = client.get_job_logs("smoke-plan")
    assert run.returncode == 0 and str(client.get_job_status("smoke-plan")) == "SUCCEEDED", logs[-5000:]
    assert "[plan] cluster: the Ray cluster at RAY_ADDRESS=" in logs and "2 node(s) up now" in logs
    # the smoke trials sample in their own process (1 CPU each); the head and the worker node have 1 CPU each
    assert "[plan] smoke (ppo): 8 trials" in logs and logs.count("4 trial(s) ask for 1 CPU and 0 GPU") == 2
    assert "at once on that cluster: 2 trial(s)" in logs and "[plan] smoke (sac): 2 trials" in logs

    from ray.util.state import list_actors

    assert not list_actors(address=address, filters=[("class_name", "=", "GazePPO")], limit=10)


def test_smoke_suite_via_ray_job_submit_spreads_trials_over_both_nodes(loopback_cluster, tmp_path):
    address, client, env = loopback_cluster
    storage = tmp_path / "results"
    command = [RAY, "job", "submit", "--address", address, "--submission-id", "smoke-suite", "--",
               sys.executable, os.path.join(ROOT, "tune_configs", "maniskill_suite.py"),
               "--preset", "smoke", "--storage-path", str(storage), "--name", "smoke"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    logs = client.get_job_logs("smoke-suite")
    assert run.returncode == 0 and str(client.get_job_status("smoke-suite")) == "SUCCEEDED", logs[-5000:]
    assert "[suite] smoke (ppo): 8 trials" in logs and "[suite] 3,328/3,328 env steps (100%)" in logs
    assert "[suite] finished: 8/8 trials done" in logs
    # then plain SAC and GazeSAC on the diagnostic, an experiment of their own that learns from its 2nd iteration
    assert "[suite] smoke (sac): 2 trials" in logs and "[suite] finished: 2/2 trials done" in logs
    sac_trials = [d for d in (storage / "smoke-sac").iterdir() if (d / "params.json").exists()]
    assert sorted(result_rows(str(d / "result.json"))[-1]["config"]["arm"] for d in sac_trials) == ["gaze-sac", "sac"]
    for trial in sac_trials:
        last = result_rows(str(trial / "result.json"))[-1]
        assert last["learners"]["default_policy"]["num_module_steps_trained_lifetime"] > 0
    assert "## clutter" in (storage / "smoke-sac" / "report.md").read_text()

    experiment = storage / "smoke"
    trials = sorted(d for d in experiment.iterdir() if (d / "params.json").exists())
    assert len(trials) == 8
    for trial in trials:
        rows = result_rows(str(trial / "result.json"))
        assert rows[-1]["training_iteration"] == rows[-1]["config"]["suite_iterations"]
        assert rows[-1]["evaluation"]["env_runners"]["num_episodes"] >= 1
        assert list(trial.glob("events.out.tfevents.*")) and list(trial.glob("checkpoint_*"))
    report = (experiment / "report.md").read_text()
    assert "## clutter" in report and "## PushCube-v1" in report
    assert (experiment / "success_clutter.png").exists() and (experiment / "success_PushCube-v1.png").exists()

    from ray.util.state import list_actors

    nodes = {actor.node_id for actor in list_actors(address=address, filters=[("class_name", "=", "GazePPO")],
                                                    detail=True, limit=1000)}
    assert len(nodes) == 2, f"trials ran on {len(nodes)} node(s)"
