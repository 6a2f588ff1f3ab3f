#!/usr/bin/env bash
# The device checks as one prepared script for a lent GPU machine (issue 29), about 7 minutes in all:
# the GPU-only tests, the single-process loop against both RLlib paths at ppo_rgb's RGB shape, and the
# learner's overhead of the full method over plain PPO at ppo_rgb's update. Every step has its own time
# limit, so a hang costs that step only; logs and the card go under $OUT (the device tool brings it back).
#
#   run: bash benchmarks/gpu_checks.sh          (PYTHON=... where the packages are not in .venv;
#                                                docs/benchmarks.md "On a GPU" says how they were carried)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-checks}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
export RAY_AUTH_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"

step() {   # step NAME SECONDS COMMAND...: run it under a time limit, keep its log, show its tail
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%T), limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$?" >> "$OUT/$name.log"
  tail -n 20 "$OUT/$name.log"
}

step pytest-gpu 150 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider
# ppo_rgb's RGB runs: 256 envs x 50 steps, 128 px, 8 epochs of 8 minibatches
step loop-cuda 180 "$PYTHON" benchmarks/loop.py --device cuda --rollout both --num-envs 256 \
  --rollout-length 50 --image-size 128 --num-epochs 8 --num-minibatches 8 --iterations 4 --warmup 1
# ppo_rgb's update (25,600 rows, minibatch 800, 4 epochs), both neighbour settings of the gaze arm
step overhead-cuda 120 "$PYTHON" benchmarks/bench.py overhead --device cuda --batch 25600 --minibatch 800 \
  --epochs 4 --repeats 3 --neighbours per_minibatch per_update
