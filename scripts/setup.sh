#!/usr/bin/env bash
# Idempotent set-up: system packages (software Vulkan where there is no NVIDIA GPU), a virtual
# environment in .venv, a CPU torch build where there is no GPU, and this package with its extras.
# Usage: scripts/setup.sh            (re-running it only checks what is already there)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RLLIB_GAZE_VENV:-.venv}
PY=${PYTHON:-python3}

have_nvidia() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  echo "setup: need root for: $*" >&2; return 1; fi; }

# --- system packages --------------------------------------------------------------------------
# ManiSkill renders camera frames through Vulkan. With no GPU, SAPIEN needs Mesa >= 24.3 lavapipe;
# Debian 12's own Mesa 22.3 fails with ErrorIncompatibleDriver, so take it from bookworm-backports.
mesa_ok() {
  local v
  v=$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null || true)
  [ -n "$v" ] && dpkg --compare-versions "$v" ge 24.3 && dpkg -s libvulkan1 >/dev/null 2>&1
}
if command -v apt-get >/dev/null 2>&1; then
  if have_nvidia; then
    dpkg -s libvulkan1 >/dev/null 2>&1 || { as_root apt-get update -qq && as_root apt-get install -y -qq libvulkan1; }
  elif ! mesa_ok; then
    . /etc/os-release
    if [ "${VERSION_CODENAME:-}" = bookworm ] && ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
      # Same mirror and keyring as the machine's own Debian sources.
      mirror=$(awk '/^URIs:/ && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
      [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
      if [ -z "$mirror" ]; then
        echo "setup: cannot find this machine's Debian mirror; add bookworm-backports to apt's sources yourself" >&2
        exit 1
      fi
      echo "setup: adding bookworm-backports ($mirror) for Mesa >= 24.3 (software Vulkan)"
      printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$mirror" \
        | as_root tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null
    fi
    as_root apt-get update -qq
    if [ "${VERSION_CODENAME:-}" = bookworm ]; then
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers libvulkan1
    else
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers libvulkan1
    fi
  fi
else
  echo "setup: no apt-get; install libvulkan1 and a Vulkan driver (Mesa >= 24.3 lavapipe or NVIDIA) yourself" >&2
fi

# --- Python -----------------------------------------------------------------------------------
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
stamp="$VENV/.rllib_gaze_installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VPY" -m pip install -q --upgrade pip
  if ! have_nvidia && ! "$VPY" -c "import torch" 2>/dev/null; then
    # On these machines torch 2.13.0 is a CPU wheel on local disk; elsewhere PyPI's default build.
    "$VPY" -m pip install -q "torch==2.13.0" 2>/dev/null || "$VPY" -m pip install -q torch
  fi
  "$VPY" -m pip install -q -e ".[dev]" 2> >(grep -v "is ignored: it is neither" >&2)
  touch "$stamp"
fi
echo "setup: ready ($("$VPY" -c 'import ray, torch, mani_skill; print(f"ray {ray.__version__}, torch {torch.__version__}, mani_skill {mani_skill.__version__}")'))"
