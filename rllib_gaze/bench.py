"""Benchmarks: what the gaze and the contrastive loss cost next to plain PPO.

    python -m rllib_gaze.bench overhead [--device cpu|cuda] [--batch 3200] [--minibatch 800] ...
    python -m rllib_gaze.bench mining   [--device cpu|cuda] [--sizes 2048 8192 32768] ...
    python -m rllib_gaze.bench parts    [--device cpu|cuda] [--memory 8192] ...

``overhead`` times ``Learner.update`` of the real GazePPOLearner for the arms ``ppo`` (no
attention), ``gaze-rl`` (foveal, no contrastive loss) and ``gaze`` (the full method) on the same
batch, interleaved round by round so machine noise hits every arm alike, with the contrastive
memory already full (its steady state). ``mining`` times the exact neighbour search + triplet
selection against memories of growing size; ``parts`` times each step of the contrastive path
alone. They print figures; none asserts anything.
"""

from __future__ import annotations

import argparse
import statistics
import time

import gymnasium as gym
import numpy as np
import torch

from ray.rllib.core.columns import Columns
from ray.rllib.policy.sample_batch import SampleBatch
from ray.rllib.utils.torch_utils import convert_to_torch_tensor

from rllib_gaze.config import GazePPOConfig
from rllib_gaze.contrastive import FeatureReturnBuffer, attended_cosine, mine_triplets, triplet_margin_loss
from rllib_gaze.gaze import FovealGaze

ARMS = {"ppo": ("none", False), "gaze-rl": ("foveal", False), "gaze": ("foveal", True)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _synthetic_batch(n: int, image: int, state_dim: int, act_dim: int, seed: int, device: str) -> SampleBatch:
    """A post-GAE train batch of ppo_rgb's shape on ``device``: rgb uint8 (n, image, image, 3) + state (n, S)."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(0, 0.1, (n, act_dim)).astype(np.float32)
    log_std = np.full((n, act_dim), -0.5, np.float32)
    actions = (mean + np.exp(log_std) * rng.normal(size=(n, act_dim))).astype(np.float32)
    logp = (-0.5 * ((actions - mean) / np.exp(log_std)) ** 2 - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
    return SampleBatch(convert_to_torch_tensor({
        Columns.OBS: {"rgb": rng.integers(0, 256, (n, image, image, 3), dtype=np.uint8),
                      "state": rng.normal(size=(n, state_dim)).astype(np.float32)},
        Columns.ACTIONS: actions,
        Columns.ACTION_LOGP: logp.astype(np.float32),
        Columns.ACTION_DIST_INPUTS: np.concatenate([mean, log_std], -1),
        Columns.ADVANTAGES: rng.normal(size=n).astype(np.float32),
        Columns.VALUE_TARGETS: rng.normal(size=n).astype(np.float32),
        Columns.LOSS_MASK: np.ones(n, dtype=bool),
    }, device=device))


def overhead(args: argparse.Namespace) -> None:
    obs_space = gym.spaces.Dict({
        "rgb": gym.spaces.Box(0, 255, (args.image, args.image, 3), np.uint8),
        "state": gym.spaces.Box(-np.inf, np.inf, (args.state_dim,), np.float32),
    })
    act_space = gym.spaces.Box(-1, 1, (args.act_dim,), np.float32)
    batch = _synthetic_batch(args.batch, args.image, args.state_dim, args.act_dim, seed=0, device=args.device)
    learners = {}
    for arm, (attention, contrastive) in ARMS.items():
        config = (GazePPOConfig()
                  .environment(observation_space=obs_space, action_space=act_space)
                  .learners(num_gpus_per_learner=1 if args.device.startswith("cuda") else 0)
                  .training(train_batch_size_per_learner=args.batch, minibatch_size=args.minibatch,
                            num_epochs=args.epochs)
                  .gaze(attention=attention, contrastive=contrastive)
                  .debugging(seed=0))
        learners[arm] = config.build_learner()
    timesteps = {"num_env_steps_sampled_lifetime": args.batch}

    def update(arm: str) -> float:
        _sync(args.device)
        start = time.perf_counter()
        learners[arm].update(batch=batch.copy(), num_epochs=args.epochs, minibatch_size=args.minibatch,
                             timesteps=timesteps)
        _sync(args.device)
        return time.perf_counter() - start

    gaze_learner = learners["gaze"]
    while True:  # warm up every arm; fill the full method's memory to capacity
        for arm in ARMS:
            update(arm)
        buffer = gaze_learner._buffers["default_policy"]
        if len(buffer) == buffer.capacity:
            break
    times = {arm: [] for arm in ARMS}
    for round_ in range(args.repeats):
        for arm in ARMS:
            times[arm].append(update(arm))
        print(f"round {round_ + 1}/{args.repeats}: " + ", ".join(f"{a} {t[-1]:.3f}s" for a, t in times.items()),
              flush=True)
    base = statistics.median(times["ppo"])
    fmap = gaze_learner.module["default_policy"].feature_map_shape
    print(f"\nlearner update, {args.batch} rows x {args.epochs} epoch(s), minibatch {args.minibatch}, "
          f"rgb {args.image}x{args.image} + state {args.state_dim}, feature map {fmap}, "
          f"memory {len(buffer)} rows, device {args.device}, median of {args.repeats}:")
    for arm in ARMS:
        med = statistics.median(times[arm])
        paired = statistics.median(t / b for t, b in zip(times[arm], times["ppo"]))
        print(f"  {arm:8s} {med:8.3f} s   ratio of medians {med / base:.3f}   median of per-round ratios {paired:.3f}")


def mining(args: argparse.Namespace) -> None:
    gen = torch.Generator(device=args.device).manual_seed(0)
    shape = tuple(args.map)
    anchors = torch.rand(args.anchors, *shape, generator=gen, device=args.device)
    anchor_returns = torch.randn(args.anchors, generator=gen, device=args.device)
    print(f"mining: {args.anchors} anchors, feature map {shape}, k={args.k}, chunk {args.chunk}, "
          f"device {args.device}, median of {args.repeats}")
    for pool in args.pools:
        for size in args.sizes:
            buffer = FeatureReturnBuffer(size, shape, pool=pool, device=args.device)
            buffer.push(torch.rand(size, *shape, generator=gen, device=args.device),
                        torch.randn(size, generator=gen, device=args.device))
            times = []
            for _ in range(args.repeats + 1):
                _sync(args.device)
                start = time.perf_counter()
                triplets = mine_triplets(anchors, anchor_returns, buffer, k=args.k, threshold=0.0,
                                         chunk_size=args.chunk)
                _sync(args.device)
                times.append(time.perf_counter() - start)
            print(f"  pool {pool}, key dim {buffer.keys.shape[1]:5d}, memory {size:6d} rows: "
                  f"{1e3 * statistics.median(times[1:]):8.2f} ms ({triplets.anchor.numel()} triplets)", flush=True)


def parts(args: argparse.Namespace) -> None:
    """Time each step of the contrastive path alone, at the learner's shapes."""
    gen = torch.Generator(device=args.device).manual_seed(0)
    shape = tuple(args.map)
    gaze = FovealGaze(*shape).to(args.device)
    buffer = FeatureReturnBuffer(args.memory, shape, pool=args.pool, device=args.device)
    buffer.push(torch.rand(args.memory, *shape, generator=gen, device=args.device),
                torch.randn(args.memory, generator=gen, device=args.device))
    minibatch = torch.rand(args.minibatch, *shape, generator=gen, device=args.device)
    returns = torch.randn(args.minibatch, generator=gen, device=args.device)
    anchors, anchor_returns = minibatch[:args.anchors], returns[:args.anchors]
    triplets = mine_triplets(anchors, anchor_returns, buffer, k=args.k, threshold=0.0)
    bank = buffer.filled()[0]
    a, p, n = anchors[triplets.anchor], bank[triplets.positive], bank[triplets.negative]

    def loss_forward_backward():
        weights, _ = gaze.attention_map(torch.cat([a, p, n]))
        w_a, w_p, w_n = weights.split(a.shape[0])
        loss, _ = triplet_margin_loss(attended_cosine(a, p, w_a, w_p), attended_cosine(a, n, w_a, w_n), 0.2)
        loss.backward()

    steps = {
        "neighbour search + triplet selection": lambda: mine_triplets(anchors, anchor_returns, buffer, k=args.k,
                                                                      threshold=0.0),
        "gaze + triplet loss, forward and backward": loss_forward_backward,
        f"memory push of {args.minibatch} rows (once per iteration per {args.minibatch} rows)":
            lambda: buffer.push(minibatch, returns),
    }
    print(f"contrastive path per minibatch: {args.anchors} anchors ({triplets.anchor.numel()} triplets), memory "
          f"{args.memory} rows, map {shape}, pool {args.pool}, device {args.device}, median of {args.repeats}")
    for name, step in steps.items():
        times = []
        for _ in range(args.repeats + 1):
            _sync(args.device)
            start = time.perf_counter()
            step()
            _sync(args.device)
            times.append(time.perf_counter() - start)
        print(f"  {name:60s} {1e3 * statistics.median(times[1:]):8.2f} ms", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rllib_gaze.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"

    p = sub.add_parser("overhead", help="learner update time: gaze + contrastive vs plain PPO")
    p.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
    p.add_argument("--image", type=int, default=128)
    p.add_argument("--state-dim", type=int, default=25)
    p.add_argument("--act-dim", type=int, default=8)
    p.add_argument("--batch", type=int, default=3200, help="rows per update (ppo_rgb: 25600)")
    p.add_argument("--minibatch", type=int, default=800, help="ppo_rgb: 800")
    p.add_argument("--epochs", type=int, default=1, help="ppo_rgb: 4")
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=overhead)

    p = sub.add_parser("mining", help="neighbour search + triplet selection time vs memory size")
    p.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--pools", type=int, nargs="+", default=[1, 2])
    p.add_argument("--map", type=int, nargs=3, default=[64, 12, 12], metavar=("C", "H", "W"),
                   help="feature map shape (NatureCNN on 128px: 64 12 12)")
    p.add_argument("--anchors", type=int, default=128, help="GazePPOConfig default: 128")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.set_defaults(func=mining)

    parser.add_argument("--keep-denormals", action="store_true",
                        help="do not flush denormal floats to zero on CPU (slow denormal arithmetic then "
                             "adds noise that depends on each arm's weights, not on its work)")
    p = sub.add_parser("parts", help="each step of the contrastive path alone")
    p.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
    p.add_argument("--map", type=int, nargs=3, default=[64, 12, 12], metavar=("C", "H", "W"))
    p.add_argument("--memory", type=int, default=8192)
    p.add_argument("--pool", type=int, default=2)
    p.add_argument("--minibatch", type=int, default=800)
    p.add_argument("--anchors", type=int, default=128)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.set_defaults(func=parts)

    args = parser.parse_args(argv)
    if not args.keep_denormals:
        torch.set_flush_denormal(True)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    for name in ("batch", "minibatch", "epochs", "repeats", "anchors", "k", "chunk", "memory", "pool"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name}={getattr(args, name)}: must be >= 1")
    for name in ("sizes", "pools", "map"):
        if any(v < 1 for v in getattr(args, name, [1])):
            parser.error(f"--{name}={getattr(args, name)}: every value must be >= 1")
    args.func(args)


if __name__ == "__main__":
    main()
