"""What a suite launch will ask for and cost, before anything starts (the command's ``--plan``).

For each experiment of the run (PPO's, then SAC's, as the suite runs them, one after the other): the trials
(tasks x arms x seeds), what each asks Ray for (its trainable's own resource request for its config: CPUs
and GPUs in bundles; env runners and envs), the env steps in all, how many trials the cluster holds at once,
the largest trial it cannot hold at all (refused, naming the resource), and a time estimate from the one GPU
figure this project has measured (``H200_UPDATE_S``). The cluster is the one the run would join
(``RAY_ADDRESS``, as ``ray job submit`` sets it), else this machine, or one described as ``NxKIND``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from rllib_gaze.arms import ARMS
from rllib_gaze.suite import Preset, _duration, trial_config


@dataclass(frozen=True)
class Node:
    """One node's resources as Ray counts them (a vCPU is a CPU)."""

    cpus: float
    gpus: float
    what: str


# --plan-cluster's kinds: the GPU nodes this project's launch files and docs/cluster.md name.
NODE_KINDS = {
    "L4": Node(8, 1, "GCP g2-standard-8, 1 NVIDIA L4 (cluster/gcp.yaml's worker)"),
    "A10G": Node(8, 1, "AWS g5.2xlarge, 1 NVIDIA A10G (cluster/aws.yaml's worker)"),
    "g5.12xlarge": Node(48, 4, "AWS g5.12xlarge, 4 NVIDIA A10G"),
    "p4d.24xlarge": Node(96, 8, "AWS p4d.24xlarge, 8 NVIDIA A100"),
}

# The one GPU measurement of this project: the learner's update at ppo_rgb's shape on an H200, median seconds
# for 25,600 rows x 4 epochs (docs/benchmarks.md, "On a GPU (H200, 2026-11-26)", `python benchmarks/bench.py
# overhead --device cuda --batch 25600 --epochs 4`). Only the update: sampling on physx_cuda never ran here.
H200_UPDATE_S = {"ppo": 1.935, "gaze-rl": 2.694, "gaze-first": 3.827, "gaze": 4.105}
H200_ROW_PASSES = 25_600 * 4
FIGURE_SOURCE = 'docs/benchmarks.md "On a GPU (H200, 2026-11-26)"'


@dataclass(frozen=True)
class Trial:
    """What one trial asks for and does."""

    label: str
    arm: str
    bundles: tuple[dict[str, float], ...]  # Ray's placement group bundles (PACK: one node if they fit)
    runners: str                            # env runners x envs, training and evaluation
    steps: int                              # env steps it trains for
    row_passes: int | None                  # rows x epochs of its learner updates (PPO), None for SAC

    @property
    def cpus(self) -> float:
        return sum(b.get("CPU", 0) for b in self.bundles)

    @property
    def gpus(self) -> float:
        return sum(b.get("GPU", 0) for b in self.bundles)


def parse_cluster(text: str) -> list[Node]:
    """``NxKIND`` (N nodes of a kind of ``NODE_KINDS``) -> its nodes; ValueError naming the value and what is
    allowed."""
    found = re.fullmatch(r"(\d+)x(.+)", text)
    if not found or int(found.group(1)) < 1 or found.group(2) not in NODE_KINDS:
        raise ValueError(f"--plan-cluster {text!r}: expected NxKIND, N >= 1 nodes of a KIND in {list(NODE_KINDS)}, "
                         "e.g. 4xL4")
    return [NODE_KINDS[found.group(2)]] * int(found.group(1))


def cluster_nodes(described: str | None) -> tuple[list[Node], str]:
    """The nodes to plan for and a sentence saying which cluster that is."""
    if described:
        return parse_cluster(described), f"{described} described by --plan-cluster ({parse_cluster(described)[0].what})"
    address = os.environ.get("RAY_ADDRESS")
    if address and "://" in address and not address.startswith("ray://"):
        return [], (f"RAY_ADDRESS={address} is a job server, not a cluster this command joins: plan through "
                    "`ray job submit -- ... --plan`, or describe the cluster with --plan-cluster NxKIND")
    if address:
        import ray

        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
            nodes = [Node(n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0), n["NodeManagerAddress"])
                     for n in ray.nodes() if n["Alive"]]
        except Exception as error:  # whatever ray.init raises for an address it cannot reach
            return [], (f"no Ray cluster reachable at RAY_ADDRESS={address} ({type(error).__name__}): describe one "
                        "with --plan-cluster NxKIND")
        finally:
            ray.shutdown()
        return nodes, (f"the Ray cluster at RAY_ADDRESS={address}, {len(nodes)} node(s) up now (an autoscaling "
                       "cluster's workers that are not up yet are not counted: --plan-cluster NxKIND plans it full)")
    import torch

    return [Node(os.cpu_count() or 1, torch.cuda.device_count(), "this machine")], (
        "this machine (RAY_ADDRESS is unset, so the run would start a local Ray here; no cluster to join): "
        f"{os.cpu_count()} CPUs, {torch.cuda.device_count()} GPUs; --plan-cluster NxKIND describes another")


def trials(preset: Preset, algo: str) -> list[Trial]:
    """Every trial of ``preset`` (one algorithm's experiment) with its trainable's own resource request."""
    out = []
    for task in preset.tasks:
        for arm in preset.arms:
            config = trial_config(task, arm, preset.seeds[0], preset)
            # the config's own Algorithm class, not Tune's registry (which a joined-then-left Ray empties)
            bundles = tuple(config.algo_class.default_resource_request(config).bundles)
            runners = (_runners(config.num_env_runners, config.num_envs_per_env_runner) + ", evaluation "
                       + _runners(config.evaluation_num_env_runners,
                                  config.evaluation_config["num_envs_per_env_runner"]))
            steps = task.iterations(preset.num_env_runners) * task.batch_size(preset.num_env_runners)
            row_passes = steps * config.num_epochs if algo == "ppo" else None
            out += [Trial(f"{task.name}/{arm}/seed{seed}", arm, bundles, runners, steps, row_passes)
                    for seed in preset.seeds]
    return out


def _runners(count: int, envs: int) -> str:
    return f"{count} x {envs} envs" if count else f"{envs} envs in the trial's own process"


def _place(trial: Trial, free: list[dict[str, float]]) -> bool:
    """Places ``trial``'s bundles on the nodes' free resources (all on one node if they fit, as Ray's PACK
    strategy prefers, else bundle by bundle); False, changing nothing, where they do not fit."""
    def fits(bundle, node):
        return all(node.get(k, 0) >= v for k, v in bundle.items())

    for node in free:
        trial_total = {k: sum(b.get(k, 0) for b in trial.bundles) for k in ("CPU", "GPU")}
        if fits(trial_total, node):
            for k, v in trial_total.items():
                node[k] -= v
            return True
    taken = [dict(node) for node in free]
    for bundle in trial.bundles:
        node = next((n for n in taken if fits(bundle, n)), None)
        if node is None:
            return False
        for k, v in bundle.items():
            node[k] = node.get(k, 0) - v
    free[:] = taken
    return True


def at_once(all_trials: list[Trial], nodes: list[Node]) -> int:
    """How many of the trials the nodes hold at the same time (each placed where it fits, in order)."""
    free = [{"CPU": n.cpus, "GPU": n.gpus} for n in nodes]
    return sum(_place(t, free) for t in all_trials)


def refusal(all_trials: list[Trial], nodes: list[Node]) -> str | None:
    """The largest trial that an empty cluster of ``nodes`` cannot hold, and the resource it lacks."""
    for trial in sorted(all_trials, key=lambda t: (t.gpus, t.cpus), reverse=True):
        if at_once([trial], nodes):
            continue
        for resource, asked in (("GPU", trial.gpus), ("CPU", trial.cpus)):
            largest_bundle = max(b.get(resource, 0) for b in trial.bundles)
            most = max((getattr(n, resource.lower() + "s") for n in nodes), default=0)
            total = sum(getattr(n, resource.lower() + "s") for n in nodes)
            if largest_bundle > most or asked > total:
                return (f"refused: {trial.label} asks for {asked:g} {resource} (bundles {list(trial.bundles)}), and "
                        f"the cluster has {total:g} {resource} in all, at most {most:g} on one node")
        return f"refused: {trial.label} (bundles {list(trial.bundles)}) fits no node's CPUs and GPUs together"
    return None


def _figure(arm: str) -> tuple[float, str]:
    """The H200 update time for ``arm``'s updates, and the measured arm it is (arms measured by others: the
    contrastive arms by the full method's, the other gaze arms by gaze-rl's, the rest by plain PPO's)."""
    if arm in H200_UPDATE_S:
        return H200_UPDATE_S[arm], arm
    settings = ARMS[arm]
    like = "gaze" if settings.get("contrastive") else "ppo" if settings.get("attention") == "none" else "gaze-rl"
    return H200_UPDATE_S[like], like


def _wall(durations: list[float], slots: int) -> float:
    """Wall time of running ``durations`` on ``slots`` at once, longest first, each on the first free slot."""
    ends = [0.0] * slots
    for d in sorted(durations, reverse=True):
        ends[ends.index(min(ends))] += d
    return max(ends)


def plan_lines(name: str, algo: str, preset: Preset, nodes: list[Node], max_concurrent: int = 0) -> tuple[list[str],
                                                                                                         bool]:
    """The plan of one experiment as printed lines, and whether a trial is refused."""
    planned = trials(preset, algo)
    lines = [f"[plan] {name} ({algo}): {len(planned)} trials = {len(preset.tasks)} tasks x {len(preset.arms)} arms "
             f"{list(preset.arms)} x {len(preset.seeds)} seeds {list(preset.seeds)}; "
             f"{sum(t.steps for t in planned):,} env steps in all"]
    for request in dict.fromkeys((str(t.bundles), t.runners) for t in planned):  # each distinct request once
        like = [t for t in planned if (str(t.bundles), t.runners) == request]
        lines.append(f"[plan]   {len(like)} trial(s) ask for {like[0].cpus:g} CPU and {like[0].gpus:g} GPU "
                     f"(bundles {list(like[0].bundles)}); env runners {request[1]}")
    slots = at_once(planned, nodes)
    if max_concurrent:
        slots = min(slots, max_concurrent)
    lines.append(f"[plan]   at once on that cluster: {slots} trial(s)"
                 + (f" (--max-concurrent-trials {max_concurrent})" if max_concurrent else ""))
    refused = refusal(planned, nodes)
    lines.append(f"[plan]   {refused}" if refused else "[plan]   every trial fits the cluster")
    if algo != "ppo" or any(t.gpus == 0 for t in planned):
        lines.append("[plan]   time: no estimate (the project's one GPU figure is PPO's learner update on an H200; "
                     "nothing measured fits these trials)")
        return lines, refused is not None
    seconds = {t.label: t.row_passes / H200_ROW_PASSES * _figure(t.arm)[0] for t in planned}
    stand_ins = sorted({f"{t.arm} at {_figure(t.arm)[1]}'s" for t in planned if _figure(t.arm)[1] != t.arm})
    gpu_hours = sum(seconds[t.label] * t.gpus for t in planned) / 3600
    wall = f"wall >= {_duration(_wall(list(seconds.values()), slots))}" if slots else "no wall time (no trial fits)"
    lines.append(f"[plan]   time, a lower bound: {wall}, >= {gpu_hours:,.1f} GPU-hours: the learner's updates "
                 f"alone at the H200 figure of {FIGURE_SOURCE} (plain PPO {H200_UPDATE_S['ppo']} s, the full method "
                 f"{H200_UPDATE_S['gaze']} s per {H200_ROW_PASSES:,} rows x epochs"
                 + (f"; not measured, so counted at another arm's: {', '.join(stand_ins)}" if stand_ins else "")
                 + "); sampling on physx_cuda and evaluation were never measured on a GPU, and an L4 or A10G is "
                   "slower than an H200")
    return lines, refused is not None
