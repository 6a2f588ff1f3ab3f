"""cluster/: launcher YAMLs against Ray's own schema, the KubeRay job, the resource plan.

The multi-node run (head + worker on loopback, the suite submitted with `ray job submit`, trials
on both nodes) is tests/test_suite_job.py."""

from __future__ import annotations

import copy
import os
import re

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHERS = ["aws.yaml", "gcp.yaml"]


def _load(name: str) -> dict:
    with open(os.path.join(ROOT, "cluster", name)) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_passes_rays_own_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(_load(name)))  # what `ray up` does before validating
    validate_config(config)  # ray/autoscaler/ray-schema.json plus Ray's own consistency checks


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_has_a_cpu_head_without_trials_and_autoscaling_gpu_workers(name):
    config = _load(name)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    (worker_type,) = [t for t in config["available_node_types"] if t != config["head_node_type"]]
    worker = config["available_node_types"][worker_type]
    assert worker["min_workers"] == 0 and worker["max_workers"] >= 1
    commands = " ".join(config["setup_commands"] + config["worker_setup_commands"])
    assert "cluster/setup_node.sh" in commands and "rllib_gaze.envs.maniskill physx_cuda" in commands
    assert config["file_mounts"] == {"~/rllib-gaze": "."}
    assert os.access(os.path.join(ROOT, "cluster", "setup_node.sh"), os.X_OK)


@pytest.mark.parametrize("name", LAUNCHERS + ["kuberay-rayjob.yaml"])
def test_placeholders_are_all_marked(name):
    text = open(os.path.join(ROOT, "cluster", name)).read()
    placeholders = set(re.findall(r"<[^<>\n]*>", text))
    assert placeholders and all(re.fullmatch(r"<FILL_[A-Z_]+>", p) for p in placeholders), placeholders


def test_kuberay_job_runs_the_suite_on_gpu_workers():
    job = _load("kuberay-rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert "tune_configs/maniskill_suite.py --preset paper" in job["spec"]["entrypoint"]
    assert "--storage-path s3://" in job["spec"]["entrypoint"] or "--storage-path gs://" in job["spec"]["entrypoint"]
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.60") and cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = cluster["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1


def test_paper_trial_needs_three_cpus_and_one_gpu_as_docs_cluster_md_says():
    from rllib_gaze.config import GazePPO
    from rllib_gaze.suite import PRESETS, TASKS, trial_config

    request = GazePPO.default_resource_request(trial_config(TASKS["PushCube-v1"], "gaze", 0, PRESETS["paper"]))
    assert request.bundles == [{"CPU": 1.0, "GPU": 0.5}, {"CPU": 1.0, "GPU": 0.25}, {"CPU": 1.0, "GPU": 0.25}]
    assert "| **per trial** | **3** | **1.0** |" in open(os.path.join(ROOT, "docs", "cluster.md")).read()
