"""Token authentication as the launch files set it up (RAY_AUTH_MODE=token on every node, one token
shared by the head, the workers and the user's laptop), tried on a loopback head by its owner and
by outsiders."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile

import pytest
import yaml
from loopback import RAY, free_ports, node_ports, stop, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(**auth: str) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**base, "RAY_USAGE_STATS_ENABLED": "0", **auth}


@pytest.mark.slow
def test_only_holders_of_the_token_submit_jobs_or_join_the_cluster():
    token = secrets.token_hex(16)
    owner = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    outsiders = {"no token": _env(RAY_AUTH_MODE="disabled"),
                 "a wrong token": _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))}
    temp_dir = tempfile.mkdtemp(prefix="rg", dir="/tmp")  # short: Ray's socket paths live under it
    gcs, dashboard, client = free_ports(3)  # client: Ray Client's port, 10001 unless given
    node = ["--block", "--num-cpus", "1", "--num-gpus", "0", "--node-ip-address", "127.0.0.1"]
    head = subprocess.Popen([RAY, "start", "--head", "--port", str(gcs), "--temp-dir", temp_dir,
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                             "--ray-client-server-port", str(client), *node,
                             *node_ports()], env=owner, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address = f"http://127.0.0.1:{dashboard}"

        def submit(env: dict) -> subprocess.CompletedProcess:
            return subprocess.run([RAY, "job", "submit", "--address", address, "--", sys.executable, "-c",
                                   "print('the job ran')"], env=env, capture_output=True, text=True, timeout=120)

        # the owner's job runs (retried until the head's job agent is up)
        ran = wait_for(lambda: (r := submit(owner)).returncode == 0 and r, 180, "a job submitted with the token")
        assert "the job ran" in ran.stdout
        for who, env in outsiders.items():
            refused = submit(env)
            assert refused.returncode != 0 and "AuthenticationError" in refused.stdout + refused.stderr, who
            joiner = subprocess.Popen([RAY, "start", "--address", f"127.0.0.1:{gcs}", *node, *node_ports()],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                output, _ = joiner.communicate(timeout=120)  # refused: exits; joined: would block
            except subprocess.TimeoutExpired:
                joiner.kill()
                pytest.fail(f"a worker with {who} joined the cluster")
            assert joiner.returncode != 0 and "Authentication" in output, (who, output[-2000:])
    finally:
        stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launchers_start_every_node_with_the_token_and_keep_the_dashboard_local(name):
    with open(os.path.join(ROOT, "cluster", name)) as f:
        config = yaml.safe_load(f)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the laptop's, on every node
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    head_start = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start


def test_kuberay_gives_every_ray_process_and_the_submitter_the_token_from_one_secret():
    with open(os.path.join(ROOT, "cluster", "kuberay-rayjob.yaml")) as f:
        text = f.read()
    job = yaml.safe_load(text)["spec"]
    cluster = job["rayClusterSpec"]
    submitter = job["submitterPodTemplate"]["spec"]
    envs = {"autoscaler": cluster["autoscalerOptions"]["env"],
            "submitter": submitter["containers"][0]["env"],
            "head": cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    for group in cluster["workerGroupSpecs"]:
        envs[group["groupName"]] = group["template"]["spec"]["containers"][0]["env"]
    secret = {"name": "rllib-gaze-ray-token", "key": "auth_token"}
    for who, env in envs.items():
        by_name = {e["name"]: e for e in env}
        assert by_name["RAY_AUTH_MODE"]["value"] == "token", who
        assert by_name["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == secret, who
    # KubeRay fills in `ray job submit` only where the template gives no command; a Job's pod must not restart
    assert "command" not in submitter["containers"][0] and submitter["restartPolicy"] == "Never"
    assert "kubectl create secret generic rllib-gaze-ray-token --from-literal=auth_token=" in text
