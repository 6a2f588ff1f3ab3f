#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. GPU-only tests skip when CUDA is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check --quiet .   # lint: the tree stays clean
exec .venv/bin/python -m pytest -q "$@"
