"""What the KubeRay operator builds from cluster/kuberay-rayjob.yaml, restated from its Go sources (tags
v1.5.1 to v1.7.0, ray-operator/controllers/ray) for the tests: no operator or Kubernetes runs here.

- A RayJob's RayCluster is named ``<rayjob>-<5 random characters>`` (utils/util.go, GenerateRayClusterName).
- Token env entries (common/pod.go, SetContainerTokenAuthEnvVars), on the head's and the workers' Ray
  containers, the wait-gcs-ready init container, the submitter (rayjob_controller.go) and the autoscaler
  sidecar it injects into the head pod: from v1.6.0 RAY_AUTH_MODE and RAY_AUTH_TOKEN, each only where the
  container has none, the token from authOptions.secretName (else a Secret named after the RayCluster, which
  the operator creates); v1.5.1-v1.5.2 append both unconditionally, from the RayCluster's own Secret.
- The autoscaler sidecar (BuildAutoscalerContainer) starts with no env: it gets the operator's entries first,
  then autoscalerOptions.env is appended after them (mergeAutoscalerOverrides), duplicates included.
- With in-tree autoscaling the head pod's serviceAccountName becomes CheckName(GetHeadGroupServiceAccountName):
  the head template's own account if it names one, else the RayCluster's name; the operator binds its
  autoscaler Role to that account (common/rbac.go, BuildRoleBinding) and, when the template names one, requires
  it to exist (raycluster_controller.go, reconcileAutoscalerServiceAccount). Worker pods keep their template's.
- Kubernetes keeps the last of two env entries with one name (and warns about the duplicate).
"""

from __future__ import annotations

import copy

RAYJOB_CLUSTER = "rllib-gaze-suite-x7k2p"  # what GenerateRayClusterName makes of the RayJob rllib-gaze-suite
AUTOSCALER = "autoscaler"


def check_name(name: str) -> str:
    """utils/util.go, CheckName: at most 50 characters (the front clipped), not starting with a digit or a
    punctuation mark."""
    name = name[len(name) - 50:] if len(name) > 50 else name
    return "r" + name[1:] if name[0].isdigit() or not name[0].isalnum() else name


def operator_secret(cluster: dict, name: str = RAYJOB_CLUSTER) -> str | None:
    """The Secret whose token the operator's dashboard client sends on its job-status polls, None for none
    (utils/util.go, GetRayDashboardClientFunc: only under authOptions.mode token; authOptions.secretName, else
    a Secret of its own named after the RayCluster: raycluster_controller.go, reconcileAuthSecret)."""
    auth = cluster.get("authOptions") or {}
    if auth.get("mode") != "token":
        return None
    return auth.get("secretName") or check_name(name)


def with_token_env(env: list[dict], cluster: dict, version: tuple[int, int, int] = (1, 6, 0),
                   name: str = RAYJOB_CLUSTER) -> list[dict]:
    """A container's env after SetContainerTokenAuthEnvVars of operator ``version``."""
    env = copy.deepcopy(env)
    secret = operator_secret(cluster, name)
    if secret is None:
        return env
    entries = [{"name": "RAY_AUTH_MODE", "value": "token"},
               {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "auth_token"}}}]
    if version < (1, 6, 0):  # v1.5.1-v1.5.2: appended whatever is there, the RayCluster's own Secret
        entries[1]["valueFrom"]["secretKeyRef"]["name"] = check_name(name)
        return env + entries
    return env + [e for e in entries if e["name"] not in {x["name"] for x in env}]


def effective(env: list[dict]) -> dict[str, dict]:
    """Name -> the entry a process sees: the last one of that name."""
    return {e["name"]: e for e in env}


def duplicates(env: list[dict]) -> list[str]:
    names = [e["name"] for e in env]
    return sorted({n for n in names if names.count(n) > 1})


def head_pod(cluster: dict, version: tuple[int, int, int] = (1, 6, 0), name: str = RAYJOB_CLUSTER) -> dict:
    """The head pod's spec as the operator builds it: token env, and with in-tree autoscaling its service
    account and the autoscaler sidecar (last container)."""
    spec = copy.deepcopy(cluster["headGroupSpec"]["template"]["spec"])
    spec["containers"][0]["env"] = with_token_env(spec["containers"][0].get("env", []), cluster, version, name)
    if cluster.get("enableInTreeAutoscaling"):
        spec["serviceAccountName"] = check_name(spec.get("serviceAccountName") or name)
        env = with_token_env([], cluster, version, name) + (cluster.get("autoscalerOptions") or {}).get("env", [])
        spec["containers"].append({"name": AUTOSCALER, "image": spec["containers"][0]["image"], "env": env})
    return spec


def worker_pods(cluster: dict, version: tuple[int, int, int] = (1, 6, 0), name: str = RAYJOB_CLUSTER) -> dict:
    """Group name -> the worker pod's spec as the operator builds it (token env; the template's account)."""
    pods = {}
    for group in cluster["workerGroupSpecs"]:
        spec = copy.deepcopy(group["template"]["spec"])
        spec["containers"][0]["env"] = with_token_env(spec["containers"][0].get("env", []), cluster, version, name)
        pods[group["groupName"]] = spec
    return pods


def submitter(job: dict, version: tuple[int, int, int] = (1, 6, 0), name: str = RAYJOB_CLUSTER) -> dict:
    """The submitter pod's container as the operator builds it (rayjob_controller.go: the token entries too)."""
    container = copy.deepcopy(job["submitterPodTemplate"]["spec"]["containers"][0])
    container["env"] = with_token_env(container.get("env", []), job["rayClusterSpec"], version, name)
    return container
