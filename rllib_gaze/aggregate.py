"""The field's statistics for a suite experiment, computed by rliable (Agarwal et al. 2021, "Deep
Reinforcement Learning at the Edge of the Statistical Precipice"), beside the report's steps-to-level
ratios.

Scores are success rates in [0, 1], so no normalisation: a run's score on a task is its last
evaluation's ``success_once`` or ``success_at_end`` (ManiSkill reports both). From them:

- the interquartile mean (IQM: the mean of the middle 50% of runs) per task and over all tasks,
  with a 95% stratified-bootstrap interval (runs resampled within each task, rliable's default);
- the probability of improvement ``P(X > Y)`` of an arm over the baseline arm (plain PPO / plain SAC):
  the chance that a run of the arm scores higher than a run of the baseline on a task (ties count
  half), averaged over tasks, with its 95% stratified-bootstrap interval;
- the call: "better" when that interval lies above 0.5, "worse" when it lies below, "no call"
  otherwise (and with fewer than 2 seeds of either arm);
- performance profiles (the fraction of runs scoring above each threshold) with bands, and IQM
  sample-efficiency curves (IQM success at each evaluation, with bands), drawn by rliable.

Every bootstrap draws ``REPS`` resamples from a fixed seed, so a report is the same each time it is
made. rliable (and the libraries it imports) is imported only when these are computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REPS = 2000                       # bootstrap resamples (rliable's performance profiles use the same)
CONFIDENCE = 0.95
TAUS = np.linspace(0.0, 1.0, 51)  # thresholds of the performance profiles


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95% interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}]"


def unavailable() -> str | None:
    """None when rliable imports here; else why not, for the report to say in place of its statistics
    (rliable 1.2's arch < 8 raises a TypeError on import with pandas 3, which the project excludes)."""
    try:
        import rliable.library  # noqa: F401
        import rliable.plot_utils  # noqa: F401
    except Exception as error:  # an ImportError, or whatever a broken dependency raises on import
        return f"{type(error).__name__}: {error}"
    return None


def _interval_estimates(scores: dict, func, reps: int) -> tuple[dict, dict]:
    """rliable's ``get_interval_estimates`` (percentile intervals, runs resampled within each task) from
    a fixed seed. rliable draws its resamples from numpy's global generator whatever ``random_state`` it
    is given, so that generator is seeded here and put back afterwards."""
    from rliable import library

    state = np.random.get_state()
    np.random.seed(0)
    try:
        return library.get_interval_estimates(scores, func, reps=reps, confidence_interval_size=CONFIDENCE)
    finally:
        np.random.set_state(state)


def iqm(scores: np.ndarray, reps: int = REPS) -> Estimate:
    """IQM of ``scores (runs, tasks)`` over all runs and tasks, with its stratified-bootstrap interval."""
    from rliable import metrics

    point, interval = _interval_estimates({"scores": scores}, lambda s: np.array([metrics.aggregate_iqm(s)]), reps)
    return Estimate(float(point["scores"][0]), float(interval["scores"][0, 0]), float(interval["scores"][1, 0]))


def probability_of_improvement(scores: np.ndarray, baseline: np.ndarray, reps: int = REPS) -> Estimate:
    """``P(arm > baseline)`` averaged over tasks, ``scores (runs, tasks)`` and ``baseline (runs', tasks)``,
    with its stratified-bootstrap interval (each arm's runs resampled within each task)."""
    from rliable import metrics

    point, interval = _interval_estimates(
        {"pair": [scores, baseline]}, lambda x, y: np.array([metrics.probability_of_improvement(x, y)]), reps)
    return Estimate(float(point["pair"][0]), float(interval["pair"][0, 0]), float(interval["pair"][1, 0]))


def call(improvement: Estimate) -> str:
    """"better" when the interval of ``P(arm > baseline)`` lies above 0.5, "worse" below, else "no call"."""
    return "better" if improvement.low > 0.5 else "worse" if improvement.high < 0.5 else "no call"


def performance_profiles(scores: dict[str, np.ndarray], reps: int = REPS) -> tuple[dict, dict]:
    """Per arm, the fraction of runs (all tasks) scoring above each of ``TAUS``, and its 95% band."""
    # rliable's score_distributions (the share of all runs above each tau) as one comparison per
    # resample rather than its np.vectorize loop over the taus: the same values
    return _interval_estimates(scores, lambda s: (s.reshape(-1, 1) > TAUS).mean(0), reps)


def iqm_curves(scores: dict[str, np.ndarray], reps: int = REPS) -> tuple[dict, dict]:
    """Per arm, the IQM at each evaluation of ``scores (runs, tasks, evaluations)`` and its 95% band."""
    from scipy import stats

    # rliable's aggregate_iqm (scipy's trim_mean of 25% over all runs and tasks) at every evaluation in
    # one call per resample: the same values as one call per evaluation, at a fraction of the cost
    return _interval_estimates(
        scores, lambda s: stats.trim_mean(s.reshape(-1, s.shape[-1]), proportiontocut=0.25, axis=0), reps)


def plot_profiles(scores_by_metric: dict[str, dict[str, np.ndarray]], path: str, reps: int = REPS) -> None:
    """One panel per success metric: the arms' performance profiles with their bands, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import plot_utils

    fig, axes = plt.subplots(1, len(scores_by_metric), figsize=(5.2 * len(scores_by_metric), 4.0), dpi=110,
                             squeeze=False)
    for ax, (metric, scores) in zip(axes[0], scores_by_metric.items()):
        profiles, bands = performance_profiles(scores, reps)
        plot_utils.plot_performance_profiles(profiles, TAUS, performance_profile_cis=bands, ax=ax,
                                             xlabel=f"final {metric} (τ)", ylabel="fraction of runs with score > τ",
                                             labelsize="medium", ticklabelsize="small")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_iqm_curves(steps: np.ndarray, scores: dict[str, np.ndarray], title: str, path: str,
                    reps: int = REPS) -> None:
    """IQM success vs env steps per arm (``scores (runs, tasks, evaluations)`` at ``steps``), bands, PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import plot_utils

    points, bands = iqm_curves(scores, reps)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    plot_utils.plot_sample_efficiency_curve(steps, points, bands, ax=ax, xlabel="env steps", ylabel="IQM success",
                                            labelsize="medium", ticklabelsize="small", marker="o", linewidth=1.5)
    ax.set_title(title)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
