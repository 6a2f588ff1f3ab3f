#!/usr/bin/env bash
# Set up (idempotent) and run the main job: the comparison suite. On a machine without GPU that is
# the 'local' preset (every arm x 3 seeds on the diagnostic env, well under an hour on 2 cores);
# flags pass through, e.g. `bash scripts/run.sh --preset smoke`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"  # a local Ray without token files in ~/.ray
exec .venv/bin/python tune_configs/maniskill_suite.py "$@"
