"""Whole-loop speed: our RLlib path against a single-process torch PPO in ppo_rgb's design (issue 22).

    python benchmarks/loop.py [--device cpu|cuda] [--arm ppo|gaze] [--iterations 12] [--warmup 2]
                              [--num-envs 32] [--rollout-length 32] [--image-size 64] [--threads 1]
                              [--rollout episodes|device|both] ...
    python benchmarks/loop.py --device cuda --num-envs 256 --rollout-length 50 --image-size 128 \
                              --num-epochs 8 --num-minibatches 8       # ppo_rgb's tuned RGB shape

Two ways of training the clutter env on one device, side by side in one process:

- ``rllib``: what the suite runs. ``rllib_gaze.suite.trial_config`` of the task (``--task``, the
  ``clutter`` diagnostic by default) and arm, built into an Algorithm here; the env runners and GPU
  shares are the suite's ``local`` preset's on CPU (sampling in this process) and its ``paper``
  preset's with ``--device cuda`` (one env runner with a GPU share, the learner on the GPU). Timed:
  ``algo.train()``, which samples a batch (env -> numpy -> runner -> module, the value with the action
  -> episodes), runs the learner connector (GAE from the sampled values, the critic only over each
  chunk's last observation; with ``values_from_sampling=False`` RLlib's, the critic over the whole
  batch) and the PPO epochs, and syncs weights.
- ``rllib-device``: the same with ``.env_runners(rollout="device")`` (``--rollout device`` or ``both``;
  ``rllib_gaze.rollout``): sampling in this process (no remote env runner, on either device), the
  fragment handed to the learner as its buffers, GAE on them, minibatches by index.
- ``single``: a single-process PPO loop written here in ManiSkill ``ppo_rgb.py``'s design (which
  is CleanRL's): the env's tensors stay on the device, the rollout buffer is tensors, the value
  comes from the same forward pass as the action, GAE and the clipped PPO epochs run on those
  tensors. Its network is the same RLModule, built from the same config's RLModule spec, through
  its public API (``forward_train``, ``compute_values``, the action distribution class); its
  hyperparameters are read off the same config object (envs, rollout length, epochs, minibatch,
  lr, Adam eps, gamma, lambda, clip, entropy and vf coefficients, gradient clip).

The iterations alternate between the two (the order flipping each time, so machine noise and any
order effect hit both alike); the ``--warmup`` first of each are not timed. Evaluation is off on
the RLlib side and absent on the other: the figure is training throughput. Printed: each
iteration's seconds, loss and mean return of the episodes that ended in it (nan: none did) per
side, then env steps/s of each, their ratio, and each side's mean return over the first and the
last quarter of its iterations (does it learn).

What the single loop leaves out: the gaze's contrastive loss and its own optimizer (it is a
baseline, not the product). With ``--arm gaze`` it runs the arm's network (the gaze's forward pass
included) with PPO's loss only, so the ratio then also holds the contrastive path's cost; compare
``ppo`` with ``ppo`` for the loop alone. Like RLlib here (and unlike ppo_rgb) it has no target-KL
early stop; like ppo_rgb it standardises advantages per minibatch (RLlib: per batch).
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pstats
import statistics
import time
from collections import defaultdict

import numpy as np
import ray
import torch
import tree
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import Learner
from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, EPISODE_RETURN_MEAN, LEARNER_RESULTS
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME as ENV_STEPS

import rllib_gaze  # noqa: F401  (registers GazePPO and the envs)
from rllib_gaze.envs import CLUTTER, ClutterEnv
from rllib_gaze.suite import PRESETS, TASKS, trial_config

ARMS = ("ppo", "gaze")
CLUTTER_TASKS = tuple(name for name, task in TASKS.items() if task.env == CLUTTER)
# The suite's resources per device: sampling in the trial's process on CPU; one env runner with a
# GPU share and the learner on the GPU on a GPU machine.
DEVICE_PRESETS = {"cpu": "local", "cuda": "paper"}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _describe(module: torch.nn.Module) -> tuple[str, int]:
    return type(module).__name__, sum(p.numel() for p in module.parameters())


def build_config(args: argparse.Namespace):
    """The suite's GazePPO config of ``args.task`` and ``args.arm`` at the benchmark's sizes and device."""
    base = TASKS[args.task]
    task = dataclasses.replace(
        base, num_envs=args.num_envs, rollout_length=args.rollout_length,
        num_minibatches=args.num_minibatches or base.num_minibatches, num_epochs=args.num_epochs or base.num_epochs,
        env_config={**base.env_config, "image_size": args.image_size, "device": args.device})
    preset = PRESETS[DEVICE_PRESETS[args.device]]
    if args.env_runners is not None:
        preset = dataclasses.replace(preset, num_env_runners=args.env_runners)
    return trial_config(task, args.arm, args.seed, preset).evaluation(evaluation_interval=None,
                                                                      evaluation_num_env_runners=0)


class RLlibSide:
    """The suite's path: one ``algo.train()`` per iteration."""

    def __init__(self, config, device: str):
        self.name = "rllib-device" if config.rollout == "device" else "rllib"
        self.algo, self.device, self.steps = config.build_algo(), device, 0
        results = self.algo.learner_group.foreach_learner(lambda learner: _describe(learner.module[DEFAULT_MODULE_ID]))
        self.module = next(iter(results)).get()   # the (first) learner's training module

    def iteration(self) -> dict:
        _sync(self.device)
        start = time.perf_counter()
        result = self.algo.train()
        _sync(self.device)
        seconds = time.perf_counter() - start
        lifetime = int(result[ENV_RUNNER_RESULTS][ENV_STEPS])
        steps, self.steps = lifetime - self.steps, lifetime
        return {"steps": steps, "seconds": seconds,
                "loss": float(result[LEARNER_RESULTS][DEFAULT_MODULE_ID][Learner.TOTAL_LOSS_KEY]),
                "return": float(result[ENV_RUNNER_RESULTS].get(EPISODE_RETURN_MEAN, np.nan))}

    def stop(self) -> None:
        self.algo.stop()


class SingleProcessPPO:
    """ppo_rgb's loop (CleanRL style) around the config's RLModule, on one device, no Ray."""

    name = "single"

    def __init__(self, config, device: str, seed: int):
        torch.manual_seed(seed)
        self.config, self.device = config, torch.device(device)
        self.num_envs, self.num_steps = config.num_envs_per_env_runner, config.get_rollout_fragment_length()
        self.batch_size, self.minibatch_size = self.num_envs * self.num_steps, config.minibatch_size
        self.env = ClutterEnv(self.num_envs, **{**config.env_config, "device": device}, seed=seed)
        spaces = {DEFAULT_MODULE_ID: (self.env.single_observation_space, self.env.single_action_space)}
        self.agent = config.get_rl_module_spec(spaces=spaces, inference_only=False).build().to(self.device)
        self.module = _describe(self.agent)
        self.dist_cls = self.agent.get_train_action_dist_cls()
        self.optimizer = torch.optim.Adam(self.agent.parameters(), lr=config.lr, eps=config.adam_eps)

        # ALGO LOGIC: storage setup, (num_steps, num_envs, ...) tensors on the device
        self.next_obs, _ = self.env.reset(seed=seed)
        self.obs = tree.map_structure(
            lambda x: torch.zeros((self.num_steps, *x.shape), dtype=x.dtype, device=self.device), self.next_obs)
        act_dim = self.env.single_action_space.shape[0]
        self.actions = torch.zeros((self.num_steps, self.num_envs, act_dim), device=self.device)
        self.logprobs, self.rewards, self.values, self.final_values = (
            torch.zeros((self.num_steps, self.num_envs), device=self.device) for _ in range(4))
        self.dones = torch.zeros((self.num_steps, self.num_envs), dtype=torch.bool, device=self.device)
        self.episode_return = torch.zeros(self.num_envs, device=self.device)

    def _act(self, obs):
        """One forward pass: (action distribution, value) of a batch of observations."""
        out = self.agent.forward_train({Columns.OBS: obs})
        values = self.agent.compute_values({Columns.OBS: obs}, embeddings=out[Columns.EMBEDDINGS])
        return self.dist_cls.from_logits(out[Columns.ACTION_DIST_INPUTS]), values

    def iteration(self) -> dict:
        c = self.config
        _sync(self.device.type)
        start = time.perf_counter()
        finished_return = torch.zeros((), device=self.device)
        finished = torch.zeros((), device=self.device)
        for step in range(self.num_steps):
            tree.map_structure(lambda buf, x: buf.__setitem__(step, x), self.obs, self.next_obs)
            with torch.no_grad():
                dist, value = self._act(self.next_obs)
                action = dist.sample()
            self.actions[step], self.logprobs[step], self.values[step] = action, dist.logp(action), value
            self.next_obs, reward, terminated, truncated, _ = self.env.step(action)
            done = terminated | truncated
            self.rewards[step], self.dones[step] = reward, done
            self.episode_return += reward
            finished_return += (self.episode_return * done).sum()
            finished += done.sum()
            self.episode_return[done] = 0.0
            self.final_values[step] = 0.0
            if done.any():  # bootstrap every done from its final observation (bootstrap_at_done), then reset
                with torch.no_grad():
                    final_obs = tree.map_structure(lambda x: x[done], self.next_obs)
                    self.final_values[step, done] = self._act(final_obs)[1]
                self.next_obs, _ = self.env.reset(options={"env_idx": done.nonzero().squeeze(1)})

        # GAE, as ppo_rgb (its finite_horizon_gae=False)
        with torch.no_grad():
            next_values = torch.cat([self.values[1:], self._act(self.next_obs)[1][None]])
            next_values = torch.where(self.dones, self.final_values, next_values)
            advantages = torch.zeros_like(self.rewards)
            last = torch.zeros(self.num_envs, device=self.device)
            for t in reversed(range(self.num_steps)):
                delta = self.rewards[t] + c.gamma * next_values[t] - self.values[t]
                advantages[t] = last = delta + c.gamma * c.lambda_ * ~self.dones[t] * last
            returns = advantages + self.values

        # flatten the batch
        b_obs = tree.map_structure(lambda x: x.flatten(0, 1), self.obs)
        b_actions, b_logprobs = self.actions.flatten(0, 1), self.logprobs.flatten(0, 1)
        b_advantages, b_returns = advantages.flatten(), returns.flatten()

        # Optimizing the policy and value network
        for _ in range(c.num_epochs):
            order = torch.randperm(self.batch_size, device=self.device)
            for begin in range(0, self.batch_size, self.minibatch_size):
                idx = order[begin:begin + self.minibatch_size]
                dist, new_value = self._act(tree.map_structure(lambda x: x[idx], b_obs))
                ratio = (dist.logp(b_actions[idx]) - b_logprobs[idx]).exp()
                adv = b_advantages[idx]
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - c.clip_param, 1 + c.clip_param)).mean()
                v_loss = ((new_value - b_returns[idx]) ** 2).mean()   # RLlib's vf loss: no 0.5 (GazePPOConfig)
                loss = pg_loss - c.entropy_coeff * dist.entropy().mean() + c.vf_loss_coeff * v_loss
                self.optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.agent.parameters(), c.grad_clip)
                self.optimizer.step()
        _sync(self.device.type)
        seconds = time.perf_counter() - start
        return {"steps": self.batch_size, "seconds": seconds, "loss": float(loss.detach()),
                "return": float(finished_return / finished) if finished > 0 else float("nan")}

    def stop(self) -> None:
        pass


def run(args: argparse.Namespace) -> dict[str, dict]:
    """Trains both sides, alternating, and returns per side its module's ``(class, parameters)`` and
    its iterations' ``steps``, ``seconds``, ``loss`` and ``return`` (warm-up iterations included,
    flagged by ``timed``)."""
    config = build_config(args)
    own_ray = config.num_env_runners > 0 and not ray.is_initialized()
    if own_ray:
        ray.init(include_dashboard=False, log_to_driver=False)
    rllib = []
    if args.rollout in ("episodes", "both"):
        rllib.append(RLlibSide(config, args.device))
    if args.rollout in ("device", "both"):
        rllib.append(RLlibSide(config.copy().env_runners(num_env_runners=0, rollout="device"), args.device))
    sides = [*rllib, SingleProcessPPO(config, args.device, args.seed)]
    print(f"loop: task {args.task}, arm {args.arm}, device {args.device}, {config.num_envs_per_env_runner} envs x "
          f"{config.get_rollout_fragment_length()} steps x {max(1, config.num_env_runners)} runner(s), "
          f"{args.image_size} px, {config.num_epochs} epochs of minibatch {config.minibatch_size}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    if args.arm != "ppo":
        print(f"  single: the {args.arm} arm's network with PPO's loss only (no contrastive loss, no gaze optimizer)",
              flush=True)
    report = {side.name: {"module": side.module, "iterations": []} for side in sides}
    profiles = {side.name: cProfile.Profile() for side in sides} if args.profile else {}
    try:
        for i in range(args.warmup + args.iterations):
            for side in sides if i % 2 == 0 else sides[::-1]:
                profile = profiles.get(side.name) if i >= args.warmup else None
                if profile:
                    profile.enable()
                it = side.iteration() | {"timed": i >= args.warmup}
                if profile:
                    profile.disable()
                report[side.name]["iterations"].append(it)
                print(f"{'warm-up' if i < args.warmup else 'iteration'} {i + 1:3d}  {side.name:12s} {it['steps']:6d} "
                      f"steps {it['seconds']:7.2f} s  loss {it['loss']:8.4f}  return {it['return']:7.2f}", flush=True)
    finally:
        for side in sides:
            side.stop()
        if own_ray:
            ray.shutdown()
    _print_table(report, args.iterations)
    if profiles:
        _print_profiles(profiles, args.iterations, args.profile)
    return report


# Where a profiled function's own time goes, by the file it is in (first match wins); C functions
# (filename "~") by the name cProfile gives them.
_PLACES = (("torch", ("/torch/", "torch.", "torch._C")), ("env", ("/rllib_gaze/envs/",)),
           ("rllib_gaze", ("/rllib_gaze/",)), ("ray/rllib", ("/ray/",)), ("numpy", ("/numpy/", "numpy.")),
           ("tree", ("/tree/",)), ("benchmark", ("loop.py",)))


def _place(filename: str, function: str) -> str:
    where = function if filename == "~" else filename
    return next((place for place, marks in _PLACES if any(mark in where for mark in marks)), "python, other")


def _print_profiles(profiles: dict[str, cProfile.Profile], iterations: int, top: int) -> None:
    """Per side: the profiled ms per iteration by where the time is spent (cProfile's own time of each
    function, grouped by its file), then the ``top`` functions by cumulative time. cProfile slows
    Python-heavy code more than the torch kernels it calls: read shares and differences, not rates."""
    stats = {name: pstats.Stats(profile).stats for name, profile in profiles.items()}
    print(f"\ncProfile, ms per timed iteration (own time by place; {iterations} iteration(s) each side):")
    for name, functions in stats.items():
        own = defaultdict(float)
        for (filename, _, function), (_, _, tottime, _, _) in functions.items():
            own[_place(filename, function)] += tottime
        total = sum(own.values())
        ranked = sorted(own.items(), key=lambda kv: -kv[1])
        parts = ", ".join(f"{place} {1e3 * t / iterations:.0f}" for place, t in ranked)
        print(f"  {name:12s} {1e3 * total / iterations:7.0f}: {parts}")
    for name, functions in stats.items():
        print(f"\n{name}: the {top} functions of most cumulative time, ms per iteration")
        rows = sorted(functions.items(), key=lambda kv: -kv[1][3])[:top]
        for (filename, line, function), (_, calls, _, cumtime, _) in rows:
            where = function if filename == "~" else f"{'/'.join(filename.split('/')[-2:])}:{line} {function}"
            print(f"  {1e3 * cumtime / iterations:8.1f}  {calls / iterations:8.1f} calls  {where}")


def _mean(values: list[float]) -> float:
    """Mean of the non-nan values (nan if none)."""
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _print_table(report: dict[str, dict], iterations: int) -> None:
    rates, per_iteration = {}, {}
    print(f"\nenv steps/s over {iterations} timed iteration(s) each (warm-up excluded):")
    print(f"  {'side':12s} {'module':16s} {'params':>9s} {'env steps':>10s} {'seconds':>9s} {'steps/s':>9s}  "
          "return: first -> last quarter")
    for name, side in report.items():
        timed = [it for it in side["iterations"] if it["timed"]]
        steps, seconds = sum(it["steps"] for it in timed), sum(it["seconds"] for it in timed)
        rates[name], per_iteration[name] = steps / seconds, [it["steps"] / it["seconds"] for it in timed]
        returns = [it["return"] for it in side["iterations"]]
        quarter = max(1, len(returns) // 4)
        print(f"  {name:12s} {side['module'][0]:16s} {side['module'][1]:9d} {steps:10d} {seconds:9.2f} "
              f"{rates[name]:9.1f}  {_mean(returns[:quarter]):.2f} -> {_mean(returns[-quarter:]):.2f}")
    for name in report:
        if name != "single":
            paired = statistics.median(s / r for s, r in zip(per_iteration["single"], per_iteration[name]))
            print(f"  single / {name}: {rates['single'] / rates[name]:.2f} "
                  f"(median of per-iteration ratios {paired:.2f})")


def main(argv: list[str] | None = None) -> dict[str, dict]:
    base = TASKS["clutter"]
    parser = argparse.ArgumentParser(prog="python benchmarks/loop.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--arm", default="ppo", choices=ARMS)
    parser.add_argument("--task", default=base.name, choices=CLUTTER_TASKS)
    parser.add_argument("--iterations", type=int, default=12, help="timed iterations per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per side first")
    parser.add_argument("--num-envs", type=int, default=base.num_envs, help="ppo_rgb's RGB runs: 256")
    parser.add_argument("--rollout-length", type=int, default=base.rollout_length, help="ppo_rgb: 50 (PushCube: 20)")
    parser.add_argument("--image-size", type=int, default=base.env_config["image_size"], help="ppo_rgb's camera: 128")
    parser.add_argument("--num-minibatches", type=int, default=None, help="default: the task's (ppo_rgb's RGB runs: 8)")
    parser.add_argument("--num-epochs", type=int, default=None, help="default: the task's (ppo_rgb's RGB runs: 8)")
    parser.add_argument("--env-runners", type=int, default=None,
                        help="RLlib side's remote env runners (default: the suite preset's, 0 on cpu, 1 on cuda)")
    parser.add_argument("--rollout", default="episodes", choices=["episodes", "device", "both"],
                        help="RLlib side(s): episodes (default), rollout='device' (sampling in this process), or both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="also cProfile each side's timed iterations: own time by place and the TOP functions "
                             "by cumulative time (the profiler slows the Python-heavy side more)")
    args = parser.parse_args(argv)
    if args.profile < 0:
        parser.error(f"--profile={args.profile}: must be >= 0 (the number of functions listed; 0: no profile)")
    for name in ("iterations", "num_envs", "rollout_length", "num_minibatches", "num_epochs", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    if args.warmup < 0 or (args.env_runners or 0) < 0:
        parser.error("--warmup and --env-runners must be >= 0")
    if args.image_size < 36:
        parser.error(f"--image-size={args.image_size}: NatureCNN needs at least 36 px")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    return run(args)


if __name__ == "__main__":
    main()
