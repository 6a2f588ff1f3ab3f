"""Sample-efficiency report of a suite experiment: success curves (PNG) and a Markdown table.

    python -m rllib_gaze.report EXPERIMENT_DIR [--levels 0.5 0.8] [--out DIR] [--reps 2000]

Reads every trial's ``params.json`` and ``result.json`` (Tune's files), keeps its evaluation
points ``(env steps, evaluation success rate)``, and per task and arm averages them over seeds:

- curve: mean over seeds with a 95% Student-t confidence band (no band with one seed);
- steps to a level: the first evaluation point at which the mean curve reaches the level, over the
  points every seed of the arm has reached (so one fast seed cannot decide it);
- final: mean over seeds of each seed's last evaluation;
- AUC: the mean curve's trapezoid area divided by its step span (mean success over training);
- ratio vs ppo at a level: ppo's steps / the arm's steps (> 1: the arm needs fewer env steps);
  an experiment of SAC arms (``--algo sac``) is compared with plain ``sac`` instead;
  "> r" when ppo never reached the level within its last evaluated step (a lower bound);
- 95% interval of that ratio: a percentile bootstrap that resamples each arm's seeds (and ppo's)
  with replacement; a resample that never reaches the level is censored at its last evaluated
  step, against the arm at the interval's low end and for it at the high end. The verdict is
  "win" only when the interval lies above 1, "loss" when it lies below 1, "-" otherwise (also
  when neither reached the level).

Beside them, the field's statistics by rliable (``rllib_gaze.aggregate``), per task and over all tasks,
on each seed's final ``success_once`` and ``success_at_end``: IQM with stratified-bootstrap 95% intervals,
the probability of improvement over the baseline arm with its interval and the call "better" / "worse" /
"no call" from it, IQM sample-efficiency curves (``iqm_<task>.png``, ``iqm_all.png``) and performance
profiles (``profiles.png``).

Works on partial results: running or failed trials count with the points they have.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from dataclasses import dataclass

import numpy as np

from rllib_gaze import aggregate
from rllib_gaze.arms import ARMS, BASELINES, algorithm
from rllib_gaze.results import (
    CONTRASTIVE_COS_GAP_KEY,
    CONTRASTIVE_LABEL_AGREEMENT_KEY,
    CONTRASTIVE_LOSS_KEY,
    GAZE_GRAD_NORM_CONTRASTIVE_KEY,
    GAZE_GRAD_NORM_CRITIC_KEY,
    GAZE_GRAD_NORM_PPO_KEY,
    GAZE_PREDICT_LOSS_KEY,
    GAZE_TARGET_DISTANCE_CENTRE_KEY,
    GAZE_TARGET_DISTANCE_KEY,
    LEARNER,
    STEPS,
    SUCCESS_AT_END,
    SUCCESS_ONCE,
    evaluation_success,
    gaze_param_key,
    result_rows,
    trial_params,
)

BOOTSTRAP_DRAWS = 2000


@dataclass
class Curve:
    """One task x arm: evaluation success over env steps for each seed.

    Seeds are aligned on the training iteration of each evaluation (the same env steps, unless a
    fault made one seed sample more or fewer); a point's env steps are the seeds' mean."""

    task: str
    arm: str
    runs: dict[int, list[tuple[int, int, float]]]  # seed -> [(iteration, env steps, success)] in order

    def mean(self, common_only: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(steps, mean, low, high)`` over seeds at each evaluation (the 95% band);
        ``common_only``: only the evaluations that every seed has reached."""
        by_iteration: dict[int, list[tuple[int, float]]] = {}
        for points in self.runs.values():
            for iteration, step, value in points:
                by_iteration.setdefault(iteration, []).append((step, value))
        iterations = sorted(i for i, v in by_iteration.items() if not common_only or len(v) == len(self.runs))
        steps, mean, low, high = [], [], [], []
        for iteration in iterations:
            steps.append(float(np.mean([step for step, _ in by_iteration[iteration]])))
            values = np.asarray([value for _, value in by_iteration[iteration]], dtype=float)
            m = float(values.mean())
            half = _t95(len(values)) * float(values.std(ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else 0.0
            mean.append(m), low.append(max(0.0, m - half)), high.append(min(1.0, m + half))
        return np.asarray(steps), np.asarray(mean), np.asarray(low), np.asarray(high)

    def steps_to(self, level: float) -> float | None:
        steps, mean, _, _ = self.mean(common_only=True)
        reached = np.nonzero(mean >= level)[0]
        return float(steps[reached[0]]) if len(reached) else None

    def last_step(self) -> float:
        steps, _, _, _ = self.mean(common_only=True)
        return float(steps[-1]) if len(steps) else 0.0

    def final(self) -> float:
        return float(np.mean([points[-1][2] for points in self.runs.values()]))

    def auc(self) -> float:
        steps, mean, _, _ = self.mean(common_only=True)
        if len(steps) < 2:
            return float(mean[0]) if len(mean) else math.nan
        area = float(np.sum((mean[1:] + mean[:-1]) / 2 * np.diff(steps)))
        return area / float(steps[-1] - steps[0])


def bootstrap_ratio(baseline: Curve, curve: Curve, level: float, draws: int = BOOTSTRAP_DRAWS,
                    seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval ``(low, high)`` of ``baseline``'s steps to ``level`` over
    ``curve``'s, resampling each one's seeds with replacement (a fixed ``seed``: the same report
    every time). A resample that never reaches the level is censored at its last evaluated step:
    the low end takes the case least favourable to ``curve`` (``curve`` infinitely slow, the
    baseline at its last step) and the high end the most favourable (the reverse), so neither a
    win nor a loss is called from resamples in which an arm never got there."""
    rng = np.random.default_rng(seed)

    def resampled_steps(c: Curve) -> np.ndarray:
        runs = list(c.runs.values())
        out = np.empty(draws)
        for i in range(draws):
            pick = rng.integers(len(runs), size=len(runs))
            steps = Curve(c.task, c.arm, {j: runs[k] for j, k in enumerate(pick)}).steps_to(level)
            out[i] = math.nan if steps is None else steps
        return out

    base, arm = resampled_steps(baseline), resampled_steps(curve)
    with np.errstate(divide="ignore"):
        low = np.where(np.isnan(base), baseline.last_step(), base) / np.where(np.isnan(arm), math.inf, arm)
        high = np.where(np.isnan(base), math.inf, base) / np.where(np.isnan(arm), curve.last_step(), arm)
    # no interpolation between draws (it would turn an infinite end into NaN), rounded outwards
    return float(np.percentile(low, 2.5, method="lower")), float(np.percentile(high, 97.5, method="higher"))


def verdict(interval: tuple[float, float]) -> str:
    """"win" if the ratio's interval lies above 1, "loss" if below, "-" if it holds 1."""
    low, high = interval
    return "win" if low > 1.0 else "loss" if high < 1.0 else "-"


@functools.lru_cache(maxsize=None)   # the bootstrap asks for the same few n tens of thousands of times
def _t95(n: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1))


def load_curves(experiment_dir: str, until: float | None = None, seeds: tuple[int, ...] | None = None,
                metric: str = SUCCESS_ONCE) -> tuple[list[Curve], list[str]]:
    """Every task x arm with at least one evaluation (up to ``until`` env steps, if given; of the
    given ``seeds`` only, if given) of ``metric`` (``SUCCESS_ONCE`` or ``SUCCESS_AT_END``), and notes on
    trials without any."""
    if not os.path.isdir(experiment_dir):
        raise FileNotFoundError(f"experiment dir {experiment_dir!r} does not exist")
    curves: dict[tuple[str, str], Curve] = {}
    notes = []
    trials = trial_params(experiment_dir)
    if not trials:
        raise FileNotFoundError(f"no Tune trials (directories with params.json) in {experiment_dir!r}")
    for name, params in trials:
        if not SUITE_KEYS <= params.keys():
            notes.append(f"{name}: not a suite trial (no task/arm/seed in params.json), skipped")
            continue
        if seeds is not None and int(params["seed"]) not in seeds:
            continue
        points = [p for p in _evaluation_points(os.path.join(experiment_dir, name, "result.json"),
                                                int(params.get("evaluation_interval") or 1), metric)
                  if until is None or p[1] <= until]
        if not points:
            notes.append(f"{name}: no evaluation yet")
            continue
        curve = curves.setdefault((params["task"], params["arm"]), Curve(params["task"], params["arm"], {}))
        curve.runs[int(params["seed"])] = points
    return sorted(curves.values(), key=lambda c: (c.task, _arm_order(c.arm))), notes


SUITE_KEYS = {"task", "arm", "seed"}  # what the suite puts in every trial's config


def trial_failures(experiment_dir: str) -> list[str]:
    """One line per trial that raised (Tune wrote ``error.txt``): how often, whether Tune's restarts
    got it to its last iteration, and the last line of its last error (the exception and message)."""
    lines = []
    for name, params in trial_params(experiment_dir):
        error_file = os.path.join(experiment_dir, name, "error.txt")
        if not os.path.exists(error_file):
            continue
        with open(error_file) as f:
            text = f.read()
        failures = max(1, text.count("Failure # "))
        last = [line.strip() for line in text.strip().splitlines() if line.strip()]
        why = last[-1] if last else "(error.txt is empty)"
        rows = result_rows(os.path.join(experiment_dir, name, "result.json"))
        done = rows[-1]["training_iteration"] if rows else 0
        planned = params.get("suite_iterations")
        if planned is not None and done >= planned:
            state = f"finished after {failures} restart(s)"
        else:
            state = f"failed {failures} time(s), stopped at iteration {done}" + (f" of {planned}" if planned else "")
        lines.append(f"{name}: {state}: {why}")
    return lines


def _evaluation_points(result_file: str, interval: int, metric: str) -> list[tuple[int, int, float]]:
    points: dict[int, tuple[int, float]] = {}
    for row in result_rows(result_file):
        value = evaluation_success(row, interval, metric)
        if value is not None:  # a resumed trial repeats iterations after its checkpoint: keep the last
            points[int(row["training_iteration"])] = (int(row[STEPS]), value)
    return [(iteration, step, value) for iteration, (step, value) in sorted(points.items())]


def _arm_order(arm: str) -> tuple[int, str]:
    names = list(ARMS)
    return (names.index(arm) if arm in names else len(names), arm)


def baseline_arm(curves: list[Curve]) -> str:
    """The arm the others are compared with: plain ``sac`` for an experiment of SAC arms, else ``ppo``."""
    algorithms = {algorithm(c.arm) for c in curves}
    return BASELINES[algorithms.pop() if len(algorithms) == 1 else "ppo"]


def table(curves: list[Curve], levels: tuple[float, ...]) -> str:
    """The Markdown sample-efficiency table of one task's curves."""
    name = baseline_arm(curves)
    baseline = next((c for c in curves if c.arm == name), None)
    head = ["arm", "seeds", "env steps"] + [f"steps to {level:.0%}" for level in levels]
    if baseline is not None:
        head += [f"ratio vs {name} at {level:.0%}" for level in levels]
    head += ["final success", "AUC"]
    if baseline is not None:
        head += [f"ratio 95% CI at {level:.0%}" for level in levels]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in curves:
        reached = [c.steps_to(level) for level in levels]
        cells = [c.arm, str(len(c.runs)), f"{c.last_step():,.0f}"]
        cells += [f"{s:,.0f}" if s is not None else "never reached" for s in reached]
        if baseline is not None:
            cells += [_ratio(baseline, c, level, s) for level, s in zip(levels, reached)]
        finals = [points[-1][2] for points in c.runs.values()]
        spread = f" ± {np.std(finals, ddof=1):.2f}" if len(finals) > 1 else ""
        cells += [f"{c.final():.2f}{spread}", f"{c.auc():.3f}"]
        if baseline is not None:
            cells += [_interval(baseline, c, level) for level in levels]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _ratio(baseline: Curve, curve: Curve, level: float, steps: float | None) -> str:
    if steps is None:
        return "-"
    base = baseline.steps_to(level)
    if base is None:
        return f"> {baseline.last_step() / steps:.2f}"
    return f"{base / steps:.2f}"


def _interval(baseline: Curve, curve: Curve, level: float) -> str:
    if curve is baseline:
        return "-"
    if min(len(curve.runs), len(baseline.runs)) < 2:
        return "needs >= 2 seeds"
    low, high = bootstrap_ratio(baseline, curve, level)
    return f"[{low:.2f}, {high:.2f}] {verdict((low, high))}"


def final_scores(curves: list[Curve], arm: str, tasks: list[str]) -> np.ndarray | None:
    """``(runs, tasks)``: each seed's last evaluation of ``arm`` on each of ``tasks``, for the seeds every
    one of those tasks has (rliable's score matrix); None where the arm misses a task or a common seed."""
    by_task = {c.task: c for c in curves if c.arm == arm}
    if not all(task in by_task for task in tasks):
        return None
    seeds = sorted(set.intersection(*(set(by_task[task].runs) for task in tasks)))
    if not seeds:
        return None
    return np.asarray([[by_task[task].runs[seed][-1][2] for task in tasks] for seed in seeds], dtype=float)


def rliable_table(curves_by_metric: dict[str, list[Curve]], tasks: list[str], reps: int = aggregate.REPS) -> str:
    """Markdown, per arm: the IQM of final success over ``tasks`` and the probability of improvement over
    the baseline arm, each with its 95% stratified-bootstrap interval, and the call from that interval,
    for each success metric of ``curves_by_metric`` (metric -> curves)."""
    first = next(iter(curves_by_metric.values()))
    name = baseline_arm(first)
    arms = sorted({c.arm for c in first if final_scores(first, c.arm, tasks) is not None}, key=_arm_order)
    head = ["arm", "seeds"] + [f"IQM {metric}" for metric in curves_by_metric]
    for metric in curves_by_metric:
        head += [f"P(> {name}), {metric}", "call"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in arms:
        cells = [arm, str(len(final_scores(first, arm, tasks)))]
        pairs = {metric: (final_scores(curves, arm, tasks), final_scores(curves, name, tasks))
                 for metric, curves in curves_by_metric.items()}
        cells += [str(aggregate.iqm(scores, reps)) if scores is not None else "-" for scores, _ in pairs.values()]
        for scores, base in pairs.values():
            if arm == name or scores is None or base is None:
                cells += ["-", "-"]
            elif min(len(scores), len(base)) < 2:
                cells += ["needs >= 2 seeds", "no call"]
            else:
                improvement = aggregate.probability_of_improvement(scores, base, reps)
                cells += [str(improvement), aggregate.call(improvement)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def evaluation_scores(curves: list[Curve], tasks: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    """``(env steps (E,), arm -> (runs, tasks, E))``: every seed's evaluations of ``tasks`` at the training
    iterations that every seed of every arm and task evaluated, for rliable's IQM curves; the steps are
    the mean over those runs. None where they share no evaluation, or the tasks evaluate at different
    env steps."""
    chosen = [c for c in curves if c.task in tasks]
    arms = [arm for arm in dict.fromkeys(c.arm for c in chosen) if final_scores(chosen, arm, tasks) is not None]
    runs = [points for c in chosen if c.arm in arms for points in c.runs.values()]
    if not runs:
        return None
    iterations = sorted(set.intersection(*({i for i, _, _ in points} for points in runs)))
    if not iterations:
        return None
    by_task = [[np.mean([step for c in chosen if c.task == task and c.arm in arms for points in c.runs.values()
                         for i, step, _ in points if i == it]) for it in iterations] for task in tasks]
    steps = np.mean(by_task, axis=0)
    if not np.allclose(by_task, steps, rtol=0.01):
        return None   # the tasks evaluate at different env steps: no common x axis
    scores = {}
    for arm in sorted(arms, key=_arm_order):
        by_task = {c.task: c for c in chosen if c.arm == arm}
        seeds = sorted(set.intersection(*(set(by_task[task].runs) for task in tasks)))
        values = {(task, seed): {i: v for i, _, v in by_task[task].runs[seed]} for task in tasks for seed in seeds}
        scores[arm] = np.asarray([[[values[(task, seed)][it] for it in iterations] for task in tasks]
                                  for seed in seeds], dtype=float)
    return steps, scores


def plot(curves: list[Curve], path: str) -> None:
    """One task's success curves (mean and 95% band per arm) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = _figure(plt, len(curves))
    for c in curves:
        steps, mean, low, high = c.mean()
        label = f"{c.arm} ({len(c.runs)} seed{'s' * (len(c.runs) > 1)})"
        line, = ax.plot(steps, mean, marker="o", markersize=3, label=label)
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(title=curves[0].task, xlabel="env steps", ylabel="evaluation success rate", ylim=(-0.02, 1.02))
    _finish(fig, ax, len(curves))
    fig.savefig(path)
    plt.close(fig)


def _figure(plt, lines: int):
    """A figure with room for ``lines`` distinct colours; many arms get a wider one (legend outside)."""
    fig, ax = plt.subplots(figsize=(6.4 if lines <= 6 else 8.6, 4.0), dpi=110)
    if lines > 10:
        ax.set_prop_cycle(color=[plt.get_cmap("tab20")(i % 20) for i in range(lines)])
    return fig, ax


def _finish(fig, ax, lines: int) -> None:
    ax.grid(alpha=0.3)
    if lines <= 6:
        ax.legend(loc="upper left", fontsize=8)
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    fig.tight_layout()


# Learner metrics that say what the gaze objective did (docs/method.md); the diagnosis table
# shows each one's mean over seeds at a trial's last iteration, where the arm logs it.
DIAGNOSIS = (GAZE_TARGET_DISTANCE_KEY, GAZE_TARGET_DISTANCE_CENTRE_KEY, gaze_param_key("sigma_x", "mean"),
             gaze_param_key("mu_x", "std"), CONTRASTIVE_LABEL_AGREEMENT_KEY, CONTRASTIVE_COS_GAP_KEY,
             CONTRASTIVE_LOSS_KEY, GAZE_PREDICT_LOSS_KEY)
# Kept with them in the learner series (so in exports), not in the table: where the gaze is and
# which loss moves it, which a collapse to the map's edge shows.
GAZE_TRACE = (gaze_param_key("mu_x", "mean"), gaze_param_key("mu_y", "mean"), gaze_param_key("sigma_y", "mean"),
              gaze_param_key("mu_y", "std"), GAZE_GRAD_NORM_CONTRASTIVE_KEY, GAZE_GRAD_NORM_PPO_KEY,
              GAZE_GRAD_NORM_CRITIC_KEY)


def learner_series(experiment_dir: str, until: float | None = None,
                   seeds: tuple[int, ...] | None = None) -> dict[tuple[str, str], dict[int, list[tuple[int, dict]]]]:
    """``(task, arm) -> seed -> [(env steps, {DIAGNOSIS or GAZE_TRACE metric: value})]`` from every suite
    trial."""
    out: dict[tuple[str, str], dict[int, list[tuple[int, dict]]]] = {}
    for name, params in trial_params(experiment_dir):
        if not SUITE_KEYS <= params.keys() or (seeds is not None and int(params["seed"]) not in seeds):
            continue
        rows = []
        for row in result_rows(os.path.join(experiment_dir, name, "result.json")):
            learner = row.get(LEARNER[0], {}).get(LEARNER[1], {})
            metrics = {k: float(learner[k]) for k in DIAGNOSIS + GAZE_TRACE
                       if isinstance(learner.get(k), (int, float))}
            if metrics and STEPS in row and (until is None or row[STEPS] <= until):
                rows.append((int(row[STEPS]), metrics))
        if rows:
            out.setdefault((params["task"], params["arm"]), {})[int(params["seed"])] = rows
    return out


def diagnosis_table(series: dict[tuple[str, str], dict[int, list[tuple[int, dict]]]], task: str) -> str | None:
    """Markdown: per arm of ``task``, each DIAGNOSIS metric's mean over seeds at their last iteration."""
    arms = sorted((arm for t, arm in series if t == task), key=_arm_order)
    columns = [k for k in DIAGNOSIS if any(k in rows[-1][1] for arm in arms for rows in series[(task, arm)].values())]
    if not columns:
        return None
    lines = ["| arm | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for arm in arms:
        lasts = [rows[-1][1] for rows in series[(task, arm)].values()]
        cells = [f"{np.mean([m[k] for m in lasts if k in m]):.3f}" if any(k in m for m in lasts) else "-"
                 for k in columns]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_gaze_distance(series: dict[tuple[str, str], dict[int, list[tuple[int, dict]]]], task: str, path: str,
                       smooth: int = 5) -> bool:
    """Gaze-to-target distance relative to a fixed central gaze's, over env steps per arm (mean over
    seeds, running mean over ``smooth`` iterations): 1 = no better than looking at the centre,
    0 = on the target. False (no file) when no arm of ``task`` logs it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, reference = GAZE_TARGET_DISTANCE_KEY, GAZE_TARGET_DISTANCE_CENTRE_KEY
    arms = [arm for t, arm in sorted(series, key=lambda ta: _arm_order(ta[1])) if t == task
            and any(key in m and reference in m for rows in series[(t, arm)].values() for _, m in rows)]
    if not arms:
        return False
    fig, ax = _figure(plt, len(arms))
    for arm in arms:
        by_step: dict[int, list[float]] = {}
        for rows in series[(task, arm)].values():
            for step, m in rows:
                if key in m and m.get(reference, 0) > 0:
                    by_step.setdefault(step, []).append(m[key] / m[reference])
        steps = sorted(by_step)
        values = np.convolve([np.mean(by_step[s]) for s in steps], np.ones(smooth) / smooth, mode="valid") \
            if len(steps) >= smooth else np.asarray([np.mean(by_step[s]) for s in steps])
        ax.plot(steps[len(steps) - len(values):], values, label=arm)
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set(title=f"{task}: gaze centre to target / central gaze to target", xlabel="env steps",
           ylabel="relative distance (1: no better than the centre)", ylim=(0, None))
    _finish(fig, ax, len(arms))
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(experiment_dir: str, out_dir: str | None = None, levels: tuple[float, ...] = (0.5, 0.8),
                 until: float | None = None, seeds: tuple[int, ...] | None = None, reps: int = aggregate.REPS) -> str:
    """Writes ``report.md``, ``success_<task>.png``, and rliable's ``iqm_<task>.png``, ``iqm_all.png``
    (tasks with a common evaluation grid) and ``profiles.png`` into ``out_dir`` (default: the experiment
    dir) and returns the Markdown; ``until``: only evaluations up to that many env steps; ``reps``: the
    bootstrap resamples of rliable's intervals."""
    bad = [level for level in levels if not 0.0 < level <= 1.0]
    if bad:
        raise ValueError(f"levels {bad}: each level must be in (0, 1]")
    if until is not None and until <= 0:
        raise ValueError(f"until={until}: must be > 0 env steps")
    curves, notes = load_curves(experiment_dir, until, seeds)
    curves_by_metric = {SUCCESS_ONCE: curves}
    at_end = load_curves(experiment_dir, until, seeds, SUCCESS_AT_END)[0]
    if at_end:
        curves_by_metric[SUCCESS_AT_END] = at_end
    out_dir = out_dir or experiment_dir
    os.makedirs(out_dir, exist_ok=True)
    lines = [f"# Sample efficiency: {os.path.basename(os.path.normpath(experiment_dir))}", "",
             "Metric: deterministic evaluation success rate (`evaluation/env_runners/success_once`); "
             "mean over seeds, 95% band. Ratio = the baseline's steps (plain ppo; plain sac for SAC arms) / the arm's "
             "steps to the level; its 95% "
             "interval is a bootstrap over seeds, and a win is called only when the interval lies above 1.", ""]
    series = learner_series(experiment_dir, until, seeds)
    missing = aggregate.unavailable()
    if missing:   # the rest of the report still matters (and the suite's next experiment must still run)
        lines += [f"**rliable's statistics are not in this report: rliable does not import here ({missing}). "
                  "Install the project's dependencies (`pip install -e .`, which keeps pandas < 3) and re-make "
                  "the report with `python -m rllib_gaze.report`.**", ""]
    for task in sorted({c.task for c in curves}):
        task_curves = [c for c in curves if c.task == task]
        image = f"success_{task}.png"
        plot(task_curves, os.path.join(out_dir, image))
        lines += [f"## {task}", "", f"![{task}]({image})", "", table(task_curves, levels), ""]
        if not missing:
            lines += _rliable_lines(curves_by_metric, [task], f"iqm_{task}.png", out_dir, reps)
        diagnosis = diagnosis_table(series, task)
        if diagnosis:
            lines += ["What the gaze objective did (learner metrics at the last iteration, mean over seeds; "
                      "docs/method.md says what each means):", "", diagnosis, ""]
        if plot_gaze_distance(series, task, os.path.join(out_dir, f"gaze_{task}.png")):
            lines += [f"![{task} gaze-to-target distance](gaze_{task}.png)", ""]
    tasks = sorted({c.task for c in curves})
    if len(tasks) > 1 and not missing:
        lines += ["## All tasks", ""] + _rliable_lines(curves_by_metric, tasks, "iqm_all.png", out_dir, reps)
    if curves and not missing:
        scores_by_metric = {metric: {arm: final_scores(metric_curves, arm, tasks) for arm in
                                     sorted({c.arm for c in metric_curves}, key=_arm_order)}
                            for metric, metric_curves in curves_by_metric.items()}
        scores_by_metric = {metric: {arm: s for arm, s in scores.items() if s is not None}
                            for metric, scores in scores_by_metric.items()}
        aggregate.plot_profiles(scores_by_metric, os.path.join(out_dir, "profiles.png"), reps)
        lines += ["Performance profiles (rliable): the fraction of runs, over every task, whose final success "
                  "exceeds each threshold, with 95% stratified-bootstrap bands:", "", "![profiles](profiles.png)", ""]
    elif not curves:
        lines += ["No trial has been evaluated yet.", ""]
    failures = trial_failures(experiment_dir)
    if failures:
        lines += ["Trials that raised (Tune's error.txt in the trial's folder has the tracebacks):", ""]
        lines += [f"- {failure}" for failure in failures] + [""]
    if notes:
        lines += ["Notes:", ""] + [f"- {note}" for note in notes] + [""]
    markdown = "\n".join(lines)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown)
    return markdown


def _rliable_lines(curves_by_metric: dict[str, list[Curve]], tasks: list[str], image: str, out_dir: str,
                   reps: int) -> list[str]:
    """The report's rliable part for ``tasks``: the table of ``rliable_table`` and the IQM curves PNG
    (where the runs share evaluations)."""
    lines = [f"Final success by rliable ({'this task' if len(tasks) == 1 else 'all tasks'}; each seed's last "
             "evaluation): IQM and the probability that a run of the arm beats a run of the baseline, each with "
             "its 95% stratified-bootstrap interval; better / worse when that interval lies above / below 0.5:", "",
             rliable_table(curves_by_metric, tasks, reps), ""]
    evaluations = evaluation_scores(curves_by_metric[SUCCESS_ONCE], tasks)
    if evaluations is not None:
        title = tasks[0] if len(tasks) == 1 else "all tasks"
        aggregate.plot_iqm_curves(*evaluations, f"{title}: IQM {SUCCESS_ONCE}", os.path.join(out_dir, image), reps)
        lines += [f"![{title} IQM curves]({image})", ""]
    return lines


def export_runs(experiment_dir: str, path: str) -> int:
    """Writes the evaluation points and diagnosis metrics of every suite trial as gzipped JSON lines
    (one per trial: task, arm, seed, ``[[iteration, env steps, success]]`` of ``success_once`` and of
    ``success_at_end``, and ``[[env steps, {metric: value}]]``): the numbers behind a report, small
    enough to keep in the repository. Returns the number of trials written."""
    import gzip

    curves, _ = load_curves(experiment_dir)
    at_end = {(c.task, c.arm): c.runs for c in load_curves(experiment_dir, metric=SUCCESS_AT_END)[0]}
    series = learner_series(experiment_dir)
    with gzip.open(path, "wt") as f:
        for c in curves:
            for seed, points in sorted(c.runs.items()):
                f.write(json.dumps({"task": c.task, "arm": c.arm, "seed": seed, "evaluations": points,
                                    "evaluations_at_end": at_end.get((c.task, c.arm), {}).get(seed, []),
                                    "learner": series.get((c.task, c.arm), {}).get(seed, [])}) + "\n")
    return sum(len(c.runs) for c in curves)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment_dir", help="a suite experiment directory (<storage-path>/<name>)")
    p.add_argument("--levels", type=float, nargs="+", default=[0.5, 0.8], help="success levels in (0, 1]")
    p.add_argument("--out", help="where to write report.md and the PNGs (default: the experiment dir)")
    p.add_argument("--until", type=float, help="only evaluations up to this many env steps (compare at equal budgets)")
    p.add_argument("--seeds", type=int, nargs="+", help="only these seeds (e.g. leave out an interrupted one)")
    p.add_argument("--export", metavar="FILE.jsonl.gz", help="also write every trial's evaluations and diagnosis "
                                                             "metrics to this file (gzipped JSON lines)")
    p.add_argument("--reps", type=int, default=aggregate.REPS,
                   help=f"bootstrap resamples of rliable's intervals (default {aggregate.REPS})")
    args = p.parse_args(argv)
    if args.reps < 10:
        p.error(f"--reps={args.reps}: must be >= 10")
    try:
        seeds = tuple(args.seeds) if args.seeds else None
        print(write_report(args.experiment_dir, args.out, tuple(args.levels), args.until, seeds, args.reps))
        if args.export:
            print(f"exported {export_runs(args.experiment_dir, args.export)} trials to {args.export}")
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
