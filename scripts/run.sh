#!/usr/bin/env bash
# Set up (idempotent) and run the main job on its small default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python tune_configs/quickstart.py "$@"
