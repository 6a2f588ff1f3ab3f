"""The comparison suite: plain PPO vs GazePPO arms, tasks x arms x seeds, as one Tune experiment.

    python tune_configs/maniskill_suite.py [--preset smoke|local|paper] [flags]   (or python -m rllib_gaze.cli)
    ray job submit -- python tune_configs/maniskill_suite.py [flags]
    python tune_configs/maniskill_suite.py --preset paper --plan [--plan-cluster 4xL4]   (what it would cost)

Starts a local Ray, or joins the cluster it runs in (``ray job submit``). Without ``--preset`` it
runs ``paper`` when that cluster has GPUs and ``local`` otherwise, and says which and why. Every
flag value is checked before anything starts. Results, checkpoints and TensorBoard files go to
``<storage-path>/<name>``; the report (success curves as PNG, a Markdown table of sample
efficiency against ppo) is written there at the end, and ``--resume`` continues an interrupted
experiment where its trials' last checkpoints left off.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import logging
import os
import pickle
import sys
import time

from rllib_gaze import GazePPOConfig
from rllib_gaze.arms import ALGORITHMS, ARMS, TARGET_ARMS, algorithm
from rllib_gaze.plan import NODE_KINDS, cluster_nodes, parse_cluster, plan_lines
from rllib_gaze.results import trial_params
from rllib_gaze.suite import (
    PRESETS,
    SAC_PRESET_ARMS,
    TASKS,
    TRAINABLES,
    BudgetStop,
    Preset,
    SuiteProgress,
    experiment_algorithm,
    param_space,
    pick_preset,
    planned_steps,
    trial_config,
    trial_label,
)

EXPERIMENT_STATE = "tuner.pkl"
# The experiment's resolved Preset, written at launch: `--resume` rebuilds the param space from it, which
# Tune needs to create the trials it had not created yet (it keeps no param space of its own).
EXPERIMENT_PRESET = "suite_preset.pkl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help=f"one of {list(PRESETS)}; default: 'paper' if the Ray cluster has GPUs, "
                                    "else 'local'. " + "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()))
    p.add_argument("--algo", help=f"one of {list(ALGORITHMS)}: run only this algorithm's arms (sac: "
                                  f"{list(SAC_PRESET_ARMS)} unless --arms names others). Default: the preset's PPO "
                                  "arms, then, for presets with SAC tasks (smoke, paper), plain SAC and GazeSAC on "
                                  "those as a second experiment, <name>-sac; the report compares SAC arms with sac")
    p.add_argument("--tasks", nargs="+", help=f"override the preset's tasks; any of {list(TASKS)}")
    p.add_argument("--arms", nargs="+", help=f"override the preset's arms; any of {list(ARMS)}")
    p.add_argument("--seeds", nargs="+", type=int, help="override the preset's seeds")
    p.add_argument("--budget", type=int, help="env steps per trial for every task (default: each task's own)")
    p.add_argument("--no-state", action="store_true",
                   help="pixel-only observations: every task's env leaves out its state vector (env_config "
                        "include_state=False), so the policy sees the camera image alone. Default: each task's own "
                        "(ManiSkill tasks, as ppo_rgb: image + proprioceptive state; fovea: image + agent position)")
    p.add_argument("--num-env-runners", type=int, help="env runners per trial (0: sample in the trial's process)")
    p.add_argument("--gpus-per-env-runner", type=float, help="GPUs per env runner (fractions share a GPU)")
    p.add_argument("--gpus-per-learner", type=float, help="GPUs for each trial's learner")
    p.add_argument("--max-concurrent-trials", type=int, default=0, help="0: as many as resources allow")
    p.add_argument("--storage-path", default=os.path.abspath("results"),
                   help="local dir, shared filesystem or s3:// / gs:// URI (default ./results)")
    p.add_argument("--name", help="experiment name (default: suite-<preset>-<date-time>)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="EXPERIMENT",
                   help="continue an interrupted experiment: its name or path "
                        "(default: the latest under --storage-path)")
    p.add_argument("--checkpoint-every", type=int, default=10, help="iterations between trial checkpoints")
    p.add_argument("--gaze", nargs="+", default=[], metavar="KEY=VALUE",
                   help="a .gaze() setting for every arm, e.g. contrastive_coeff=10 label_rule=relative "
                        "(the arms' own attention/contrastive/augmentation switches excluded)")
    p.add_argument("--verbose", action="store_true",
                   help="show Tune's trial tables and every Ray worker's log lines on the console (default: "
                        "only the suite's progress lines and the report; the rest is in Ray's log files)")
    p.add_argument("--wandb", metavar="PROJECT",
                   help="also log every trial to this Weights & Biases project (needs `pip install "
                        "\"rllib-gaze[wandb]\"`; WANDB_MODE=offline logs without network)")
    p.add_argument("--wandb-group", metavar="GROUP", help="W&B group of the trials (default: the experiment name)")
    p.add_argument("--plan", action="store_true",
                   help="print what the run would ask for and cost and start nothing: its trials (tasks x arms x "
                        "seeds), each trial's CPUs, GPUs, env runners and envs, the env steps in all, how many trials "
                        "run at once on the cluster it would join (RAY_ADDRESS, as `ray job submit` sets it; else "
                        "this machine), a time estimate from the project's measured GPU figure, and the largest trial "
                        "that cluster cannot hold (then the exit status is 1)")
    p.add_argument("--plan-cluster", metavar="NxKIND",
                   help=f"--plan for N nodes of KIND instead, KIND one of {list(NODE_KINDS)}, e.g. 4xL4 (implies "
                        "--plan)")
    args = p.parse_args(argv)
    if not args.verbose:
        # RLlib's notice that the new API stack is on (its default, and ours), logged when the trial
        # configs are checked below; its errors still show
        logging.getLogger("ray.rllib").setLevel(logging.ERROR)

    def bad(flag, values, allowed):
        wrong = [v for v in values if v not in allowed]
        if wrong:
            p.error(f"{flag}: {', '.join(map(repr, wrong))} not allowed; allowed values are {list(allowed)}")

    bad("--preset", [args.preset] if args.preset else [], PRESETS)
    if args.plan_cluster:
        try:
            parse_cluster(args.plan_cluster)
        except ValueError as e:
            p.error(str(e))
        args.plan = True
    if args.wandb and importlib.util.find_spec("wandb") is None:
        p.error(f"--wandb {args.wandb}: the wandb package is not installed; pip install \"rllib-gaze[wandb]\"")
    bad("--tasks", args.tasks or [], TASKS)
    bad("--algo", [args.algo] if args.algo else [], ALGORITHMS)
    bad("--arms", args.arms or [], ALGORITHMS[args.algo] if args.algo else ARMS)
    for flag, value, low in (("--budget", args.budget, 1), ("--num-env-runners", args.num_env_runners, 0),
                             ("--max-concurrent-trials", args.max_concurrent_trials, 0),
                             ("--checkpoint-every", args.checkpoint_every, 1)):
        if value is not None and value < low:
            p.error(f"{flag}={value}: must be >= {low}")
    for flag, value in (("--gpus-per-env-runner", args.gpus_per_env_runner),
                        ("--gpus-per-learner", args.gpus_per_learner)):
        if value is not None and value < 0:
            p.error(f"{flag}={value}: must be >= 0")
    for flag, values in (("--tasks", args.tasks), ("--arms", args.arms), ("--seeds", args.seeds)):
        if values is not None and len(set(values)) != len(values):
            p.error(f"{flag} {values}: name each one once")
    if "://" not in args.storage_path:
        _check_writable(p, args.storage_path)
    if args.resume:
        given = [f"--{key.replace('_', '-')}" for key, value in vars(args).items()
                 if key not in ("resume", "storage_path", "algo") and value != p.get_default(key)]
        if given:
            p.error(f"--resume continues an experiment as it was started; drop {' '.join(given)}")
        args.resume_path = _find_experiment(p, args.storage_path, args.resume)
        args.resume_preset = saved_preset(args.resume_path)
        found = _experiment_algo(args.resume_path, args.resume_preset, args.algo or "ppo")
        if args.algo and found != args.algo:
            p.error(f"--resume {args.resume!r} --algo {args.algo}: that experiment's trials are {found} arms; "
                    f"drop --algo (it is read from the trials) or resume a {args.algo} experiment")
        args.algo = found
    else:
        args.gaze = _gaze_settings(p, args.gaze)
        _check_trials(p, args)
    return args


def _check_trials(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Builds and validates every trial's config of the preset(s) the run may pick, before Ray starts."""
    for name in [args.preset] if args.preset else ["local", "paper"]:  # what pick_preset may choose
        for preset in experiments(args, name).values():
            for task in preset.tasks:
                for arm in preset.arms:
                    try:
                        trial_config(task, arm, preset.seeds[0], preset).validate()
                    except ValueError as e:
                        p.error(f"preset {name!r}, task {task.name!r}, arm {arm!r}: {e}")


# --gaze values that JSON does not read but users type: Python's spelling of true, false and null.
_PYTHON_LITERALS = {"True": True, "False": False, "None": None}


def _gaze_settings(p: argparse.ArgumentParser, pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings -> .gaze() keyword arguments (values read as JSON, Python's ``True``,
    ``False`` and ``None`` as such, anything else as text)."""
    allowed = [k for k in inspect.signature(GazePPOConfig.gaze).parameters
               if k not in ("self", "attention", "contrastive", "augmentation")]
    settings = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in allowed:
            p.error(f"--gaze {pair!r}: expected KEY=VALUE with KEY one of {allowed}")
        try:
            value = _PYTHON_LITERALS[text] if text in _PYTHON_LITERALS else json.loads(text)
        except json.JSONDecodeError:
            value = text
        default = getattr(GazePPOConfig(), key)
        number = (int, float)
        if default is not None and (isinstance(default, bool) != isinstance(value, bool)
                or (isinstance(default, number) and not isinstance(value, number))
                or (isinstance(default, str) and not isinstance(value, str))):
            p.error(f"--gaze {pair!r}: {key} takes a {type(default).__name__} (default {default!r})")
        settings[key] = value
    return settings


def _check_writable(p: argparse.ArgumentParser, storage_path: str) -> None:
    """Refuses a local storage path where results could not be written (hours of training lost at the
    first checkpoint otherwise)."""
    existing = os.path.abspath(storage_path)
    while not os.path.exists(existing):  # the nearest folder that exists is where it would be made
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        p.error(f"--storage-path {storage_path!r}: cannot write there ({existing!r} is not a writable folder); "
                "give a writable local folder, a shared filesystem or an s3:// / gs:// URI")


def _find_experiment(p: argparse.ArgumentParser, storage_path: str, resume: str) -> str:
    """The experiment directory ``--resume`` names (local storage), failing with what exists."""
    if "://" in resume:  # a full URI, as the suite prints it
        return resume
    if "://" in storage_path:
        if resume == "latest":
            p.error("--resume on remote storage needs the experiment name: --resume NAME")
        return f"{storage_path.rstrip('/')}/{resume}"
    candidates = []
    if os.path.isdir(storage_path):
        candidates = sorted((d for d in os.listdir(storage_path)
                             if os.path.exists(os.path.join(storage_path, d, EXPERIMENT_STATE))),
                            key=lambda d: os.path.getmtime(os.path.join(storage_path, d)))
    if resume == "latest":
        if not candidates:
            p.error(f"--resume: no experiment to resume under {storage_path!r}")
        return os.path.join(storage_path, candidates[-1])
    path = resume if os.path.isabs(resume) or os.sep in resume else os.path.join(storage_path, resume)
    if not os.path.exists(os.path.join(path, EXPERIMENT_STATE)):
        p.error(f"--resume {resume!r}: {path!r} holds no Tune experiment; "
                f"experiments under {storage_path!r}: {candidates}")
    return path


def _experiment_algo(path: str, preset: Preset | None, given: str) -> str:
    """The algorithm of experiment ``path``: its saved ``preset``'s, else its trials' (their
    params.json), else ``given`` (``--algo``)."""
    if preset is not None:
        return experiment_algorithm(preset.arms)
    if "://" not in path and os.path.isdir(path):
        return next((algorithm(params.get("arm", "")) for _, params in trial_params(path)), given)
    return given


def chosen_preset(args: argparse.Namespace, cluster_gpus: float) -> tuple[str, dict[str, Preset]]:
    """The preset's name and its experiments (``experiments``)."""
    name = args.preset
    if name is None:
        name, why = pick_preset(cluster_gpus)
        print(f"[suite] --preset not given: running '{name}' because {why}.", flush=True)
    return name, experiments(args, name)


def experiments(args: argparse.Namespace, name: str) -> dict[str, Preset]:
    """Algorithm -> the preset ``name`` with the flags applied, for each algorithm the run covers (one
    Tune experiment each, PPO's first): the algorithms of ``--arms``, else ``--algo``, else PPO and,
    where the preset has SAC tasks, SAC."""
    if args.arms:
        algos = [a for a in ALGORITHMS if any(algorithm(arm) == a for arm in args.arms)]
    elif args.algo:
        algos = [args.algo]
    else:
        algos = ["ppo"] + (["sac"] if PRESETS[name].sac_tasks else [])
    return {algo: preset_with_flags(args, name, algo) for algo in algos}


def preset_with_flags(args: argparse.Namespace, name: str, algo: str | None = None) -> Preset:
    """Preset ``name``'s experiment of ``algo`` (default ``--algo``, else ppo) with the flags' overrides
    applied: SAC runs on the preset's SAC tasks (its PPO tasks if it names none)."""
    preset, algo = PRESETS[name], algo or args.algo or "ppo"
    preset_tasks = (preset.sac_tasks or preset.tasks) if algo == "sac" else preset.tasks
    own = {t.name: t for t in preset_tasks}  # a preset's own version of a task (smoke's are tiny) first
    tasks = [own.get(t, TASKS[t]) for t in args.tasks] if args.tasks else list(preset_tasks)
    if args.budget:
        tasks = [dataclasses.replace(t, budget=args.budget) for t in tasks]
    if args.no_state:
        tasks = [dataclasses.replace(t, env_config={**t.env_config, "include_state": False}) for t in tasks]
    tasks = [dataclasses.replace(t, gaze={**t.gaze, **args.gaze}) for t in tasks]
    if args.arms:
        arms = [arm for arm in args.arms if algorithm(arm) == algo]
    else:
        arms = SAC_PRESET_ARMS if algo == "sac" else preset.arms
    if not args.arms and not all(t.exposes_target for t in tasks):
        arms = [arm for arm in arms if arm not in TARGET_ARMS]  # the oracle needs the target's position
    overrides = {"tasks": tuple(tasks), "arms": tuple(arms), "seeds": tuple(args.seeds or preset.seeds),
                 "sac_tasks": ()}  # one experiment now
    for flag, key in (("num_env_runners", "num_env_runners"), ("gpus_per_env_runner", "num_gpus_per_env_runner"),
                      ("gpus_per_learner", "num_gpus_per_learner")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    return dataclasses.replace(preset, **overrides)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.plan:
        print_plan(args)
        return ""
    import ray
    from ray import tune

    # Joins the cluster when run by `ray job submit` (RAY_ADDRESS), else starts one. Quiet by default:
    # the workers' log lines (RLlib's deprecation notices, actor shutdown noise) stay in Ray's log
    # files, and the console shows the suite's progress and the report.
    ray.init(log_to_driver=args.verbose, logging_level=logging.INFO if args.verbose else logging.WARNING)
    if not args.verbose:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's experiment heading: with verbose=0, nothing
        print(f"[suite] Ray's logs (every trial's output): {_ray_logs_dir()}; --verbose shows them here", flush=True)
    if args.resume:
        print(f"[suite] resuming {args.resume_path}", flush=True)
        preset = args.resume_preset
        if preset is None:
            print(f"[suite] {args.resume_path} has no {EXPERIMENT_PRESET} (started before it was written): its "
                  "unfinished trials continue, trials Tune had not created yet cannot", flush=True)
        runs = [(args.resume_path, lambda: tune.Tuner.restore(
            args.resume_path, trainable=TRAINABLES[args.algo], resume_unfinished=True, resume_errored=True,
            param_space=param_space(preset) if preset is not None else None))]
    else:
        name, presets = chosen_preset(args, ray.cluster_resources().get("GPU", 0))
        base = args.name or f"suite-{name}{'-no-state' if args.no_state else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
        runs = []
        for algo, preset in presets.items():
            experiment = base if algo == next(iter(presets)) else f"{base}-{algo}"
            path = os.path.join(args.storage_path, experiment)
            runs.append((path, lambda algo=algo, preset=preset, experiment=experiment, path=path: _tuner(
                args, algo, preset, name, experiment, path)))
    failed = []
    for path, make_tuner in runs:  # one experiment after the other: each may use the whole cluster
        failed += _fit(make_tuner(), path)
    if failed:
        for label, why in failed:
            print(f"[suite] failed trial {label}: {why}", flush=True)
        print(f"[suite] {len(failed)} trial(s) failed; continue them with --resume "
              f"{' / '.join(path for path, _ in runs)}", flush=True)
        sys.exit(1)
    return runs[0][0]


def print_plan(args: argparse.Namespace) -> None:
    """``--plan``: the plan of each experiment the run would start (``rllib_gaze.plan``), on the cluster it would
    join or the one ``--plan-cluster`` describes; exits with status 1 where a trial cannot be placed."""
    nodes, where = cluster_nodes(args.plan_cluster)
    print(f"[plan] cluster: {where}", flush=True)
    name, presets = chosen_preset(args, sum(node.gpus for node in nodes))
    refused = False
    for algo, preset in presets.items():
        lines, refused_here = plan_lines(name, algo, preset, nodes, args.max_concurrent_trials)
        print("\n".join(lines), flush=True)
        refused |= refused_here
    if refused:
        sys.exit(1)


def _tuner(args: argparse.Namespace, algo: str, preset: Preset, name: str, experiment: str, path: str):
    """The Tune experiment of ``preset``'s trials (one algorithm's arms) named ``experiment``, at ``path``."""
    from ray import tune

    from rllib_gaze.tracking import wandb_callback

    num_trials = len(preset.tasks) * len(preset.arms) * len(preset.seeds)
    print(f"[suite] {name} ({algo}): {num_trials} trials ({[t.name for t in preset.tasks]} x {list(preset.arms)} x "
          f"seeds {list(preset.seeds)}), {planned_steps(preset):,} env steps in all -> {path}", flush=True)
    save_preset(path, preset)
    return tune.Tuner(
        TRAINABLES[algo],
        param_space=param_space(preset),
        tune_config=tune.TuneConfig(
            max_concurrent_trials=args.max_concurrent_trials or None,
            trial_name_creator=lambda trial: trial_label(trial.config),
            trial_dirname_creator=lambda trial: f"{trial_label(trial.config)}_{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=experiment, storage_path=args.storage_path, stop=BudgetStop(), verbose=2 if args.verbose else 0,
            callbacks=[SuiteProgress(planned_steps(preset), num_trials)] + (
                [wandb_callback(args.wandb, args.wandb_group or experiment)] if args.wandb else []),
            checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=args.checkpoint_every,
                                                    checkpoint_at_end=True, num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=2),
        ),
    )


def save_preset(path: str, preset: Preset) -> None:
    """Writes ``preset`` into the experiment folder ``path`` (local, or a ``scheme://`` URI)."""
    fs, file = _preset_file(path)
    fs.create_dir(file.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(file) as f:
        f.write(pickle.dumps(preset))


def saved_preset(path: str) -> Preset | None:
    """The Preset ``save_preset`` wrote into experiment ``path``; None where there is none."""
    import pyarrow.fs

    fs, file = _preset_file(path)
    if fs.get_file_info(file).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(file) as f:
        return pickle.loads(f.read())


def _preset_file(path: str):
    import pyarrow.fs  # what Tune itself stores experiments with, local or remote

    fs, fs_path = pyarrow.fs.FileSystem.from_uri(path if "://" in path else os.path.abspath(path))
    return fs, f"{fs_path.rstrip('/')}/{EXPERIMENT_PRESET}"


def _fit(tuner, path: str) -> list[tuple[str, str]]:
    """Runs ``tuner``, prints its report (local storage) and where its results are; returns the failed
    trials' labels and the last line of each one's error (the exception and its message)."""
    from rllib_gaze.report import write_report

    results = tuner.fit()
    if "://" not in path:
        print(write_report(path), flush=True)
    else:  # the report reads local files
        local = os.path.join("results", path.rstrip("/").rsplit("/", 1)[-1])
        print(f"[suite] the results are in {path}; for the report copy them (e.g. `aws s3 sync {path} {local}` or "
              f"`gsutil -m rsync -r {path} {local}`) and run `python -m rllib_gaze.report {local}`", flush=True)
    print(f"\n[suite] experiment: {path}\n[suite] TensorBoard: tensorboard --logdir {path}", flush=True)
    return [(trial_label(r.config),
             str(r.error).strip().splitlines()[-1] if str(r.error).strip() else type(r.error).__name__)
            for r in results if r.error]


def _ray_logs_dir() -> str:
    import ray

    try:  # no public API names the session's log folder
        return ray._private.worker._global_node.get_logs_dir_path()
    except AttributeError:
        return "/tmp/ray/session_latest/logs (on the head node)"


if __name__ == "__main__":
    main()
