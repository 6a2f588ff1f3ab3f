#!/usr/bin/env bash
# Set up one cluster node (Ubuntu/Debian with the NVIDIA driver, or CPU-only for the head):
# Vulkan loader + the NVIDIA Vulkan ICD for ManiSkill's renderer, a venv at ~/venv with this
# package (copied to ~/rllib-gaze by the cluster's file_mounts). Idempotent.
set -euo pipefail
REPO="${REPO:-$HOME/rllib-gaze}"
if ! dpkg -s libvulkan1 python3-venv >/dev/null 2>&1; then
  sudo apt-get update -y
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y libvulkan1 vulkan-tools python3-venv
fi
# The driver's Vulkan ICD is not always registered on cloud images (ManiSkill's docs say the same).
if command -v nvidia-smi >/dev/null 2>&1 && ! ls /usr/share/vulkan/icd.d/nvidia_icd*.json /etc/vulkan/icd.d/nvidia_icd*.json >/dev/null 2>&1; then
  sudo mkdir -p /usr/share/vulkan/icd.d
  echo '{"file_format_version": "1.0.0", "ICD": {"library_path": "libGLX_nvidia.so.0", "api_version": "1.3.0"}}' \
    | sudo tee /usr/share/vulkan/icd.d/nvidia_icd.json >/dev/null
fi
[ -x "$HOME/venv/bin/python" ] || python3 -m venv "$HOME/venv"
"$HOME/venv/bin/pip" install -q --upgrade pip
"$HOME/venv/bin/pip" install -q -e "$REPO"
