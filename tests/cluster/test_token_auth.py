"""Token authentication as the launch files set it up (RAY_AUTH_MODE=token on every node, one token
shared by the head, the workers and the user's laptop), tried on a loopback head by its owner, by
outsiders, and by a client that polls the job's status as the KubeRay operator does with what
cluster/kuberay-rayjob.yaml gives it."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest
import yaml
from kuberay import (
    RAYJOB_CLUSTER,
    duplicates,
    effective,
    head_pod,
    operator_secret,
    submitter,
    with_token_env,
    worker_pods,
)
from loopback import RAY, free_ports, node_ports, stop, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(**auth: str) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**base, "RAY_USAGE_STATS_ENABLED": "0", **auth}


@dataclass
class TokenHead:
    """A loopback Ray head in token mode, as the launch files start theirs."""

    token: str
    gcs: int
    address: str  # the dashboard (job API)

    @property
    def owner(self) -> dict:
        return _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)


NODE = ["--block", "--num-cpus", "1", "--num-gpus", "0", "--node-ip-address", "127.0.0.1"]


@pytest.fixture(scope="module")
def token_head():
    token = secrets.token_hex(16)
    temp_dir = tempfile.mkdtemp(prefix="rg", dir="/tmp")  # short: Ray's socket paths live under it
    gcs, dashboard, client = free_ports(3)  # client: Ray Client's port, 10001 unless given
    head = TokenHead(token, gcs, f"http://127.0.0.1:{dashboard}")
    process = subprocess.Popen([RAY, "start", "--head", "--port", str(gcs), "--temp-dir", temp_dir,
                                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                                "--ray-client-server-port", str(client), *NODE, *node_ports()],
                               env=head.owner, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield head
    finally:
        stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(head: TokenHead, env: dict, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", "submit", "--address", head.address, *options, "--", sys.executable, "-c",
                           "print('the job ran')"], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_only_holders_of_the_token_submit_jobs_or_join_the_cluster(token_head):
    outsiders = {"no token": _env(RAY_AUTH_MODE="disabled"),
                 "a wrong token": _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))}
    # the owner's job runs (retried until the head's job agent is up)
    ran = wait_for(lambda: (r := _submit(token_head, token_head.owner)).returncode == 0 and r, 180,
                   "a job submitted with the token")
    assert "the job ran" in ran.stdout
    for who, env in outsiders.items():
        refused = _submit(token_head, env)
        assert refused.returncode != 0 and "AuthenticationError" in refused.stdout + refused.stderr, who
        joiner = subprocess.Popen([RAY, "start", "--address", f"127.0.0.1:{token_head.gcs}", *NODE, *node_ports()],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            output, _ = joiner.communicate(timeout=120)  # refused: exits; joined: would block
        except subprocess.TimeoutExpired:
            joiner.kill()
            pytest.fail(f"a worker with {who} joined the cluster")
        assert joiner.returncode != 0 and "Authentication" in output, (who, output[-2000:])


def _rayjob() -> dict:
    with open(os.path.join(ROOT, "cluster", "kuberay-rayjob.yaml")) as f:
        return yaml.safe_load(f)


def _container_secret(container: dict, cluster: dict) -> str:
    """The Secret a Ray container's RAY_AUTH_TOKEN comes from once the operator has added its entries."""
    return effective(with_token_env(container.get("env", []), cluster))["RAY_AUTH_TOKEN"]["valueFrom"][
        "secretKeyRef"]["name"]


def _operator_get_job_info(address: str, submission_id: str, token: str | None) -> tuple[int, dict | str]:
    """GET /api/jobs/<id> as KubeRay's dashboard client sends it (dashboard_httpclient.go, GetJobInfo and
    setAuthHeader: header x-ray-authorization, 'Bearer <token>', only when it has a token)."""
    request = urllib.request.Request(f"{address}/api/jobs/{submission_id}", method="GET")
    if token:
        request.add_header("x-ray-authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


@pytest.mark.slow
def test_the_operator_reads_the_jobs_status_with_the_token_the_rayjob_gives_it(token_head):
    # The Secrets in the namespace: ours (the head runs with its token) and the one the operator makes for the
    # RayCluster when authOptions names none, with a token of its own.
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    head_container = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert _container_secret(head_container, cluster) == "rllib-gaze-ray-token"
    namespace = {"rllib-gaze-ray-token": token_head.token, RAYJOB_CLUSTER: secrets.token_hex(16)}

    # The submitter pod's `ray job submit --submission-id $RAY_JOB_SUBMISSION_ID`, with the token.
    submission_id = f"rllib-gaze-suite-{secrets.token_hex(4)}"
    wait_for(lambda: _submit(token_head, token_head.owner, "--submission-id", submission_id,
                             "--no-wait").returncode == 0, 180, "a job submitted with the token")

    # The operator's polls, with what the file gives it, until the job is terminal (IsJobTerminal).
    secret = operator_secret(cluster)
    token = namespace.get(secret) if secret else None

    def terminal():
        status, info = _operator_get_job_info(token_head.address, submission_id, token)
        assert status == 200, (status, info)  # 401 without a token, 403 with the operator's own Secret's
        return info["status"] in ("SUCCEEDED", "FAILED", "STOPPED") and info

    info = wait_for(terminal, 120, "the job's end, as the operator reads it")
    assert info["status"] == "SUCCEEDED" and info["submission_id"] == submission_id

    # What Ray answers an operator without the token (no authOptions) or with its own Secret's (no secretName).
    assert _operator_get_job_info(token_head.address, submission_id, None)[0] == 401
    assert _operator_get_job_info(token_head.address, submission_id, namespace[RAYJOB_CLUSTER])[0] == 403


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launchers_start_every_node_with_the_token_and_keep_the_dashboard_local(name):
    with open(os.path.join(ROOT, "cluster", name)) as f:
        config = yaml.safe_load(f)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the laptop's, on every node
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    head_start = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start


def test_kuberay_gives_every_ray_process_the_submitter_and_the_operator_the_token_from_one_secret():
    with open(os.path.join(ROOT, "cluster", "kuberay-rayjob.yaml")) as f:
        text = f.read()
    job = yaml.safe_load(text)["spec"]
    cluster = job["rayClusterSpec"]
    # The operator sends a token on its own job-status polls only under authOptions.mode token, and the one of
    # our Secret only where secretName names it (the loopback test above tries both).
    assert cluster["authOptions"] == {"mode": "token", "secretName": "rllib-gaze-ray-token"}
    head = head_pod(cluster)
    envs = {"submitter": submitter(job)["env"]}
    envs.update({c["name"]: c["env"] for c in head["containers"]})  # ray-head and the autoscaler sidecar
    envs.update({group: pod["containers"][0]["env"] for group, pod in worker_pods(cluster).items()})
    assert "autoscaler" in envs and len(envs) == 4
    secret = {"name": "rllib-gaze-ray-token", "key": "auth_token"}
    for who, env in envs.items():
        assert not duplicates(env), (who, duplicates(env))  # the API server warns about each one
        by_name = effective(env)
        assert by_name["RAY_AUTH_MODE"]["value"] == "token", who
        assert by_name["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == secret, who
    # KubeRay fills in `ray job submit` only where the template gives no command; a Job's pod must not restart
    assert "command" not in job["submitterPodTemplate"]["spec"]["containers"][0]
    assert job["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
    assert "kubectl create secret generic rllib-gaze-ray-token --from-literal=auth_token=" in text


def test_an_autoscaler_env_block_would_repeat_the_operators_entries():
    # why the file has no autoscalerOptions.env: the operator appends it after its own entries
    cluster = yaml.safe_load(open(os.path.join(ROOT, "cluster", "kuberay-rayjob.yaml")))["spec"]["rayClusterSpec"]
    with_block = {**cluster, "autoscalerOptions": {"env": with_token_env([], cluster)}}
    (sidecar,) = [c for c in head_pod(with_block)["containers"] if c["name"] == "autoscaler"]
    assert duplicates(sidecar["env"]) == ["RAY_AUTH_MODE", "RAY_AUTH_TOKEN"]


def test_on_operator_1_5_1_every_pod_and_the_poll_share_the_operators_own_token():
    # what docs/cluster.md says of 1.5.1-1.5.2 (where the CRD drops secretName): the appended entries come last
    cluster = yaml.safe_load(open(os.path.join(ROOT, "cluster", "kuberay-rayjob.yaml")))["spec"]["rayClusterSpec"]
    old = {**cluster, "authOptions": {"mode": "token"}}
    head = head_pod(old, version=(1, 5, 1))
    tokens = {c["name"]: effective(c["env"])["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
              for c in head["containers"]}
    assert set(tokens.values()) == {operator_secret(old)} == {RAYJOB_CLUSTER}
    # with the autoscaler env block this file had before, the autoscaler alone held our Secret's token
    old["autoscalerOptions"] = {"env": [{"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": "rllib-gaze-ray-token", "key": "auth_token"}}}]}
    (sidecar,) = [c for c in head_pod(old, version=(1, 5, 1))["containers"] if c["name"] == "autoscaler"]
    assert effective(sidecar["env"])["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "rllib-gaze-ray-token"
    doc = " ".join(open(os.path.join(ROOT, "docs", "cluster.md")).read().split())
    assert "| 1.5.1 - 1.5.2 |" in doc and "so the poll succeeds" in doc and "What breaks there is the autoscaler" in doc
