"""Autoscaling as the cluster files ask for it, tried with Ray's fake multi-node provider on this machine.

The launch files (cluster/aws.yaml, cluster/gcp.yaml) promise a head that takes no trials and GPU workers that
Ray's autoscaler adds while trials wait and releases when they are idle. No cloud can be reached from CI, so
the test turns the file's node types into the config of Ray's fake multi-node provider (the one
``ray.cluster_utils.AutoscalingCluster`` wraps; it starts each "instance" as a Ray node process on this
machine): the head keeps the file's ``resources: {"CPU": 0}``, each worker type keeps its name and
min/max_workers (capped) with 1 CPU standing in for its GPU and CPUs. On that cluster the suite is submitted with
``ray job submit`` and must succeed with its trial on a worker the autoscaler launched, which is then released.

We start the head ourselves (``ray start --head --block``, env as AutoscalingCluster sets it) instead of calling
``AutoscalingCluster.start()/shutdown()``: those run ``ray stop --force``, which ends every Ray on the machine.
The fake provider starts its worker nodes inside the head's autoscaler process without tying them to it
(``spawn_reaper=False``: no kernel fate-sharing), so ending the head leaves them running; the cleanup ends every
process below the head and any other that names this cluster's own temp dir, by pid.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from loopback import RAY, free_ports, node_ports, stop, wait_for

from rllib_gaze.results import result_rows

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_FILES = ["aws.yaml", "gcp.yaml"]

# The fake provider tags its head "ray.head.default" (FAKE_HEAD_NODE_TYPE) whatever the config calls it, and the
# autoscaler looks every node's type up in available_node_types: the file's head type is renamed to that.
FAKE_HEAD_TYPE = "ray.head.default"
# Ray's node id of the head, as the provider lists it: with use_node_id_as_ip the autoscaler matches nodes
# to their load by node id (the provider's ids are not IPs), so the head is started with this id.
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
MAX_WORKERS = 2  # the test's cap: a 2-core machine holds the head and one or two 1-CPU workers
WORKER_CPUS = 1  # stands in for a GPU worker: the smoke trial asks for 1 CPU and no GPU
OBJECT_STORE_BYTES = 256 * 1024**2  # per node: the default (30% of RAM per node) is far more than a smoke run needs
IDLE_TIMEOUT_MINUTES = 0.1  # 6 s: the release is seen within the test instead of after the files' 10 minutes


def fake_autoscaling_config(launch_file: str | Path, gcs_address: str, *, max_workers: int = MAX_WORKERS,
                            idle_timeout_minutes: float = IDLE_TIMEOUT_MINUTES) -> dict[str, Any]:
    """The fake multi-node provider's autoscaling config for the node types of ``launch_file`` (a `ray up` file).

    The head type keeps its resources; worker types keep their names and min/max_workers (capped at
    ``max_workers``) with CPU stand-ins for their resources. Node updaters (SSH, set-up and start commands) are
    off, as in Ray's fake_multi_node/example.yaml: the provider starts Ray nodes itself. The config is written
    out in full because that example.yaml, which AutoscalingCluster starts from, is not in Ray 2.60's wheel.
    """
    launch = yaml.safe_load(Path(launch_file).read_text())
    head_type = launch["head_node_type"]
    node_types: dict[str, Any] = {
        FAKE_HEAD_TYPE: {"resources": copy.deepcopy(launch["available_node_types"][head_type]["resources"]),
                         "node_config": {}, "max_workers": 0}}
    for name, spec in launch["available_node_types"].items():
        if name == head_type:
            continue
        cap = min(spec.get("max_workers", launch["max_workers"]), max_workers)
        node_types[name] = {"resources": {"CPU": WORKER_CPUS, "object_store_memory": OBJECT_STORE_BYTES},
                            "node_config": {}, "min_workers": min(spec.get("min_workers", 0), cap), "max_workers": cap}
    return {
        "cluster_name": launch["cluster_name"],
        "max_workers": min(launch["max_workers"], max_workers),
        "upscaling_speed": launch.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_minutes,
        # gcs_address: the provider's worker nodes join this head (its default is <this host's IP>:6379)
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": node_types,
        "head_node_type": FAKE_HEAD_TYPE,
        # the rest of the schema's required keys, empty: nothing is copied or run on the fake nodes
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@pytest.mark.parametrize("launch_file", LAUNCH_FILES)
def test_fake_config_keeps_the_launch_files_node_types(launch_file: str) -> None:
    from ray.autoscaler._private.util import validate_config

    launch = yaml.safe_load((ROOT / "cluster" / launch_file).read_text())
    config = fake_autoscaling_config(ROOT / "cluster" / launch_file, "127.0.0.1:6379")
    validate_config(config)  # the schema the autoscaler checks the config against
    types = config["available_node_types"]
    # the head takes no trials, as the file says
    assert types[FAKE_HEAD_TYPE]["resources"] == launch["available_node_types"][launch["head_node_type"]]["resources"]
    assert types[FAKE_HEAD_TYPE]["resources"].get("CPU", 0) == 0 and not types[FAKE_HEAD_TYPE]["resources"].get("GPU")
    workers = {name: spec for name, spec in launch["available_node_types"].items() if name != launch["head_node_type"]}
    assert workers and set(types) == {FAKE_HEAD_TYPE, *workers}
    for name, spec in workers.items():
        assert spec["resources"].get("GPU", 0) >= 1, f"{launch_file}: {name} is no GPU worker, nothing to stand in for"
        assert spec.get("min_workers", 0) == 0, f"{launch_file}: {name} runs while no trial waits"
        assert types[name]["resources"]["CPU"] == WORKER_CPUS and "GPU" not in types[name]["resources"]
        assert types[name]["max_workers"] == min(spec["max_workers"], MAX_WORKERS) >= 1
    assert config["max_workers"] == min(launch["max_workers"], MAX_WORKERS)


def _autoscaler_report(gcs_address: str) -> dict[str, Any] | None:
    """The autoscaler's last status (what `ray status` prints), or None before its first update."""
    from ray._raylet import GcsClient

    try:
        raw = GcsClient(address=gcs_address).internal_kv_get(b"__autoscaling_status", None, timeout=10)
    except Exception:  # the GCS is not up yet
        return None
    status = json.loads(raw) if raw else {}
    return status if status.get("autoscaler_report") else None


def _nodes(dashboard: str) -> list[Any]:
    from ray.util.state import list_nodes

    try:
        return list_nodes(address=dashboard, detail=True, limit=100)
    except Exception:  # the dashboard is not up yet
        return []


def _mine(temp_dir: str) -> list[psutil.Process]:
    """Processes of this test's cluster that are not below the head: they name its own temp dir."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in process.info["cmdline"] or []):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _raylets(temp_dir: str) -> list[psutil.Process]:
    """This cluster's raylets (one per node), by their executable: a forked child may still carry its name."""
    return [p for p in _mine(temp_dir) if os.path.basename((p.info["cmdline"] or [""])[0]) == "raylet"]


def _end(head: subprocess.Popen, temp_dir: str) -> None:
    """Ends the head and every Ray process of this cluster, the fake provider's worker nodes included."""
    try:
        below = psutil.Process(head.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        below = []
    stop(head)
    # the fake worker nodes outlive the autoscaler that started them (no fate-sharing): end them by pid
    leftovers = {p.pid: p for p in below + _mine(temp_dir) if p.pid != os.getpid()}
    for process in leftovers.values():
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(leftovers.values()), timeout=30)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=30)


@pytest.mark.slow
def test_autoscaler_launches_a_worker_for_the_suite_and_releases_it_when_idle(tmp_path: Path) -> None:
    temp_dir = tempfile.mkdtemp(prefix="rg", dir="/tmp")  # short: Ray's socket paths live under it
    gcs, dashboard_port, client_port = free_ports(3)
    gcs_address, dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard_port}"
    config = fake_autoscaling_config(ROOT / "cluster" / "aws.yaml", gcs_address)
    (config_file := tmp_path / "autoscaling.yaml").write_text(yaml.safe_dump(config))
    worker_types = set(config["available_node_types"]) - {FAKE_HEAD_TYPE}
    # No RAY_* of the caller's (an address, a resource override the fake nodes would inherit); the env
    # AutoscalingCluster.start() sets; the head under the node id the provider lists it with.
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    client_env = {**base, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    head_env = {**client_env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
    head_cpus = config["available_node_types"][FAKE_HEAD_TYPE]["resources"].get("CPU", 0)
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--port", str(gcs), "--temp-dir", temp_dir, "--node-ip-address",
         "127.0.0.1", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
         "--num-cpus", str(head_cpus), "--num-gpus", "0", "--object-store-memory", str(OBJECT_STORE_BYTES),
         # the Ray Client server's port too: its default, 10001, may be another cluster's on this machine
         "--ray-client-server-port", str(client_port), f"--autoscaling-config={config_file}", *node_ports()],
        env=head_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Before the job: the autoscaler runs (two reports apart, so min_workers=0 has been acted on)
        # and only the head is there.
        first = wait_for(lambda: _autoscaler_report(gcs_address), 180, "the autoscaler's first report")
        report = wait_for(lambda: (r := _autoscaler_report(gcs_address)) and r["time"] > first["time"] and r,
                          60, "the autoscaler's second report")
        summary = report["autoscaler_report"]
        assert not (set(summary["active_nodes"]) | set(summary["pending_launches"])) & worker_types, summary
        nodes = wait_for(lambda: _nodes(dashboard), 120, "the head in the state API")
        assert [n.node_id for n in nodes if n.state == "ALIVE"] == [FAKE_HEAD_NODE_ID]
        head_node = next(n for n in nodes if n.node_id == FAKE_HEAD_NODE_ID)
        assert not head_node.resources_total.get("CPU") and not head_node.resources_total.get("GPU"), head_node

        storage = tmp_path / "results"
        command = [RAY, "job", "submit", "--address", dashboard, "--submission-id", "auto", "--",
                   sys.executable, str(ROOT / "tune_configs" / "maniskill_suite.py"), "--preset", "smoke",
                   "--tasks", "clutter", "--arms", "ppo", "--seeds", "0", "--storage-path", str(storage),
                   "--name", "auto"]
        started, output = time.monotonic(), tmp_path / "submit.log"
        with output.open("w") as out:
            run = subprocess.Popen(command, env=client_env, stdout=out, stderr=subprocess.STDOUT)
        # While the job runs, the node type of every node the autoscaler lists (its report names each node's
        # type only while the node is up, and an idle worker goes within seconds of the job's end), and how
        # many raylets (nodes) this cluster's processes count at most.
        node_types: dict[str, str] = {}
        most_raylets = 0

        def job_ended() -> bool:
            nonlocal most_raylets
            report = _autoscaler_report(gcs_address)
            node_types.update((report or {}).get("autoscaler_report", {}).get("node_type_mapping") or {})
            most_raylets = max(most_raylets, len(_raylets(temp_dir)))
            return run.poll() is not None

        try:
            wait_for(job_ended, 900, "the suite's job")
        finally:
            if run.poll() is None:
                run.kill()
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(dashboard)
        logs = client.get_job_logs("auto")
        assert run.returncode == 0 and str(client.get_job_status("auto")) == "SUCCEEDED", \
            output.read_text()[-3000:] + logs[-5000:]
        assert "[suite] finished: 1/1 trials done" in logs, logs[-5000:]
        print(f"job: {time.monotonic() - started:.0f} s")

        # The trial ran on a node the autoscaler launched from the file's worker type (the provider's node ids
        # are Ray's node ids), with the stand-in's resources; nothing ran on the head.
        from ray.util.state import list_actors

        actors = list_actors(address=dashboard, filters=[("class_name", "=", "GazePPO")], detail=True, limit=100)
        trial_nodes = {actor.node_id for actor in actors}
        assert actors and FAKE_HEAD_NODE_ID not in trial_nodes, trial_nodes
        workers = {n.node_id: n for n in _nodes(dashboard) if n.node_id != FAKE_HEAD_NODE_ID}
        assert trial_nodes <= set(workers) and 1 <= len(workers) <= MAX_WORKERS, (trial_nodes, list(workers))
        for node in workers.values():
            assert node.resources_total.get("CPU") == WORKER_CPUS and not node.resources_total.get("GPU"), node
        assert {node_types.get(node_id) for node_id in trial_nodes} <= worker_types, node_types

        # After the job: idle workers are released (idle_timeout_minutes), the head stays.
        def released() -> bool:
            nodes = _nodes(dashboard)
            return bool(nodes) and [n.node_id for n in nodes if n.state == "ALIVE"] == [FAKE_HEAD_NODE_ID]

        wait_for(released, 180, "the idle worker's release")
        wait_for(lambda: (r := _autoscaler_report(gcs_address)) and not set(r["autoscaler_report"]["active_nodes"])
                 & worker_types, 60, "the autoscaler's report without workers")
        # released by the autoscaler for being idle (not lost), and its processes ended: one raylet left, the head's
        monitor_log = "".join(p.read_text() for p in Path(temp_dir).glob("session_latest/logs/monitor.log"))
        assert any(f"nodes of type {t} (idle)" in monitor_log for t in worker_types), monitor_log[-3000:]
        assert most_raylets >= 2, "no worker's raylet seen while the job ran"
        wait_for(lambda: len(_raylets(temp_dir)) == 1, 60, "the end of the released worker's raylet")

        trials = [d for d in (storage / "auto").iterdir() if (d / "params.json").exists()]
        assert len(trials) == 1
        rows = result_rows(str(trials[0] / "result.json"))
        assert rows[-1]["training_iteration"] == rows[-1]["config"]["suite_iterations"]
    finally:
        _end(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not _mine(temp_dir), "processes of the test's cluster left behind"
