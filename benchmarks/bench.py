"""Benchmarks: what the gaze and the contrastive loss cost next to plain PPO.

    python benchmarks/bench.py overhead [--device cpu|cuda] [--batch 3200] [--minibatch 800] ...
    python benchmarks/bench.py profile  [--device cpu|cuda] [--batch 3200] [--minibatch 800] ...
    python benchmarks/bench.py sac-overhead [--device cpu|cuda] [--batch 512] [--updates 4] ...
    python benchmarks/bench.py mining   [--device cpu|cuda] [--sizes 2048 8192 32768] ...
    python benchmarks/bench.py parts    [--device cpu|cuda] [--memory 8192] [--arm gaze-first] ...
    python benchmarks/bench.py learner-split [--num-envs 512] [--fragment 50] [--image 128] ...
    python benchmarks/bench.py envs     [--num-envs 256] [--steps 10240] [--images 64 128] [--policy-steps 1024]
                                        [--compare-observations] [--clutter-device cpu|cuda] ...
    python benchmarks/bench.py evaluation [--num-envs 64] [--episodes 64] [--image 64] ...

``overhead`` times ``Learner.update`` of the real GazePPOLearner for the arms ``ppo`` (no
attention), ``gaze-rl`` (foveal, no contrastive loss) and ``gaze`` (the full method) on the same
batch, interleaved round by round so machine noise hits every arm alike, with the contrastive
memory already full (its steady state). ``sac-overhead`` does the same for the real GazeSACLearner
(arms ``sac``, ``gaze-rl`` on SAC and ``gaze-sac``) on the same replayed rows of the clutter env.
``profile`` counts, for one update of the same learners, the tensor operations dispatched and the
host syncs of each piece (PPO's forward, loss, backward and optimizer step; the gaze's metrics; the
contrastive path's staging, mining, neighbour search, similarity and loss, gradient norms, the gaze's
own optimizer step; the end of the update), per minibatch and per update, and times each piece.
With ``--neighbours per_minibatch per_update`` both run the ``gaze`` arm once per setting of
``mining_neighbours``, side by side (``gaze@per_update``: the first epoch's neighbours reused).
``mining`` times the exact neighbour search + triplet selection against memories of growing size;
``parts`` times each step of the contrastive path alone, with an arm's gaze and triplet loss.
``envs`` compares env-steps/s of a bare loop, RLlib's stock ``SingleAgentEnvRunner`` and our
``BatchedEnvRunner`` on the same envs, with and without the policy's forward pass (with
``--compare-observations`` the batched runner also with the bridge's numpy observations, its path
before issue 22, beside the env's torch ones); ``evaluation``
the two runners' ``sample(num_episodes=...)`` with the deterministic policy, as the suite evaluates. They print
figures; none asserts anything.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import gymnasium as gym
import numpy as np
import torch
from ray import tune
from ray.rllib.core.columns import Columns
from ray.rllib.policy.sample_batch import SampleBatch
from ray.rllib.utils.torch_utils import convert_to_torch_tensor

from rllib_gaze.arms import ARMS, SAC_ARMS
from rllib_gaze.config import GazePPOConfig
from rllib_gaze.contrastive import (
    NEIGHBOURS,
    FeatureReturnMemory,
    MinedRows,
    discounted_return_to_go,
    gaze_triplet_loss,
    mine_rows,
    mine_triplets,
)
from rllib_gaze.gaze import GAZE_DEFAULTS, build_gaze
from rllib_gaze.profiling import OpCounter

BENCH_ARMS = ("ppo", "gaze-rl", "gaze-first", "gaze")  # gaze-first: the objective before issue 11
# sac-overhead's arms: plain SAC, the gaze trained by the critic only, the full method.
SAC_BENCH_ARMS = {"sac": SAC_ARMS["sac"], "gaze-rl": ARMS["gaze-rl"], "gaze-sac": SAC_ARMS["gaze-sac"]}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _synthetic_batch(n: int, image: int, state_dim: int, act_dim: int, seed: int, device: str) -> SampleBatch:
    """A post-GAE train batch of ppo_rgb's shape on ``device``: rgb uint8 (n, image, image, 3) + state (n, S);
    no loss mask, as the learner connector builds it with ``values_from_sampling`` (GazePPOConfig's default)."""
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
    }, device=device))


def _with_neighbours(arms: tuple[str, ...], args: argparse.Namespace) -> tuple[str, ...]:
    """``arms`` with the ``gaze`` arm once per ``--neighbours`` value (``gaze@per_update``, ...), when given."""
    values = getattr(args, "neighbours", None)
    if not values:
        return arms
    return tuple(name for arm in arms for name in ([f"{arm}@{v}" for v in values] if arm == "gaze" else [arm]))


def _arm_settings(arm: str) -> dict:
    """``.gaze()`` settings of an arm name, ``arm@neighbours`` setting ``mining_neighbours`` too."""
    base, _, neighbours = arm.partition("@")
    return {**ARMS[base], **({"mining_neighbours": neighbours} if neighbours else {})}


def _ppo_learners(args: argparse.Namespace, arms) -> tuple[dict, SampleBatch]:
    """The real GazePPOLearner of each arm (``_arm_settings``) and one synthetic train batch, at
    ``args``' shapes."""
    obs_space = gym.spaces.Dict({
        "rgb": gym.spaces.Box(0, 255, (args.image, args.image, 3), np.uint8),
        "state": gym.spaces.Box(-np.inf, np.inf, (args.state_dim,), np.float32),
    })
    act_space = gym.spaces.Box(-1, 1, (args.act_dim,), np.float32)
    batch = _synthetic_batch(args.batch, args.image, args.state_dim, args.act_dim, seed=0, device=args.device)
    learners = {}
    for arm in arms:
        config = (GazePPOConfig()
                  .environment(observation_space=obs_space, action_space=act_space)
                  .learners(num_gpus_per_learner=1 if args.device.startswith("cuda") else 0)
                  .training(train_batch_size_per_learner=args.batch, minibatch_size=args.minibatch,
                            num_epochs=args.epochs)
                  .gaze(**_arm_settings(arm), contrastive_memory_capacity=args.memory)
                  .debugging(seed=0))
        learners[arm] = config.build_learner()
    return learners, batch


def overhead(args: argparse.Namespace) -> None:
    arms = _with_neighbours(BENCH_ARMS, args)
    learners, batch = _ppo_learners(args, arms)
    timesteps = {"num_env_steps_sampled_lifetime": args.batch}

    def update(arm: str, epochs: int = args.epochs) -> float:
        return _timed(args.device, lambda: learners[arm].update(
            batch=batch.copy(), num_epochs=epochs, minibatch_size=args.minibatch, timesteps=timesteps))

    gaze = next(arm for arm in arms if arm.startswith("gaze@")) if args.neighbours else "gaze"
    heading = (f"learner update, {args.batch} rows x {args.epochs} epoch(s), minibatch {args.minibatch}, "
               f"rgb {args.image}x{args.image} + state {args.state_dim}")
    # the memory takes each row once per update, whatever the epochs: fill it with one-epoch updates
    _compare(update, arms, "ppo", learners[gaze], args, heading, fill=lambda arm: update(arm, epochs=1))


def _timed(device: str, work) -> float:
    """Seconds ``work()`` takes, the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    work()
    _sync(device)
    return time.perf_counter() - start


def _compare(update, arms, baseline: str, gaze_learner, args: argparse.Namespace, heading: str,
             fill=None) -> None:
    """Times ``update(arm)`` per arm, the arms interleaved round by round (noise hits all alike),
    after warming every arm up with ``fill(arm)`` (default ``update``) until ``gaze_learner``'s
    contrastive memory is full (its steady state), and prints each arm's median and its ratios to
    ``baseline``'s."""
    memory = _fill_memory(fill or update, arms, gaze_learner)
    times = {arm: [] for arm in arms}
    for round_ in range(args.repeats):
        for arm in arms:
            times[arm].append(update(arm))
        print(f"round {round_ + 1}/{args.repeats}: " + ", ".join(f"{a} {t[-1]:.3f}s" for a, t in times.items()),
              flush=True)
    fmap = gaze_learner.module["default_policy"].feature_map_shape
    print(f"\n{heading}, feature map {fmap}, memory {len(memory)} rows, device {args.device}, "
          f"median of {args.repeats}:")
    base = statistics.median(times[baseline])
    for arm, arm_times in times.items():
        med = statistics.median(arm_times)
        paired = statistics.median(t / b for t, b in zip(arm_times, times[baseline]))
        print(f"  {arm:18s} {med:8.3f} s   ratio of medians {med / base:.3f}   median of per-round ratios {paired:.3f}")


def _fill_memory(update, arms, gaze_learner) -> FeatureReturnMemory:
    """Run ``update(arm)`` for every arm, round by round, until ``gaze_learner``'s contrastive
    memory is full (its steady state); returns that memory."""
    while True:
        for arm in arms:
            update(arm)
        memory = gaze_learner.contrastive_memory("default_policy")
        if len(memory) == memory.capacity:
            return memory


# What bench.py profile counts and times: (owner, attribute, section). Owners: "learner" (a method of
# the learner), "module" (of its MultiRLModule), "metrics" (its MetricsLogger), "gaze optimizer",
# or a module of ours whose function the learner calls by that name.
PROFILE_SECTIONS = (
    ("learner", "compute_loss_for_module", "PPO loss"),
    ("module", "forward_train", "forward"),
    ("learner", "_log_gaze_stats", "gaze metrics"),
    ("learner", "_contrastive_term", "contrastive: anchors"),
    ("learner", "_stage", "contrastive: staging"),
    ("rllib_gaze.contrastive_learner", "mine_rows", "contrastive: labels and selection"),
    ("rllib_gaze.contrastive_learner", "mine_triplets", "contrastive: labels and selection"),  # before issue 22
    ("rllib_gaze.contrastive", "nearest_neighbours", "contrastive: neighbour search"),
    ("learner", "_cached_neighbours", "contrastive: cached neighbours (per_update)"),
    ("rllib_gaze.contrastive_learner", "gaze_triplet_loss", "contrastive: similarity and loss"),
    ("rllib_gaze.contrastive_learner", "fixation_targets", "contrastive: fixation search"),
    ("learner", "_contrastive_loss", "contrastive: metrics"),
    ("learner", "_log_gaze_gradients", "gradient norms (first minibatch)"),
    ("learner", "compute_gradients", "backward"),
    ("learner", "apply_gradients", "optimizer step"),
    ("gaze optimizer", "step", "gaze optimizer step"),
    ("learner", "after_gradient_based_update", "after the update (memory push, metrics read)"),
    ("metrics", "reduce", "RLlib's metrics reduce"),
)


@contextlib.contextmanager
def _profiled(learner, counter: OpCounter):
    """Route the calls of ``PROFILE_SECTIONS`` through ``counter``'s sections while open."""
    import importlib

    owners = {"learner": learner, "module": learner.module, "metrics": learner.metrics,
              "gaze optimizer": dict(learner.get_optimizers_for_module("default_policy")).get("gaze")}
    undo = []
    for owner_name, attribute, section in PROFILE_SECTIONS:
        owner = owners[owner_name] if owner_name in owners else importlib.import_module(owner_name)
        if owner is None or not hasattr(owner, attribute):
            continue
        original = getattr(owner, attribute)

        def wrapped(*a, _original=original, _section=section, **kw):
            with counter.section(_section):
                return _original(*a, **kw)

        setattr(owner, attribute, wrapped)
        undo.append((owner, attribute, original, owner_name in owners))
    try:
        yield
    finally:
        for owner, attribute, original, instance in reversed(undo):
            if instance:
                delattr(owner, attribute)   # back to the class's method
            else:
                setattr(owner, attribute, original)


def profile(args: argparse.Namespace) -> None:
    """Op counts, host syncs and times of each piece of one learner update, per arm."""
    arms = _with_neighbours(("ppo", "gaze-rl", "gaze"), args)
    learners, batch = _ppo_learners(args, arms)
    timesteps = {"num_env_steps_sampled_lifetime": args.batch}

    def update(arm: str, epochs: int = args.epochs) -> None:
        learners[arm].update(batch=batch.copy(), num_epochs=epochs, minibatch_size=args.minibatch,
                             timesteps=timesteps)

    _fill_memory(lambda arm: update(arm, epochs=1), arms, learners[arms[-1]])   # one epoch fills it as well
    print(f"one learner update, {args.batch} rows x {args.epochs} epoch(s), minibatch {args.minibatch}, rgb "
          f"{args.image}x{args.image} + state {args.state_dim}, memory full, device {args.device}, torch threads "
          f"{torch.get_num_threads()}. ops: aten operations dispatched (forward and backward); syncs: host "
          f"syncs (rllib_gaze.profiling); times: median of {args.repeats} updates, nested pieces excluded", flush=True)
    for arm in arms:
        counted = OpCounter()
        with _profiled(learners[arm], counted), counted, counted.section("update"):
            update(arm)
        timed = []
        for _ in range(args.repeats):
            timer = OpCounter(synchronize=lambda: _sync(args.device))
            with _profiled(learners[arm], timer), timer.section("update"):
                update(arm)
            timed.append(timer)
        minibatches = counted.calls["PPO loss"]
        total_ops = sum(counted.ops.values())
        per_update = statistics.median(sum(t.seconds.values()) for t in timed)
        print(f"\n{arm}: {minibatches} minibatches, {total_ops / minibatches:.0f} ops per minibatch, "
              f"{counted.sync_count()} host syncs per update, update {per_update:.3f} s", flush=True)
        print(f"  {'piece':48s} {'calls':>5s} {'ops/minibatch':>13s} {'syncs/update':>12s} "
              f"{'ms/minibatch':>12s}  syncs by op")
        sections = ["update"] + [section for _, _, section in PROFILE_SECTIONS]
        for section in dict.fromkeys(sections):
            if not counted.calls[section]:
                continue
            ms = 1e3 * statistics.median(t.seconds[section] for t in timed) / minibatches
            syncs = counted.syncs.get(section, {})
            names = ", ".join(f"{name} {n}" for name, n in sorted(syncs.items(), key=lambda kv: -kv[1]))
            label = "rest of the update (RLlib's loop)" if section == "update" else section
            print(f"  {label:48s} {counted.calls[section]:5d} {counted.ops[section] / minibatches:13.0f} "
                  f"{sum(syncs.values()):12d} {ms:12.2f}  {names}", flush=True)
    _profile_return_to_go(args)


def _profile_return_to_go(args: argparse.Namespace) -> None:
    """Ops, host syncs and time of the return-to-go labels (``contrastive_return="return_to_go"``,
    once per update) over ``args.batch`` rows in chunks of 50 steps + the extra row."""
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(args.batch, generator=gen).to(args.device)
    mask = (torch.arange(args.batch) % 51 != 50).to(args.device)
    terminateds = (torch.rand(args.batch, generator=gen) < 0.01).to(args.device)
    bootstrap = torch.randn(args.batch, generator=gen).to(args.device)
    counted, timer = OpCounter(), OpCounter(synchronize=lambda: _sync(args.device))
    with counted, counted.section("rtg"):
        discounted_return_to_go(rewards, terminateds, mask, bootstrap, 0.95)
    with timer.section("rtg"):
        discounted_return_to_go(rewards, terminateds, mask, bootstrap, 0.95)
    print(f"\nreturn-to-go labels of {args.batch} rows (contrastive_return='return_to_go', once per update): "
          f"{counted.ops['rtg']} ops, {counted.sync_count()} host syncs, {1e3 * timer.seconds['rtg']:.2f} ms",
          flush=True)


def sac_overhead(args: argparse.Namespace) -> None:
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
    from ray.rllib.utils.replay_buffers.episode_replay_buffer import EpisodeReplayBuffer

    from rllib_gaze.sac_config import GazeSACConfig

    def config(arm: str) -> GazeSACConfig:
        return (GazeSACConfig()
                .environment("clutter", env_config={"image_size": args.image, "include_state": True, "seed": 0})
                .env_runners(gym_env_vectorize_mode="vector_entry_point")
                .learners(num_gpus_per_learner=1 if args.device.startswith("cuda") else 0)
                .training(train_batch_size_per_learner=args.batch)
                .gaze(**SAC_BENCH_ARMS[arm], contrastive_memory_capacity=args.memory)
                .debugging(seed=0))

    runner = SingleAgentEnvRunner(config=config("sac"))
    buffer = EpisodeReplayBuffer(capacity=args.steps)
    buffer.add(runner.sample(num_timesteps=args.steps, random_actions=True))
    learners = {arm: config(arm).build_learner(env=runner.env.unwrapped) for arm in SAC_BENCH_ARMS}
    timesteps = {"num_env_steps_sampled_lifetime": args.steps}
    draw = [0]

    def update(arm: str) -> float:
        """``args.updates`` gradient steps (sac_rgbd: 16 per 64 env steps), each on replayed rows
        that every arm gets alike (the buffer's generator reseeded per arm and draw)."""
        buffer.rng = np.random.default_rng(draw[0] // len(SAC_BENCH_ARMS))
        draw[0] += 1
        batches = [buffer.sample(num_items=args.batch, n_step=1, gamma=0.8, sample_episodes=True)
                   for _ in range(args.updates)]
        return _timed(args.device, lambda: [learners[arm].update(episodes=episodes, timesteps=timesteps)
                                             for episodes in batches])

    _compare(update, SAC_BENCH_ARMS, "sac", learners["gaze-sac"], args,
             f"SAC learner, {args.updates} update(s) of {args.batch} replayed rows, clutter rgb "
             f"{args.image}x{args.image} + state")


def mining(args: argparse.Namespace) -> None:
    gen = torch.Generator(device=args.device).manual_seed(0)
    shape = tuple(args.map)
    anchors = torch.rand(args.anchors, *shape, generator=gen, device=args.device)
    anchor_returns = torch.randn(args.anchors, generator=gen, device=args.device)
    print(f"mining: {args.anchors} anchors, feature map {shape}, k={args.k}, chunk {args.chunk}, "
          f"device {args.device}, median of {args.repeats}")
    for pool in args.pools:
        for size in args.sizes:
            memory = FeatureReturnMemory(size, shape, pool=pool, device=args.device)
            memory.push(torch.rand(size, *shape, generator=gen, device=args.device),
                        torch.randn(size, generator=gen, device=args.device))
            times = []
            for _ in range(args.repeats + 1):
                _sync(args.device)
                start = time.perf_counter()
                triplets = mine_triplets(anchors, anchor_returns, memory, k=args.k, threshold=0.0,
                                         chunk_size=args.chunk)
                _sync(args.device)
                times.append(time.perf_counter() - start)
            print(f"  pool {pool}, key dim {memory.keys.shape[1]:5d}, memory {size:6d} rows: "
                  f"{1e3 * statistics.median(times[1:]):8.2f} ms ({triplets.anchor.numel()} triplets)", flush=True)


def parts(args: argparse.Namespace) -> None:
    """Time each step of the contrastive path alone, at the learner's shapes, with the gaze and the
    triplet loss of ``args.arm``'s settings."""
    gen = torch.Generator(device=args.device).manual_seed(0)
    shape = tuple(args.map)
    config = GazePPOConfig().gaze(**ARMS[args.arm])
    gaze = build_gaze({key: getattr(config, key) for key in GAZE_DEFAULTS}, *shape).to(args.device)
    memory = FeatureReturnMemory(args.memory, shape, pool=args.pool, device=args.device)
    memory.push(torch.rand(args.memory, *shape, generator=gen, device=args.device),
                torch.randn(args.memory, generator=gen, device=args.device))
    minibatch = torch.rand(args.minibatch, *shape, generator=gen, device=args.device)
    returns = torch.randn(args.minibatch, generator=gen, device=args.device)
    anchors, anchor_returns = minibatch[:args.anchors], returns[:args.anchors]
    triplets = mine_triplets(anchors, anchor_returns, memory, k=args.k, threshold=0.0)
    bank = memory.filled()[0]
    a, p, n = anchors[triplets.anchor], bank[triplets.positive], bank[triplets.negative]
    mean_map = bank.mean(0)

    def loss_forward_backward():
        loss, *_ = gaze_triplet_loss(gaze.attention_map, a, p, n, similarity=config.contrastive_similarity,
                                     triplet_gaze=config.contrastive_triplet_gaze,
                                     margin=config.contrastive_margin, mean_map=mean_map)
        loss.backward()

    # mining_neighbours="per_update": a later epoch reads its anchors' rows of the update's cache
    rows = torch.randperm(args.minibatch, generator=gen, device=args.device)[:args.anchors]
    mined = mine_rows(anchors, anchor_returns, memory, k=args.k, threshold=0.0)
    cache = {name: getattr(mined, name).repeat(args.minibatch // args.anchors + 1)[:args.minibatch]
             for name in ("positive", "negative", "valid", "agrees", "has_neighbour")}
    searched = torch.ones(args.anchors, dtype=torch.bool, device=args.device)

    steps = {
        "neighbour search + triplet selection": lambda: mine_triplets(anchors, anchor_returns, memory, k=args.k,
                                                                      threshold=0.0),
        "the same, fixed-size (the learner's mine_rows)": lambda: mine_rows(anchors, anchor_returns, memory,
                                                                            k=args.k, threshold=0.0),
        "cached neighbours (mining_neighbours='per_update', later epochs)": lambda: MinedRows.of_rows(
            *(cache[name][rows] for name in ("positive", "negative", "valid")), searched,
            *(cache[name][rows] for name in ("agrees", "has_neighbour"))),
        "gaze + triplet loss, forward and backward": loss_forward_backward,
        f"memory push of {args.minibatch} rows (once per iteration per {args.minibatch} rows)":
            lambda: memory.push(minibatch, returns),
    }
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"contrastive path per minibatch, arm {args.arm} ({config.contrastive_similarity} similarity, "
          f"{config.contrastive_triplet_gaze} gaze): {args.anchors} anchors ({triplets.anchor.numel()} triplets), "
          f"memory {args.memory} rows, map {shape}, pool {args.pool}, device {args.device}, {args.clock} clock, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeats} (steps interleaved round by round)")
    times = {name: [] for name in steps}
    for _ in range(args.repeats + 1):
        for name, step in steps.items():
            _sync(args.device)
            start = clock()
            step()
            _sync(args.device)
            times[name].append(clock() - start)
    for name, taken in times.items():
        print(f"  {name:66s} {1e3 * statistics.median(taken[1:]):8.2f} ms", flush=True)


class ZeroCostEnv:
    """A batched env (ManiSkill API) whose step costs nothing: constant uint8 images + state."""

    def __init__(self, num_envs: int, image_size: int = 128, max_episode_steps: int = 50):
        self.num_envs, self.device, self.max_episode_steps = num_envs, torch.device("cpu"), max_episode_steps
        self.single_observation_space = gym.spaces.Dict({
            "rgb": gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8),
            "state": gym.spaces.Box(-np.inf, np.inf, (25,), np.float32)})
        self.single_action_space = gym.spaces.Box(-1, 1, (8,), np.float32)
        self._obs = {"rgb": torch.zeros(num_envs, image_size, image_size, 3, dtype=torch.uint8),
                     "state": torch.zeros(num_envs, 25)}
        self._elapsed = torch.zeros(num_envs, dtype=torch.long)

    def reset(self, *, seed=None, options=None):
        idx = (options or {}).get("env_idx")
        self._elapsed[slice(None) if idx is None else idx] = 0
        return self._obs, {}

    def step(self, actions):
        self._elapsed += 1
        truncated = self._elapsed >= self.max_episode_steps
        zeros = torch.zeros(self.num_envs, dtype=torch.bool)
        return self._obs, torch.zeros(self.num_envs), zeros, truncated, {"success": zeros}


def _register_zero_cost_env() -> str:
    """Registers ``ZeroCostEnv`` behind the bridge with Tune; returns its env name."""
    from rllib_gaze.envs import BatchedEnvBridge

    tune.register_env("bench_zero_cost",
                      lambda cfg: BatchedEnvBridge(ZeroCostEnv(cfg["num_envs"], image_size=cfg["image_size"])))
    return "bench_zero_cost"


def _flat(obs) -> list[tuple[str, np.ndarray]]:
    """An observation's arrays by key (``""`` for a single array)."""
    return list(obs.items()) if isinstance(obs, dict) else [("", obs)]


def _env_rates(runner, num_envs: int, steps: int, policy_steps: int, repeats: int,
               clock=time.perf_counter) -> dict[str, float]:
    """Median env-steps per second of ``clock`` of a bare loop over ``runner``'s own env, of the bare
    loop copying each observation into a ``(steps, N, ...)`` buffer (what any runner that keeps the
    observations must do at least), of ``runner.sample`` with random actions and (``policy_steps`` > 0)
    with the policy's exploration forward pass, alternating."""
    bare_env = runner.env.unwrapped   # the runner's own env: ManiSkill allows one GPU simulation per process
    for _ in range(2):   # warm up: first reset; the batched runner's two buffers fault in their pages once
        runner.sample(num_timesteps=steps, random_actions=True)

    rows = max(1, steps // num_envs)
    obs, _ = bare_env.reset()
    kept = {k: np.empty((rows, *np.shape(v)), np.asarray(v).dtype) for k, v in _flat(obs)}

    def bare(copy: bool = False) -> float:
        start = clock()
        for row in range(rows):
            obs = bare_env.step(bare_env.action_space.sample())[0]
            if copy:
                for k, v in _flat(obs):
                    kept[k][row] = v
        return rows * num_envs / (clock() - start)

    def sample(n: int, random_actions: bool) -> float:
        # One untimed vector step from a reset (the stock runner cannot continue an episode whose earlier
        # steps had other extra model outputs: random actions have none), then a timed fragment that
        # continues it, as fragments do in training: a reset per timed call would be a cost the bare
        # loop does not pay.
        runner.sample(num_timesteps=num_envs, random_actions=random_actions, force_reset=True)
        start = clock()
        episodes = runner.sample(num_timesteps=n, random_actions=random_actions)
        return sum(e.env_steps() for e in episodes) / (clock() - start)

    rates = {"bare": [], "copy": [], "random": [], "policy": []}
    for _ in range(repeats):
        rates["bare"].append(bare())
        rates["copy"].append(bare(copy=True))
        rates["random"].append(sample(steps, True))
        if policy_steps:
            rates["policy"].append(sample(policy_steps, False))
    return {k: statistics.median(v) for k, v in rates.items() if v}


def envs(args: argparse.Namespace) -> None:
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    from rllib_gaze.env_runner import BatchedEnvRunner

    if args.clutter_device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--clutter-device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    zero_cost = _register_zero_cost_env()
    cases = {}
    for image in args.images:
        cases[f"zero-cost, {image} px"] = (zero_cost, {"image_size": image}, args.num_envs, args.steps)
    for image in args.images:
        device = "" if args.clutter_device == "cpu" else f" on {args.clutter_device}"
        cases[f"clutter{device}, {image} px"] = (
            "clutter", {"image_size": image, "num_distractors": 6, "device": args.clutter_device}, args.num_envs,
            args.steps)
    if not args.skip_maniskill:
        cases[f"maniskill {args.maniskill_env} physx_cpu {args.images[0]} px"] = (
            "maniskill", {"env_id": args.maniskill_env, "camera_size": args.images[0], "sim_backend": "physx_cpu"},
            args.maniskill_envs, args.maniskill_steps)
        if torch.cuda.is_available():
            cases[f"maniskill {args.maniskill_env} physx_cuda {args.images[-1]} px"] = (
                "maniskill", {"env_id": args.maniskill_env, "camera_size": args.images[-1],
                              "sim_backend": "physx_cuda"}, args.gpu_envs, args.steps)
    # name: (runner, bridge options); "numpy": the batched runner reading the bridge's numpy observations
    runners = {"stock": (SingleAgentEnvRunner, {}), "batched": (BatchedEnvRunner, {})}
    if args.compare_observations:
        runners["numpy"] = (BatchedEnvRunner, {"torch_observations": False})
    print(f"env-steps per {'CPU second of this process' if args.clock == 'cpu' else 'second'}, median of "
          f"{args.repeats}, one process, torch threads {torch.get_num_threads()}: a bare loop "
          "over the bridged env; +copy: the same loop copying each observation into a (steps, N, ...) buffer, "
          "the least any runner that keeps the observations does; each runner's sample() with random actions "
          "(no policy) and with GazePPO's policy "
          f"(exploration forward on the whole batch, {args.policy_steps} env steps a call); bare and the runner "
          "alternate on the runner's own env, so runner/bare is measured in one window. policy share = the part of "
          "a sampled step's time that the policy adds.", flush=True)
    print(f"  {'env':34s} {'envs':>5s} {'bare':>10s} {'+copy':>8s} | {'stock':>8s} {'batched':>8s} "
          f"{'stock/bare':>10s} {'batch/bare':>10s} {'batch/copy':>10s} {'batch/stock':>11s} | {'stock+pi':>8s} "
          f"{'batch+pi':>8s} {'pi share st':>11s} {'pi share b':>10s}", flush=True)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for name, (env_name, env_config, num_envs, steps) in cases.items():
        measured = {}
        # With the GPU simulation the policy runs on the GPU too. RLlib puts a local runner's module on
        # the CPU whatever the config, so the runner is built as a remote one would be (worker index 1).
        gpu_policy = env_config.get("sim_backend") == "physx_cuda" or env_config.get("device") == "cuda"
        for runner_name, (cls, bridge) in runners.items():
            config = (GazePPOConfig().environment(env_name, env_config={**env_config, **bridge})
                      .env_runners(num_env_runners=0, num_envs_per_env_runner=num_envs,
                                   num_gpus_per_env_runner=1 if gpu_policy else 0,
                                   gym_env_vectorize_mode="vector_entry_point", env_runner_cls=cls))
            try:
                runner = cls(config=config, worker_index=1 if gpu_policy else 0)
                if gpu_policy:
                    print(f"  ({name}: {runner_name} runner's policy on {runner._device})", flush=True)
            except RuntimeError as error:  # e.g. physx_cuda without SAPIEN's PhysX GPU library
                print(f"  {name:34s} {num_envs:5d} unavailable here: {str(error)[:160]}", flush=True)
                break
            measured[runner_name] = _env_rates(runner, num_envs, steps, args.policy_steps, args.repeats, clock)
            runner.stop()
        if len(measured) < len(runners):
            continue
        st, ba = measured["stock"], measured["batched"]
        bare = statistics.median([st["bare"], ba["bare"]])
        copied = statistics.median([st["copy"], ba["copy"]])

        def share(rates: dict) -> str:
            if "policy" not in rates:
                return "-"
            return f"{1 - rates['policy'] / rates['random']:.2f}"

        print(f"  {name:34s} {num_envs:5d} {bare:10.0f} {copied:8.0f} | {st['random']:8.0f} {ba['random']:8.0f} "
              f"{st['random'] / st['bare']:10.3f} {ba['random'] / ba['bare']:10.3f} {ba['random'] / ba['copy']:10.3f} "
              f"{ba['random'] / st['random']:11.2f} | {st.get('policy', float('nan')):8.0f} "
              f"{ba.get('policy', float('nan')):8.0f} {share(st):>11s} {share(ba):>10s}", flush=True)
        if "numpy" in measured:
            npy = measured["numpy"]
            print(f"  {'':34s} {'':5s} batched with numpy observations: {npy['random']:8.0f} random, "
                  f"{npy.get('policy', float('nan')):8.0f} with the policy; torch/numpy "
                  f"{ba['random'] / npy['random']:.2f} random, "
                  f"{ba.get('policy', float('nan')) / npy.get('policy', float('nan')):.2f} with the policy", flush=True)


def evaluation(args: argparse.Namespace) -> None:
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    from rllib_gaze.env_runner import BatchedEnvRunner

    env_config = {"image_size": args.image, "num_distractors": 6}
    runners = {}
    for name, cls in (("stock", SingleAgentEnvRunner), ("batched", BatchedEnvRunner)):
        config = (GazePPOConfig().environment("clutter", env_config=env_config)
                  .env_runners(num_env_runners=0, num_envs_per_env_runner=args.num_envs, explore=False,
                               gym_env_vectorize_mode="vector_entry_point", env_runner_cls=cls))
        runners[name] = cls(config=config)
        runners[name].sample(num_episodes=args.num_envs, explore=False)   # warm up
    rates = {name: [] for name in runners}
    for _ in range(args.repeats):   # alternating, so machine noise hits both alike
        for name, runner in runners.items():
            start = time.perf_counter()
            episodes = runner.sample(num_episodes=args.episodes, explore=False)
            rates[name].append(sum(len(e) for e in episodes) / (time.perf_counter() - start))
    st, ba = (statistics.median(rates[name]) for name in ("stock", "batched"))
    print(f"clutter {args.image} px, {args.num_envs} sub-envs, sample(num_episodes={args.episodes}, explore=False) "
          f"with GazePPO's policy, torch threads {torch.get_num_threads()}, median of {args.repeats}: env steps of "
          f"the returned episodes per second: stock {st:.0f}, batched {ba:.0f}, batched/stock {ba / st:.2f}",
          flush=True)
    for runner in runners.values():
        runner.stop()


def learner_split(args: argparse.Namespace) -> None:
    """Time of the learner connector (GAE, batching) against the whole ``Learner.update`` (which runs
    it), GazePPO's defaults (the full method), on fragments of the zero-cost env; and the connector's
    parts: each piece of the pipeline, and inside GAE the critic's forward pass (over the batch with
    ``values_from_sampling=False``, over the chunks' last observations with the default)."""
    from ray.rllib.core import DEFAULT_MODULE_ID

    from rllib_gaze.env_runner import BatchedEnvRunner

    rows = args.num_envs * args.fragment
    config = (GazePPOConfig().environment(_register_zero_cost_env(), env_config={"image_size": args.image})
              .env_runners(num_env_runners=0, num_envs_per_env_runner=args.num_envs,
                           rollout_fragment_length=args.fragment, gym_env_vectorize_mode="vector_entry_point")
              .training(train_batch_size_per_learner=rows, minibatch_size=args.minibatch, num_epochs=args.epochs)
              .learners(num_gpus_per_learner=1 if args.device.startswith("cuda") else 0))
    runner = BatchedEnvRunner(config=config)
    learner = config.build_learner(env=runner.env.unwrapped)
    module = learner.module[DEFAULT_MODULE_ID]
    value_forward = [0.0]
    compute_values = module.compute_values

    def timed_compute_values(*a, **kw):
        _sync(args.device)
        start = time.perf_counter()
        out = compute_values(*a, **kw)
        _sync(args.device)
        value_forward[0] += time.perf_counter() - start
        return out

    module.compute_values = timed_compute_values
    print(f"{rows} rows of {args.image} px + state, {args.epochs} epochs of minibatches of {args.minibatch}, "
          f"torch threads {torch.get_num_threads()}, device {learner._device}", flush=True)
    for _ in range(args.repeats):
        episodes = runner.sample(num_timesteps=rows)   # the connector changes episodes: fresh ones each time
        value_forward[0], parts, batch, shared = 0.0, {}, {}, {}
        start = time.perf_counter()
        for piece in learner._learner_connector.connectors:   # what ConnectorPipelineV2.__call__ does, timed
            piece_start = time.perf_counter()
            batch = piece(rl_module=learner.module, batch=batch, episodes=episodes, shared_data=shared,
                          metrics=learner.metrics)
            _sync(args.device)
            parts[type(piece).__name__] = time.perf_counter() - piece_start
        connector = time.perf_counter() - start
        critic = value_forward[0]
        episodes = runner.sample(num_timesteps=rows)
        start = time.perf_counter()
        learner.update(episodes=episodes, timesteps={"num_env_steps_sampled_lifetime": rows})
        _sync(args.device)
        update = time.perf_counter() - start
        print(f"  learner connector {connector:7.2f} s   whole update (connector included) {update:7.2f} s   "
              f"connector share {connector / update:.2f}", flush=True)
        slow = ", ".join(f"{name} {t:.2f} s" for name, t in sorted(parts.items(), key=lambda p: -p[1]) if t >= 0.01)
        gae = sum(t for name, t in parts.items() if name in ("GeneralAdvantageEstimation", "SampledValuesGAE"))
        print(f"    of the connector: {slow}; the critic's forward pass inside GAE {critic:.2f} s (with "
              f"values_from_sampling only over the chunks' last observations), the rest of GAE {gae - critic:.2f} s",
              flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"

    def ppo_update_arguments(p: argparse.ArgumentParser) -> None:
        """The learner update's shapes (overhead, profile)."""
        p.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
        p.add_argument("--image", type=int, default=128)
        p.add_argument("--state-dim", type=int, default=25)
        p.add_argument("--act-dim", type=int, default=8)
        p.add_argument("--batch", type=int, default=3200, help="rows per update (ppo_rgb: 25600)")
        p.add_argument("--minibatch", type=int, default=800, help="ppo_rgb: 800")
        p.add_argument("--epochs", type=int, default=1, help="ppo_rgb: 4")
        p.add_argument("--memory", type=int, default=8192, help="contrastive memory rows (GazePPOConfig: 8192)")
        p.add_argument("--neighbours", nargs="+", choices=NEIGHBOURS,
                       help="the gaze arm once per mining_neighbours value (e.g. both, side by side); default: "
                            "GazePPOConfig's")

    p = sub.add_parser("overhead", help="learner update time: gaze + contrastive vs plain PPO")
    ppo_update_arguments(p)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=overhead)

    p = sub.add_parser("profile", help="op counts, host syncs and times of each piece of one learner update")
    ppo_update_arguments(p)
    p.add_argument("--repeats", type=int, default=1, help="timed updates per arm (after the counted one)")
    p.set_defaults(func=profile)

    p = sub.add_parser("sac-overhead", help="SAC learner update time: gaze + contrastive vs plain SAC")
    p.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
    p.add_argument("--image", type=int, default=64, help="clutter env image size (sac_rgbd's camera: 128)")
    p.add_argument("--batch", type=int, default=512, help="replayed rows per gradient step (sac_rgbd: 512)")
    p.add_argument("--updates", type=int, default=4, help="gradient steps timed per round (sac_rgbd: 16 per 64 "
                                                            "env steps)")
    p.add_argument("--steps", type=int, default=2048, help="env steps in the replay buffer (random actions)")
    p.add_argument("--memory", type=int, default=2048, help="contrastive memory rows (GazeSACConfig: 8192)")
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=sac_overhead)

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
    p = sub.add_parser("envs", help="env-steps/s through RLlib's env runner vs a bare loop")
    p.add_argument("--num-envs", type=int, default=256)
    p.add_argument("--steps", type=int, default=256 * 40, help="env steps per measurement")
    p.add_argument("--images", type=int, nargs="+", default=[64, 128],
                   help="image sizes of the zero-cost and clutter envs (ManiSkill CPU: the first, GPU: the last)")
    p.add_argument("--policy-steps", type=int, default=1024,
                   help="env steps per measurement with the policy's forward pass (0: leave the policy out)")
    p.add_argument("--skip-maniskill", action="store_true", help="leave out the ManiSkill rows")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="per wall-clock second, or per CPU second of this process (user + system: what one "
                        "core does, less sensitive to other processes on a loaded machine)")
    p.add_argument("--maniskill-env", default="PushCube-v1")
    p.add_argument("--maniskill-envs", type=int, default=2, help="CPU ManiSkill sub-envs (one object each)")
    p.add_argument("--maniskill-steps", type=int, default=120)
    p.add_argument("--gpu-envs", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compare-observations", action="store_true",
                   help="also the batched runner reading the bridge's numpy observations (torch_observations=False, "
                        "its path before issue 22), beside the env's torch ones (the default)")
    p.add_argument("--clutter-device", default="cpu", choices=["cpu", "cuda"],
                   help="where the clutter env simulates and renders (cuda: the policy runs on the GPU too)")
    p.set_defaults(func=envs)

    p = sub.add_parser("evaluation", help="evaluation by episodes: stock vs batched runner")
    p.add_argument("--num-envs", type=int, default=64)
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--image", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.set_defaults(func=evaluation)

    p = sub.add_parser("learner-split", help="learner connector (GAE, batching) time vs the whole update")
    p.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
    p.add_argument("--num-envs", type=int, default=512, help="ppo_rgb: 512")
    p.add_argument("--fragment", type=int, default=50, help="ppo_rgb: 50 (rows = num_envs x fragment)")
    p.add_argument("--image", type=int, default=128)
    p.add_argument("--minibatch", type=int, default=800, help="ppo_rgb: 800")
    p.add_argument("--epochs", type=int, default=4, help="ppo_rgb: 4")
    p.add_argument("--repeats", type=int, default=2)
    p.set_defaults(func=learner_split)

    p = sub.add_parser("parts", help="each step of the contrastive path alone")
    p.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
    p.add_argument("--arm", default="gaze-first", choices=[a for a, s in ARMS.items() if s.get("contrastive")],
                   help="whose gaze and triplet loss are timed (gaze-first: the path docs/benchmarks.md times)")
    p.add_argument("--map", type=int, nargs=3, default=[64, 12, 12], metavar=("C", "H", "W"))
    p.add_argument("--memory", type=int, default=8192)
    p.add_argument("--pool", type=int, default=2)
    p.add_argument("--minibatch", type=int, default=800)
    p.add_argument("--anchors", type=int, default=128)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall-clock time, or this process's CPU time (less sensitive to a loaded machine)")
    p.set_defaults(func=parts)

    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads={args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)
    if not args.keep_denormals:
        torch.set_flush_denormal(True)
    if getattr(args, "device", "cpu") == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    for name in ("batch", "minibatch", "epochs", "updates", "repeats", "anchors", "k", "chunk", "memory", "pool",
                 "num_envs", "steps", "image", "fragment", "maniskill_envs", "maniskill_steps", "gpu_envs",
                 "episodes"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name}={getattr(args, name)}: must be >= 1")
    if getattr(args, "policy_steps", 0) < 0:
        parser.error(f"--policy-steps={args.policy_steps}: must be >= 0")
    for name in ("sizes", "pools", "map", "images"):
        if any(v < 1 for v in getattr(args, name, [1])):
            parser.error(f"--{name}={getattr(args, name)}: every value must be >= 1")
    args.func(args)


if __name__ == "__main__":
    main()
