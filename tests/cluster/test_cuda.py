"""The torch every GPU node installs is a CUDA build that the NVIDIA driver of its image (or node) runs.

torch's pip wheels bring their own CUDA runtime, so what decides is torch's CUDA build against the node's
driver: PyPI's torch 2.11 and later are CUDA 13 builds, which need a driver >= 580. The test resolves, with
pip against PyPI (``--dry-run --report``: nothing is downloaded but metadata), what the nodes install
(``cluster/setup_node.sh`` and ``cluster/Dockerfile``: this package with ``-c cluster/gpu-constraints.txt``)
and checks the CUDA major of the torch it gets against each launch file's driver in the table below.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from rllib_gaze.envs.maniskill import MIN_DRIVER, no_cuda_reason

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONSTRAINTS = os.path.join(ROOT, "cluster", "gpu-constraints.txt")

# Launch file -> what its GPU nodes run on, the lowest NVIDIA driver branch there, and where that is stated.
DRIVERS = {
    "gcp.yaml": ("common-cu129-ubuntu-2204-nvidia-580", 580,
                 "Google's Deep Learning VM family names carry the driver branch (nvidia-580)"),
    "aws.yaml": ("Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)", 580,
                 "AWS DLAMI release notes of the Base OSS Nvidia Driver GPU AMIs: 580.105.08 (2025-12), 595.91.07 "
                 "(2026-10)"),
    "kuberay-rayjob.yaml": ("GKE / EKS GPU nodes, driver of the Kubernetes cluster", 525,
                            "what docs/cluster.md asks of the nodes: the lowest driver branch of CUDA 12 (NVIDIA, "
                            "CUDA Compatibility: minor version compatibility)"),
}


def _pip_report(*requirements: str) -> dict:
    """``pip install --dry-run --report`` against PyPI alone, as a node with pip's defaults resolves: this
    machine's pip configuration (local wheel folders, a CPU torch among them) is left out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--disable-pip-version-check", "--index-url", "https://pypi.org/simple", "--report", "-",
                           *requirements], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _torch_cuda(report: dict) -> tuple[str, tuple[int, int] | None]:
    """The resolved torch's version and the CUDA (major, minor) its wheel is built for, read from the CUDA
    runtime it requires (``nvidia-cuda-runtime-cu12==12.8.90``; from 2.11 ``cuda-toolkit[...]==13.0.2``);
    None for a CPU build."""
    (torch,) = [p["metadata"] for p in report["install"] if p["metadata"]["name"] == "torch"]
    for requirement in torch.get("requires_dist", []):
        found = re.match(r"(?:nvidia-cuda-runtime-cu\d+|cuda-toolkit)\b[^=;]*==\s*(\d+)\.(\d+)", requirement)
        if found:
            return torch["version"], (int(found.group(1)), int(found.group(2)))
    return torch["version"], None


def _runs_on(cuda: tuple[int, int] | None, driver_branch: int) -> bool:
    return cuda is not None and MIN_DRIVER.get(cuda[0], 10**6) <= driver_branch


def test_every_launcher_installs_with_the_constraints_and_names_the_image_of_the_table():
    for installer in ("setup_node.sh", "Dockerfile"):
        text = open(os.path.join(ROOT, "cluster", installer)).read()
        installs = [line for line in text.splitlines() if re.search(r"pip\"? install .*-e ", line)]
        assert installs and all("-c " in line and "cluster/gpu-constraints.txt" in line for line in installs), installer
    gcp = yaml.safe_load(open(os.path.join(ROOT, "cluster", "gcp.yaml")))
    images = {t["node_config"]["disks"][0]["initializeParams"]["sourceImage"] for t in
              gcp["available_node_types"].values()}
    assert images == {f"projects/deeplearning-platform-release/global/images/family/{DRIVERS['gcp.yaml'][0]}"}
    assert DRIVERS["aws.yaml"][0] in open(os.path.join(ROOT, "cluster", "aws.yaml")).read()
    assert "cluster/Dockerfile" in open(os.path.join(ROOT, "cluster", "kuberay-rayjob.yaml")).read()
    assert re.search(r"^torch==\d+\.\d+\.\d+$", open(CONSTRAINTS).read(), re.M)


@pytest.mark.slow
def test_the_torch_the_nodes_resolve_runs_on_each_images_driver():
    report = _pip_report("-c", CONSTRAINTS, f"{ROOT}[aws,gcp]")  # what setup_node.sh aws|gcp and the Dockerfile get
    version, cuda = _torch_cuda(report)
    assert cuda is not None, f"torch {version} resolved without CUDA"
    for launcher, (image, branch, source) in DRIVERS.items():
        assert _runs_on(cuda, branch), (f"{launcher}: torch {version} is built for CUDA {cuda}, which needs driver >= "
                                        f"{MIN_DRIVER.get(cuda[0])}; {image} has {branch} ({source})")
    doc = " ".join(open(os.path.join(ROOT, "docs", "cluster.md")).read().split())
    assert f"torch {version}" in doc and f"CUDA {cuda[0]}.{cuda[1]}" in doc  # the pairing table says what resolves


@pytest.mark.slow
def test_without_the_pin_pypis_torch_is_a_cuda_13_build_that_the_kubernetes_nodes_could_not_run():
    # why the pin exists; torch 2.11.0 alone, no dependencies: seconds
    version, cuda = _torch_cuda(_pip_report("--no-deps", "torch==2.11.0"))
    assert cuda[0] == 13 and not _runs_on(cuda, DRIVERS["kuberay-rayjob.yaml"][1])


def test_a_gpu_node_whose_driver_cannot_run_torch_says_which_driver_and_which_build():
    reason = no_cuda_reason("550.90.07", "2.11.0", "13.0")
    assert "CUDA 13.0, which needs NVIDIA driver >= 580" in reason and "driver is 550.90.07" in reason
    assert "cluster/gpu-constraints.txt" in reason and "A new node of the same image fails the same way" in reason
    assert "CPU build" in no_cuda_reason("580.65.06", "2.10.0+cpu", None)
    assert "no NVIDIA driver is loaded" in no_cuda_reason(None, "2.10.0", "12.8")


def test_the_worker_set_up_check_fails_at_once_here_and_says_why():
    # the command the GPU workers run at set-up (cluster/*.yaml), on this machine without GPU or driver
    proc = subprocess.run([sys.executable, "-m", "rllib_gaze.envs.maniskill", "physx_cuda"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "needs a CUDA GPU and torch sees none" in proc.stderr
    import torch

    expected = "CPU build" if torch.version.cuda is None else "no NVIDIA driver is loaded"
    assert expected in proc.stderr
