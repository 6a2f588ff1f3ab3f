"""cluster/: launcher YAMLs against Ray's own schema, the KubeRay job, the resource plan.

The multi-node run (head + worker on loopback, the suite submitted with `ray job submit`, trials
on both nodes) is tests/test_suite_job.py."""

from __future__ import annotations

import copy
import os
import re
import subprocess

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
    assert config["file_mounts"]["~/rllib-gaze"] == "."
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
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.60") and cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = cluster["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1


def test_kuberay_storage_is_a_fill_in_for_either_clouds_bucket():
    # The entrypoint (Tune's driver, in the head pod) writes there first; GKE needs gs://, EKS s3://.
    text = open(os.path.join(ROOT, "cluster", "kuberay-rayjob.yaml")).read()
    assert _load("kuberay-rayjob.yaml")["spec"]["entrypoint"].endswith("--storage-path <FILL_STORAGE_URL>")
    assert "s3://BUCKET/rllib-gaze on EKS" in text and "gs://BUCKET/rllib-gaze on GKE" in " ".join(text.split())


def test_kuberay_head_and_workers_run_as_the_account_bound_to_the_bucket_as_the_operator_builds_them():
    from kuberay import RAYJOB_CLUSTER, head_pod, worker_pods

    cluster = _load("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]
    account = cluster["headGroupSpec"]["template"]["spec"]["serviceAccountName"]
    assert head_pod(cluster)["serviceAccountName"] == account  # the operator's override keeps a named account
    assert {pod.get("serviceAccountName") for pod in worker_pods(cluster).values()} == {account}
    # without it, the head (the Tune driver) would run as the RayCluster's own account, named at random
    unnamed = copy.deepcopy(cluster)
    del unnamed["headGroupSpec"]["template"]["spec"]["serviceAccountName"]
    assert head_pod(unnamed)["serviceAccountName"] == RAYJOB_CLUSTER != account
    text = " ".join(open(os.path.join(ROOT, "cluster", "kuberay-rayjob.yaml")).read().split())
    assert f"kubectl create serviceaccount {account}" in text and f"iamserviceaccount --name {account}" in text
    assert f"/sa/{account}" in text  # the GKE principal of that account


@pytest.mark.parametrize("arm", ["gaze", "gaze-sac"])
def test_paper_trial_needs_three_cpus_and_one_gpu_as_docs_cluster_md_says(arm):
    from ray.tune.registry import get_trainable_cls

    from rllib_gaze.arms import algorithm
    from rllib_gaze.suite import PRESETS, TASKS, TRAINABLES, trial_config

    trainable = get_trainable_cls(TRAINABLES[algorithm(arm)])
    request = trainable.default_resource_request(trial_config(TASKS["PushCube-v1"], arm, 0, PRESETS["paper"]))
    assert request.bundles == [{"CPU": 1.0, "GPU": 0.5}, {"CPU": 1.0, "GPU": 0.25}, {"CPU": 1.0, "GPU": 0.25}]
    assert "| **per trial** | **3** | **1.0** |" in open(os.path.join(ROOT, "docs", "cluster.md")).read()


def test_the_paper_presets_size_is_what_docs_cluster_md_says():
    from rllib_gaze.cli import experiments, parse_args
    from rllib_gaze.suite import planned_steps

    paper = experiments(parse_args(["--preset", "paper"]), "paper")
    trials = {algo: len(p.tasks) * len(p.arms) * len(p.seeds) for algo, p in paper.items()}
    assert trials == {"ppo": 168, "sac": 24}
    assert planned_steps(paper["sac"]) == 133_632_000 and planned_steps(paper["ppo"]) > 1.8e9
    doc = " ".join(open(os.path.join(ROOT, "docs", "cluster.md")).read().split())
    assert "= 168 trials" in doc and "= 24 trials" in doc and "133.6M in all" in doc


@pytest.mark.parametrize("name", LAUNCHERS)
def test_the_head_can_import_its_cloud_provider_from_the_venv_it_runs_ray_in(name):
    # The head's autoscaler runs in ~/venv; setup_node.sh installs the package's extra named after
    # the provider there. The tests' venv has the same extras (dev), so the same import must work.
    from ray.autoscaler._private.providers import _get_node_provider_cls

    config = _load(name)
    provider = config["provider"]["type"]
    assert f"cluster/setup_node.sh {provider}" in " ".join(config["setup_commands"])
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert re.search(rf"^{provider} = \[", f.read(), re.M), f"pyproject.toml has no [{provider}] extra"
    assert _get_node_provider_cls(config["provider"]).__name__.endswith("NodeProvider")


def _node_script(command: str, tmp_path) -> subprocess.CompletedProcess:
    script = os.path.join(ROOT, "cluster", "setup_node.sh")
    return subprocess.run(["bash", "-c", f"source {script}; {command}"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)


def test_node_setup_registers_the_vulkan_icd_only_where_no_folder_has_one(tmp_path):
    for folder in ("usr", "etc"):
        (tmp_path / folder).mkdir()
    assert _node_script("nvidia_icds usr etc", tmp_path).stdout == ""      # none: register it
    (tmp_path / "etc" / "nvidia_icd.json").write_text("{}")
    assert _node_script("nvidia_icds usr etc", tmp_path).stdout.strip() == "etc/nvidia_icd.json"  # one is enough


def test_node_setup_names_an_unknown_provider():
    proc = subprocess.run(["bash", os.path.join(ROOT, "cluster", "setup_node.sh"), "azure"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "provider 'azure' unknown; allowed: aws, gcp" in proc.stderr


def test_kuberay_workers_fit_the_gpu_nodes_docs_cluster_md_names():
    # 8-vCPU / 32 GB nodes: about 7.9 CPUs and 28 GiB allocatable before DaemonSets
    job = _load("kuberay-rayjob.yaml")
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    requests = container["resources"]["requests"]
    cpus, memory_gib = float(requests["cpu"]), float(requests["memory"].removesuffix("Gi"))
    assert 3 <= cpus <= 7.5 and memory_gib <= 26  # one paper trial needs 3 CPUs (test above)


# boto3 calls of Ray's AWS node provider -> the IAM action each needs (CamelCase of the method,
# except where boto3's name differs from the API's)
_BOTO3_TO_IAM = {"create_instances": "ec2:RunInstances", "filter": "ec2:DescribeInstances",
                 "terminate": "ec2:TerminateInstances", "stop": "ec2:StopInstances"}


def _autoscaler_ec2_actions() -> set[str]:
    import ray.autoscaler._private.aws.node_provider as provider

    source = open(provider.__file__).read()
    calls = set(re.findall(r"ec2(?:_fail_fast)?(?:\.meta\.client|\.instances)?\.([a-z_]+)\b", source))
    calls |= set(re.findall(r"\bnode\.(terminate|stop)\(", source))
    calls -= {"meta", "instances"}
    return {_BOTO3_TO_IAM.get(c) or "ec2:" + "".join(w.title() for w in c.split("_")) for c in calls}


def test_the_head_policy_allows_every_ec2_call_of_rays_autoscaler_and_workers_get_none():
    import json

    def actions(name: str) -> set[str]:
        with open(os.path.join(ROOT, "cluster", name)) as f:
            statements = json.load(f)["Statement"]
        return {a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}

    needed = _autoscaler_ec2_actions()
    assert {"ec2:RunInstances", "ec2:DescribeInstances", "ec2:TerminateInstances", "ec2:CreateTags"} <= needed
    head, worker = actions("aws-head-policy.json"), actions("aws-worker-policy.json")
    assert needed <= head, needed - head
    assert "iam:PassRole" in head                       # the workers' instance profile
    assert not any(a.startswith(("ec2:", "iam:")) for a in worker)
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= head & worker
    config = _load("aws.yaml")
    arns = {t: config["available_node_types"][t]["node_config"]["IamInstanceProfile"]["Arn"]
            for t in config["available_node_types"]}
    assert arns[config["head_node_type"]] != arns["gpu_worker"]  # the head may launch VMs; workers may not


def test_gcp_head_and_worker_service_accounts_have_the_listed_roles():
    roles = [line.split("#")[0].split() for line in open(os.path.join(ROOT, "cluster", "gcp-roles.txt"))]
    roles = {(r[0], r[1]) for r in roles if r and r[0] in ("head", "worker")}
    assert {("head", "roles/compute.instanceAdmin.v1"), ("head", "roles/iam.serviceAccountUser"),
            ("head", "roles/storage.objectAdmin"), ("worker", "roles/storage.objectAdmin")} == roles
    config = _load("gcp.yaml")
    emails = {t: config["available_node_types"][t]["node_config"]["serviceAccounts"][0]["email"]
              for t in config["available_node_types"]}
    assert emails[config["head_node_type"]] != emails["gpu_worker"]


def test_gcp_roles_name_the_account_and_roles_ray_up_grants_itself():
    # `ray up` makes Ray's own account and grants it these roles project-wide whatever the head runs as
    # (ray/autoscaler/_private/gcp/config.py, _configure_iam_role): the file must say which, exactly.
    from ray.autoscaler._private.gcp.config import DEFAULT_SERVICE_ACCOUNT_ID, DEFAULT_SERVICE_ACCOUNT_ROLES

    text = open(os.path.join(ROOT, "cluster", "gcp-roles.txt")).read()
    lines = [line.split("#")[0].split() for line in text.splitlines()]
    granted_by_ray = {role for who, role in (r for r in lines if r) if who == DEFAULT_SERVICE_ACCOUNT_ID}
    assert granted_by_ray == set(DEFAULT_SERVICE_ACCOUNT_ROLES)
    assert "setIamPolicy" in text and "delete the account" in text


# GCE's instances.insert body (compute v1, resource Instance) for the node_config keys the files set, as
# JSON shapes: a type, a tuple of the enum's values, [shape] for a list of them, {key: shape} for an
# object (keys not in it are errors, so a key added to a file must be added here from the API's reference).
INT64 = "int64"  # the API writes int64 as a JSON string; Google's client also sends a number through
GCE_ACCELERATOR_CONFIG = {"acceleratorType": str, "acceleratorCount": int}
GCE_ATTACHED_DISK = {
    "boot": bool, "autoDelete": bool, "type": ("PERSISTENT", "SCRATCH"), "mode": ("READ_WRITE", "READ_ONLY"),
    "deviceName": str,
    "initializeParams": {"diskSizeGb": INT64, "sourceImage": str, "diskType": str, "diskName": str},
}
GCE_SCHEDULING = {
    "onHostMaintenance": ("MIGRATE", "TERMINATE"), "automaticRestart": bool, "preemptible": bool,
    "provisioningModel": ("STANDARD", "SPOT"), "instanceTerminationAction": ("STOP", "DELETE"),
}
GCE_INSTANCE = {
    "machineType": str,
    "disks": [GCE_ATTACHED_DISK],
    "metadata": {"items": [{"key": str, "value": str}]},
    "scheduling": GCE_SCHEDULING,
    "serviceAccounts": [{"email": str, "scopes": [str]}],
    "guestAccelerators": [GCE_ACCELERATOR_CONFIG],
    "labels": {},  # a map: checked apart (string keys and values)
    "tags": {"items": [str]},
}


def _gce_errors(value, shape, path: str = "node_config") -> list[str]:
    """Where ``value`` does not have ``shape`` (one of GCE_INSTANCE's), as 'path: what' strings."""
    if path.endswith(".labels"):
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        return [] if ok else [f"{path}: a map of strings, got {value!r}"]
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return [f"{path}: an object, got {type(value).__name__}"]
        errors = [f"{path}.{k}: not in the table of the API's fields" for k in value if k not in shape]
        return errors + [e for k in value if k in shape for e in _gce_errors(value[k], shape[k], f"{path}.{k}")]
    if isinstance(shape, list):
        if not isinstance(value, list):
            return [f"{path}: a list, got {type(value).__name__}"]
        return [e for i, item in enumerate(value) for e in _gce_errors(item, shape[0], f"{path}[{i}]")]
    if isinstance(shape, tuple):
        return [] if value in shape else [f"{path}: one of {shape}, got {value!r}"]
    if shape == INT64:
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.isdigit())
        return [] if ok else [f"{path}: an int64, got {value!r}"]
    ok = isinstance(value, shape) and not (shape is int and isinstance(value, bool))
    return [] if ok else [f"{path}: {shape.__name__}, got {value!r}"]


def test_the_gce_shape_check_refuses_what_the_api_refuses():
    assert _gce_errors({"scheduling": [{"onHostMaintenance": "TERMINATE"}]}, GCE_INSTANCE)  # the old list form
    assert _gce_errors({"scheduling": {"onHostMaintenance": "terminate"}}, GCE_INSTANCE)
    assert _gce_errors({"guestAccelerators": [{"acceleratorType": "nvidia-l4", "acceleratorCount": "1"}]},
                       GCE_INSTANCE)
    assert _gce_errors({"disks": [{"initializeParams": [{"diskSizeGb": 150}]}]}, GCE_INSTANCE)
    assert _gce_errors({"machinetype": "g2-standard-8"}, GCE_INSTANCE)
    assert not _gce_errors({"scheduling": {"onHostMaintenance": "TERMINATE"}, "labels": {"a": "b"},
                            "guestAccelerators": [{"acceleratorType": "nvidia-l4", "acceleratorCount": 1}]},
                           GCE_INSTANCE)


def test_gcp_node_configs_have_the_shapes_gce_instances_insert_takes():
    # Ray sends node_config to instances.insert as it is (gcp/node.py create_instance: only machineType and
    # acceleratorType are expanded to URLs), so a wrong shape fails every launch of that node type.
    config = _load("gcp.yaml")
    gpu_types = []
    for name, spec in config["available_node_types"].items():
        node_config = spec["node_config"]
        assert not _gce_errors(node_config, GCE_INSTANCE), (name, _gce_errors(node_config, GCE_INSTANCE))
        if spec["resources"].get("GPU", 0) >= 1 or node_config.get("guestAccelerators"):
            gpu_types.append(name)
            # a VM with a GPU cannot live-migrate: GCE wants it stopped for host maintenance
            assert node_config.get("scheduling", {}).get("onHostMaintenance") == "TERMINATE", name
    assert gpu_types == ["gpu_worker"]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_the_head_runs_only_our_setup_where_rays_defaults_would_add_a_pip_install(name):
    # Ray fills in every key a file leaves out from its provider's defaults.yaml; GCP's pins
    # google-api-python-client==1.7.8 (older than the [gcp] extra's), AWS's installs boto3 unpinned, both
    # into the venv the autoscaler imports them from (~/venv/bin is first on the PATH of Ray's shells).
    from ray.autoscaler._private.util import prepare_config

    config = _load(name)
    assert config["head_setup_commands"] == []
    assert prepare_config(copy.deepcopy(config))["head_setup_commands"] == config["setup_commands"]
    without = {k: v for k, v in copy.deepcopy(config).items() if k != "head_setup_commands"}
    defaults = prepare_config(without)["head_setup_commands"][len(config["setup_commands"]):]
    assert any("pip install" in command for command in defaults), defaults  # why the key is there


# Every place that shows `ray job submit` to one of these clusters: the client attaches the token only
# with RAY_AUTH_MODE=token, so the command must run with it (on the line or exported before it in its block).
SUBMIT_DOCS = ["cluster/aws.yaml", "cluster/gcp.yaml", "docs/cluster.md", "README.md#Run on a cluster"]


def _section(path: str) -> str:
    file, _, heading = path.partition("#")
    text = open(os.path.join(ROOT, file)).read()
    if not heading:
        return text
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


@pytest.mark.parametrize("path", SUBMIT_DOCS)
def test_every_ray_job_submit_shown_for_the_clusters_runs_in_token_mode(path):
    shown = 0
    for block in re.split(r"^```.*$|^$", _section(path), flags=re.M):  # code blocks and paragraphs
        before = ""
        for line in block.splitlines():
            if "ray job submit" in line:
                shown += 1
                assert "RAY_AUTH_MODE=token" in before + line, (path, line)
            before += line + "\n"
    assert shown or path.startswith("docs/"), f"{path} shows no `ray job submit`"
