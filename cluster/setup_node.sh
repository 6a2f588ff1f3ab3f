#!/usr/bin/env bash
# Set up one cluster node (Ubuntu/Debian with the NVIDIA driver, or CPU-only for the head):
# Vulkan loader + the NVIDIA Vulkan ICD for ManiSkill's renderer, a venv at ~/venv with this
# package (copied to ~/rllib-gaze by the cluster's file_mounts) and ~/venv/bin on the PATH of the
# shells Ray opens on the node (`ray down` runs a bare `ray stop`). Idempotent.
# Usage: setup_node.sh [PROVIDER]   PROVIDER (aws|gcp): also installs the cloud library the
#        autoscaler imports from ~/venv (boto3, google-api-python-client): without it the head
#        never launches a worker.
set -euo pipefail
REPO="${REPO:-$HOME/rllib-gaze}"
PROVIDER="${1:-}"
case "$PROVIDER" in aws|gcp|"") ;; *) echo "setup_node.sh: provider '$PROVIDER' unknown; allowed: aws, gcp" >&2; exit 2;; esac

# The Vulkan ICD files present in the given folders (none: the driver's ICD is not registered).
nvidia_icds() { local d; for d in "$@"; do ls "$d"/nvidia_icd*.json 2>/dev/null || true; done; }

has_nvidia_gpu() { lspci 2>/dev/null | grep -qi nvidia || [ -e /dev/nvidia0 ]; }

# Deep Learning VM images install the NVIDIA driver at first boot, after Ray may start set-up:
# wait for it (up to 10 minutes) on nodes that have an NVIDIA device.
wait_for_driver() {
  if has_nvidia_gpu; then
    for _ in $(seq 120); do nvidia-smi -L >/dev/null 2>&1 && return 0; sleep 5; done
    echo "setup_node.sh: the node has an NVIDIA GPU but nvidia-smi did not answer within 10 minutes" >&2
    return 1
  fi
}

main() {
  wait_for_driver
  if ! dpkg -s libvulkan1 python3-venv >/dev/null 2>&1; then
    # right after boot unattended-upgrades may hold apt's lock: wait for it instead of failing
    sudo apt-get -o DPkg::Lock::Timeout=600 update -y
    sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y libvulkan1 vulkan-tools python3-venv
  fi
  # The driver's Vulkan ICD is not always registered on cloud images (ManiSkill's docs say the same);
  # register it once, only where no folder has one.
  if command -v nvidia-smi >/dev/null 2>&1 && [ -z "$(nvidia_icds /usr/share/vulkan/icd.d /etc/vulkan/icd.d)" ]; then
    sudo mkdir -p /usr/share/vulkan/icd.d
    echo '{"file_format_version": "1.0.0", "ICD": {"library_path": "libGLX_nvidia.so.0", "api_version": "1.3.0"}}' \
      | sudo tee /usr/share/vulkan/icd.d/nvidia_icd.json >/dev/null
  fi
  [ -x "$HOME/venv/bin/python" ] || python3 -m venv "$HOME/venv"
  "$HOME/venv/bin/pip" install -q --upgrade pip
  # torch pinned to a CUDA build the node's driver runs (the file says why)
  "$HOME/venv/bin/pip" install -q -c "$REPO/cluster/gpu-constraints.txt" -e "$REPO${PROVIDER:+[$PROVIDER]}"
  # SAPIEN's PhysX GPU library, before Ray starts: an env runner never downloads it (two at once would race)
  if has_nvidia_gpu; then "$HOME/venv/bin/python" -m rllib_gaze.envs.physx_gpu fetch; fi
  grep -qs 'rllib-gaze: venv' "$HOME/.bashrc" || echo 'export PATH="$HOME/venv/bin:$PATH"  # rllib-gaze: venv' >> "$HOME/.bashrc"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then main; fi
