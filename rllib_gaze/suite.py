"""The comparison suite: tasks, presets and the Tune grid of tasks x arms x seeds.

``tune_configs/maniskill_suite.py`` is the command; this module is what it runs, importable so the
tests (and users' own scripts) build exactly the same trials.

Every trial of a task shares one training shape (ppo_rgb's tuned command for that task where it
has one); the arms differ only in their ``rllib_gaze.ARMS`` settings. The
metric is ppo_rgb's: the success rate of a deterministic evaluation (``explore=False``, episodes
run to the time limit) every ``eval_interval`` iterations, ``evaluation/env_runners/success_once``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

from ray import tune

from rllib_gaze.arms import ABLATIONS, ALGORITHMS, ARMS, TARGET_ARMS, algorithm
from rllib_gaze.config import GazePPOConfig
from rllib_gaze.envs import CLUTTER, MANISKILL, evaluation_env_config
from rllib_gaze.results import STEPS, evaluation_success
from rllib_gaze.sac_config import GazeSACConfig


@dataclass(frozen=True)
class Task:
    """One env of the comparison and the training shape every arm uses on it.

    The batch per iteration is ``num_envs x rollout_length x num_env_runners`` env steps; a trial
    stops after ``budget`` env steps, rounded up to whole evaluation intervals so that the last
    iteration is evaluated.
    """

    name: str
    env: str
    env_config: dict
    budget: int                  # env steps per trial
    num_envs: int = 256          # sub-envs per env runner
    rollout_length: int = 50     # ppo_rgb's num_steps
    num_epochs: int = 8
    num_minibatches: int = 8
    gamma: float = 0.8
    eval_interval: int = 10      # iterations between evaluations
    eval_episodes: int = 16      # ppo_rgb's num_eval_envs: one episode per eval sub-env
    gaze: dict = field(default_factory=dict)  # .gaze() settings shared by every arm (memory size...)
    sac: dict = field(default_factory=dict)   # GazeSACConfig.training() settings of SAC trials on this task

    @property
    def exposes_target(self) -> bool:
        """Whether the env puts the target's true position in its observations (the oracle needs it)."""
        return bool(self.env_config.get("expose_target"))

    def batch_size(self, num_env_runners: int) -> int:
        return self.num_envs * self.rollout_length * max(1, num_env_runners)

    def iterations(self, num_env_runners: int) -> int:
        """Training iterations for ``budget``, rounded up to a multiple of ``eval_interval``."""
        raw = math.ceil(self.budget / self.batch_size(num_env_runners))
        return math.ceil(raw / self.eval_interval) * self.eval_interval


def _maniskill(env_id: str, budget: int, clutter: int = 0, **shape) -> Task:
    name = env_id + ("-Clutter" if clutter else "")
    # ppo_rgb's observation: the 128 px camera image and the proprioceptive state vector (include_state;
    # the suite's --no-state leaves the state out for a pixel-only comparison)
    return Task(name, MANISKILL, {"env_id": env_id, "camera_size": 128, "clutter": clutter, "include_state": True},
                budget, gaze={"gaze_image_interval": 50}, **shape)


# ppo_rgb's tuned RGB commands (examples/baselines/ppo/examples.sh): PushCube-v1 1M steps, 256 envs x
# 20 steps; PickCube-v1 10M; PushT-v1 25M, 100 steps, gamma 0.99. It has no RGB command for the
# others; their budgets are ours: PokeCube 3M and StackCube 25M (ppo_rgb's state-based commands),
# PullCube 2M (PushCube's sibling), LiftPegUpright 10M (PickCube-like). See docs/results.md.
_PAPER_SHAPES = {
    "PushCube-v1": dict(budget=1_000_000, rollout_length=20),
    "PickCube-v1": dict(budget=10_000_000),
    "PokeCube-v1": dict(budget=3_000_000, rollout_length=20),
    "PullCube-v1": dict(budget=2_000_000, rollout_length=20),
    "LiftPegUpright-v1": dict(budget=10_000_000),
    "PushT-v1": dict(budget=25_000_000, rollout_length=100, gamma=0.99),
    "StackCube-v1": dict(budget=25_000_000),
}
PAPER_CLUTTER = 8  # distractor objects in the cluttered variants

# The first diagnostic at laptop scale: 1024 env steps per iteration, 192 iterations, evaluated
# every 8. Its 64 px image gives a 4 x 4 map and the task needs two places at once (agent and
# target): kept as the honest negative result of docs/results.md.
DIAGNOSTIC = Task(
    "clutter", CLUTTER, {"image_size": 64, "num_distractors": 4, "expose_target": True}, budget=196_608,
    num_envs=32, rollout_length=32, num_epochs=4, num_minibatches=4, eval_interval=8, eval_episodes=32,
    gaze={"contrastive_num_anchors": 128, "contrastive_memory_capacity": 4096, "gaze_image_interval": 32},
)

# The diagnostic where one fovea is enough: 96 px (an 8 x 8 map), the agent's position in the
# state vector (as ManiSkill's rgb+state) and drawn in the image, one target among 16 drifting
# look-alike squares, and a closeness-only reward so a state's return is mostly where the agent is
# relative to the target. The policy needs the image only to tell where the target is.
FOVEA = Task(
    "fovea", CLUTTER, {"image_size": 96, "num_distractors": 16, "include_state": True, "reward": "closeness",
                       "expose_target": True},
    budget=98_304, num_envs=32, rollout_length=32, num_epochs=4, num_minibatches=4, eval_interval=8,
    eval_episodes=32,
    gaze={"contrastive_num_anchors": 128, "contrastive_memory_capacity": 4096, "gaze_image_interval": 32},
    # sac_rgbd's 128 replayed rows per env step cost ~7 h per 98k-step trial on CPU-2 (1.06 s per
    # 512-row update at 96 px): SAC trials here replay 4 rows per env step in batches of 128.
    sac={"train_batch_size_per_learner": 128, "training_intensity": 4},
)

# The control diagnostic (issue 21): `fovea` with the outcome visible at one place, the target's
# colour showing the agent's closeness, so a state's return can be read off the target alone (the
# mechanism bench's `moving` family) rather than only off the relation between agent and target.
SIGNAL = dataclasses.replace(FOVEA, name="signal", env_config={**FOVEA.env_config, "target_signal": True})

# The paper's kind of scene (issue 28): clutter placed once per episode and then still, as in
# ManiSkill's cluttered tables; `-centre` adds its layout, the task objects in a central workspace
# with the clutter around it, and `-corner` moves that workspace off the centre (the control for a
# central fovea).
_STILL = {"distractor_motion": "still"}
FOVEA_STILL = dataclasses.replace(FOVEA, name="fovea-still", env_config={**FOVEA.env_config, **_STILL})
CLUTTER_STILL = dataclasses.replace(DIAGNOSTIC, name="clutter-still", env_config={**DIAGNOSTIC.env_config, **_STILL})
FOVEA_CENTRE = dataclasses.replace(FOVEA, name="fovea-centre",
                                   env_config={**FOVEA_STILL.env_config, "workspace": "centre"})
FOVEA_CORNER = dataclasses.replace(FOVEA, name="fovea-corner",
                                   env_config={**FOVEA_STILL.env_config, "workspace": "corner"})

TASKS: dict[str, Task] = {task.name: task for task in (DIAGNOSTIC, FOVEA, SIGNAL, FOVEA_STILL, CLUTTER_STILL,
                                                       FOVEA_CENTRE, FOVEA_CORNER)}
for _env_id, _shape in _PAPER_SHAPES.items():
    for _clutter in (0, PAPER_CLUTTER):
        _task = _maniskill(_env_id, clutter=_clutter, **_shape)
        TASKS[_task.name] = _task


@dataclass(frozen=True)
class Preset:
    """A named selection of tasks, arms and seeds with the resources each trial asks for."""

    description: str
    tasks: tuple[Task, ...]
    arms: tuple[str, ...] = ("ppo", "gaze", "gaze-rl", "patch")
    seeds: tuple[int, ...] = (0, 1, 2)
    num_env_runners: int = 0          # 0: sample in the trial's own process (CPU presets)
    num_gpus_per_env_runner: float = 0.0
    num_gpus_per_learner: float = 0.0
    sac_tasks: tuple[Task, ...] = ()  # tasks on which the SAC arms also run (an experiment of their own)


_SMOKE_CLUTTER = dataclasses.replace(
    DIAGNOSTIC, budget=3 * 256, num_envs=16, rollout_length=16, num_epochs=1, num_minibatches=2, eval_interval=1,
    eval_episodes=4, gaze={"contrastive_num_anchors": 32, "contrastive_memory_capacity": 512},  # no gaze images
    # SAC learns from the second iteration on, 32 updates of 64 rows per iteration
    sac={"num_steps_sampled_before_learning_starts": 256, "train_batch_size_per_learner": 64, "training_intensity": 8},
)
# The tasks of ManiSkill's SAC baselines (examples/baselines/sac: PushCube-v1, PickCube-v1) and their
# cluttered variants: the paper preset's SAC experiment.
SAC_PAPER_TASKS = ("PushCube-v1", "PickCube-v1")

PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        "CPU, a few minutes: every arm on tiny versions of the diagnostic env and ManiSkill PushCube-v1, and "
        "plain SAC and GazeSAC on the diagnostic",
        tasks=(
            _SMOKE_CLUTTER,
            Task("PushCube-v1", MANISKILL, {"env_id": "PushCube-v1", "camera_size": 64, "sim_backend": "physx_cpu"},
                 budget=2 * 32, num_envs=2, rollout_length=16, num_epochs=1, num_minibatches=2,
                 eval_interval=1, eval_episodes=2,
                 gaze={"contrastive_num_anchors": 16, "contrastive_memory_capacity": 64}),
        ),
        seeds=(0,), sac_tasks=(_SMOKE_CLUTTER,),
    ),
    "local": Preset(
        "one machine without GPU, about an hour: the sample-efficiency study on the fovea diagnostic",
        tasks=(FOVEA,), arms=("ppo", "gaze", "gaze-rl", "oracle"),
    ),
    "evidence": Preset(
        "one machine without GPU, about 80 minutes: the fovea diagnostic with 5 seeds (intervals on the ratios)",
        tasks=(FOVEA,), arms=("ppo", "gaze", "oracle"), seeds=(0, 1, 2, 3, 4),
    ),
    "ablation": Preset(
        "one machine without GPU, about an hour: each change to the objective undone in turn, on the fovea "
        "diagnostic at half its budget",
        tasks=(dataclasses.replace(FOVEA, budget=49_152),), arms=("gaze", *ABLATIONS, "gaze-rl", "oracle", "ppo"),
        seeds=(0,),
    ),
    "paper": Preset(
        "GPU cluster: 7 ManiSkill tasks and their cluttered variants, ppo_rgb's step budgets, 3 seeds",
        tasks=tuple(task for task in TASKS.values() if task.env == MANISKILL),
        num_env_runners=1, num_gpus_per_env_runner=0.25, num_gpus_per_learner=0.5,
        sac_tasks=tuple(task for task in TASKS.values() if task.env_config.get("env_id") in SAC_PAPER_TASKS),
    ),
}


def pick_preset(cluster_gpus: float) -> tuple[str, str]:
    """The preset for a run without ``--preset`` and the reason, from the Ray cluster's GPUs."""
    if cluster_gpus > 0:
        return "paper", f"the Ray cluster has {cluster_gpus:g} GPU(s)"
    return "local", ("the Ray cluster has no GPU (an autoscaling cluster whose GPU workers are not up yet "
                     "looks the same: pass --preset paper there)")


# The Tune trainable of each algorithm (registered by ``import rllib_gaze``).
TRAINABLES = {"ppo": "GazePPO", "sac": "GazeSAC"}
# The arms a preset runs with ``--algo sac`` (its ``arms`` are PPO's).
SAC_PRESET_ARMS = ("sac", "gaze-sac")   # plain SAC and the paper's method; the others by --arms


def experiment_algorithm(arms) -> str:
    """The one algorithm of ``arms`` (a Tune experiment runs one trainable), or ValueError."""
    algorithms = {algorithm(arm) for arm in arms}
    if len(algorithms) != 1:
        raise ValueError(f"arms {list(arms)} mix algorithms {sorted(algorithms)}: one experiment runs one algorithm "
                         f"(its arms: {ALGORITHMS})")
    return algorithms.pop()


def trial_config(task: Task, arm: str, seed: int, preset: Preset) -> GazePPOConfig | GazeSACConfig:
    """The full config of one trial: GazePPO, or GazeSAC for the SAC arms. Arms differ only in their
    ``ARMS`` settings, which take precedence over the task's ``gaze`` settings.

    A SAC trial keeps sac_rgbd's sampling and update shape (``GazeSACConfig``'s defaults: 16 envs x
    4 steps per gradient round) and takes the task's env, gamma, evaluation and budget; one of its
    iterations samples the env steps of one PPO iteration on the task, so both count the budget and
    the evaluation points alike."""
    if arm in TARGET_ARMS and not task.exposes_target:
        raise ValueError(f"arm {arm!r} reads the target's true position, which task {task.name!r} does not expose "
                         f"(tasks that do: {[t.name for t in TASKS.values() if t.exposes_target]}, "
                         "with env_config expose_target=True)")
    runners = preset.num_env_runners
    batch = task.batch_size(runners)
    env_config = dict(task.env_config)
    if task.env == MANISKILL and runners == 0:
        # training and evaluation envs then share the trial's process: one GPU simulation per
        # process is all ManiSkill allows, so both simulate on the CPU
        env_config["sim_backend"] = "physx_cpu"
    sac = algorithm(arm) == "sac"
    config = (
        (GazeSACConfig() if sac else GazePPOConfig())
        .environment(task.env, env_config=env_config)
        .env_runners(num_env_runners=runners, num_gpus_per_env_runner=preset.num_gpus_per_env_runner,
                     gym_env_vectorize_mode="vector_entry_point")
        .learners(num_learners=0, num_gpus_per_learner=preset.num_gpus_per_learner)
        .training(gamma=task.gamma)
        .evaluation(evaluation_interval=task.eval_interval, evaluation_duration=task.eval_episodes,
                    evaluation_duration_unit="episodes",
                    # ManiSkill's GPU simulation allows one per process: evaluate in its own runner.
                    evaluation_num_env_runners=1 if runners else 0,
                    evaluation_config={"explore": False, "num_envs_per_env_runner": task.eval_episodes,
                                       "env_config": evaluation_env_config(task.env, env_config)})
        .fault_tolerance(restart_failed_env_runners=True)
        .gaze(**task.gaze)
        .gaze(**ARMS[arm])
        .debugging(seed=seed)
        .update_from_dict({"task": task.name, "arm": arm, "suite_iterations": task.iterations(runners)})
    )
    if sac:  # an iteration: sac_rgbd's training rounds until one PPO iteration's env steps are sampled
        return (config.training(**task.sac)
                .reporting(min_time_s_per_iteration=0, min_sample_timesteps_per_iteration=batch))
    return (config
            .env_runners(num_envs_per_env_runner=task.num_envs, rollout_fragment_length=task.rollout_length)
            .training(train_batch_size_per_learner=batch, minibatch_size=batch // task.num_minibatches,
                      num_epochs=task.num_epochs))


def param_space(preset: Preset) -> dict[str, Any]:
    """Tune's param space for ``preset``: a grid over task x arm x seed. Settings that differ
    between trials are looked up from the trial's task and arm, so one experiment holds every trial.
    The arms must be of one algorithm (``experiment_algorithm``), whose trainable runs them all."""
    experiment_algorithm(preset.arms)
    per_trial = {(t.name, arm): trial_config(t, arm, preset.seeds[0], preset).to_dict()
                 for t in preset.tasks for arm in preset.arms}
    space = dict(next(iter(per_trial.values())))
    for key in space:
        if any(cfg.get(key) != space[key] for cfg in per_trial.values()):
            space[key] = tune.sample_from(
                lambda config, key=key: per_trial[(config["task"], config["arm"])][key])
    space["task"] = tune.grid_search([t.name for t in preset.tasks])
    space["arm"] = tune.grid_search(list(preset.arms))
    space["seed"] = tune.grid_search(list(preset.seeds))
    return space


def trial_label(config: dict) -> str:
    """``task/arm/seed`` of a trial's config: its Tune name and directory."""
    return f"{config['task']}_{config['arm']}_seed{config['seed']}"


class BudgetStop(tune.Stopper):
    """Stops each trial after its task's iterations (``suite_iterations`` in its config)."""

    def __call__(self, trial_id: str, result: dict) -> bool:
        return result["training_iteration"] >= result["config"]["suite_iterations"]

    def stop_all(self) -> bool:
        return False


class SuiteProgress(tune.Callback):
    """Prints one progress line at most every ``every_s`` seconds (and at each evaluation): env
    steps done out of the whole experiment's, trials finished, the latest evaluation, and an ETA.
    Counts come from Tune's trials, so a resumed experiment's finished trials count too."""

    def __init__(self, total_steps: int, num_trials: int, every_s: float = 30.0):
        self.total_steps, self.num_trials, self.every_s = total_steps, num_trials, every_s
        self._last_print = -math.inf
        self._t0: float | None = None  # time and steps at the first result: a resumed run starts part-way
        self._steps0 = 0

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        success = evaluation_success(result, result["config"]["evaluation_interval"])
        now = time.monotonic()
        steps = int(result.get(STEPS, 0))
        done = steps + sum(int((t.last_result or {}).get(STEPS, 0)) for t in trials if t is not trial)
        if self._t0 is None:
            self._t0, self._steps0 = now, done
        if success is None and now - self._last_print < self.every_s:
            return
        self._last_print = now
        rate = (done - self._steps0) / max(now - self._t0, 1e-9)
        eta = (self.total_steps - done) / rate if rate > 0 else math.inf
        finished = sum(t.status == "TERMINATED" for t in trials)
        latest = (f"{trial_label(result['config'])} eval success {success:.2f} at {steps:,} steps"
                  if success is not None else f"{trial_label(result['config'])} at {steps:,} steps")
        print(f"[suite] {done:,}/{self.total_steps:,} env steps ({100 * done / self.total_steps:.0f}%), "
              f"{finished}/{self.num_trials} trials done, ETA {_duration(eta)} | {latest}", flush=True)

    def on_experiment_end(self, trials, **info) -> None:
        failed = sum(t.status == "ERROR" for t in trials)
        print(f"[suite] finished: {sum(t.status == 'TERMINATED' for t in trials)}/{len(trials)} trials done"
              + (f", {failed} failed" if failed else ""), flush=True)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


def planned_steps(preset: Preset) -> int:
    """Env steps the whole preset trains for (every task x arm x seed)."""
    runners = preset.num_env_runners
    per_seed_arm = sum(t.iterations(runners) * t.batch_size(runners) for t in preset.tasks)
    return per_seed_arm * len(preset.arms) * len(preset.seeds)
