"""rliable's statistics in the report, on synthetic experiments whose answers are known by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rllib_gaze import aggregate
from rllib_gaze.report import evaluation_scores, final_scores, load_curves, write_report
from rllib_gaze.results import SUCCESS_AT_END

REPS = 100


def test_iqm_is_the_mean_of_the_middle_runs_with_an_interval_around_it():
    scores = np.asarray([[0.0], [0.2], [0.4], [0.6], [1.0]])   # IQM of 5 runs: the middle 3, (0.2 + 0.4 + 0.6) / 3
    estimate = aggregate.iqm(scores, REPS)
    assert estimate.value == pytest.approx(0.4) and 0.0 <= estimate.low < 0.4 < estimate.high <= 1.0
    assert aggregate.iqm(scores, REPS) == estimate   # a fixed seed: the same report every time


@pytest.mark.parametrize("arm, baseline, probability, call", [
    ([1.0] * 5, [0.0, 0.1, 0.2, 0.1, 0.0], 1.0, "better"),      # every run of the arm beats every baseline run
    ([0.0, 0.1, 0.2, 0.1, 0.0], [1.0] * 5, 0.0, "worse"),
    ([0.3, 0.5, 0.4, 0.6, 0.2], [0.3, 0.5, 0.4, 0.6, 0.2], 0.5, "no call"),   # the same runs: ties count half
    ([0.6, 0.5, 0.4, 0.3, 0.2], [0.45, 0.35, 0.25, 0.55, 0.65], 0.4, "no call"),  # 4+3+2+1+0 of 25 pairs
])
def test_probability_of_improvement_and_the_call_from_its_interval(arm, baseline, probability, call):
    estimate = aggregate.probability_of_improvement(np.asarray(arm)[:, None], np.asarray(baseline)[:, None], REPS)
    assert estimate.value == pytest.approx(probability)
    assert estimate.low <= estimate.value <= estimate.high
    assert aggregate.call(estimate) == call


def test_the_bootstrap_resamples_runs_within_each_task_and_never_the_tasks():
    # the arm wins every pair on one task and loses every pair on the other: P = 0.5 in every resample
    # that keeps both tasks (a resample of the tasks could draw one twice: P 0 or 1)
    arm = np.asarray([[1.0, 0.0]] * 4)
    baseline = np.asarray([[0.0, 1.0]] * 4)
    estimate = aggregate.probability_of_improvement(arm, baseline, REPS)
    assert (estimate.value, estimate.low, estimate.high) == (0.5, 0.5, 0.5)


def _experiment(root, finals: dict[tuple[str, str], list[float]], at_end_drop: float = 0.0) -> None:
    """Trials with 3 evaluations each (success_once rising to its final value; success_at_end that
    value minus ``at_end_drop``)."""
    for (task, arm), values in finals.items():
        for seed, final in enumerate(values):
            trial = root / f"{task}_{arm}_seed{seed}"
            trial.mkdir()
            (trial / "params.json").write_text(json.dumps({"task": task, "arm": arm, "seed": seed,
                                                           "evaluation_interval": 1}))
            rows = [{"training_iteration": i, "num_env_steps_sampled_lifetime": 1000 * i,
                     "evaluation": {"env_runners": {"success_once": final * i / 3,
                                                    SUCCESS_AT_END: max(0.0, final * i / 3 - at_end_drop)}}}
                    for i in (1, 2, 3)]
            (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _table(markdown: str, section: str) -> dict[str, list[str]]:
    text = markdown.split(section)[1].split("Final success by rliable")[1].split("\n\n")[1]
    lines = text.strip().splitlines()
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def test_report_calls_each_arm_against_the_baseline_per_task_and_over_tasks(tmp_path):
    low, high, mixed = [0.0, 0.1, 0.0, 0.2, 0.1], [0.9, 1.0, 0.8, 1.0, 0.9], [0.0, 0.2, 0.1, 0.0, 0.1]
    _experiment(tmp_path, {("fovea", "ppo"): low, ("fovea", "drac"): high, ("fovea", "gaze"): mixed,
                           ("fovea-still", "ppo"): low, ("fovea-still", "drac"): high,
                           ("fovea-still", "gaze"): [0.0, 0.0, 0.0, 0.1, 0.0]}, at_end_drop=0.05)
    markdown = write_report(str(tmp_path), reps=REPS)
    fovea = _table(markdown, "## fovea\n")
    # columns: seeds, IQM once, IQM at end, P once, call, P at end, call
    assert fovea["drac"][0] == "5" and fovea["drac"][1].startswith("0.93 ")   # IQM of 0.9 0.9 1.0 (middle 3 of 5)
    assert fovea["drac"][2].startswith("0.88 ")                                  # 0.05 lower at the end
    assert fovea["drac"][3].startswith("1.00 ") and fovea["drac"][4] == "better" and fovea["drac"][6] == "better"
    assert fovea["gaze"][4] == "no call" and fovea["ppo"][3:] == ["-", "-", "-", "-"]
    every = _table(markdown, "## All tasks")
    assert every["drac"][0] == "5" and every["drac"][4] == "better"
    for image in ("iqm_fovea.png", "iqm_fovea-still.png", "iqm_all.png", "profiles.png"):
        assert (tmp_path / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({image})" in markdown


def test_score_matrices_keep_the_seeds_every_task_has(tmp_path):
    _experiment(tmp_path, {("a", "ppo"): [0.1, 0.2, 0.3], ("b", "ppo"): [0.4, 0.5]})
    curves, _ = load_curves(str(tmp_path))
    # seed 2 has no run of task b
    assert final_scores(curves, "ppo", ["a", "b"]) == pytest.approx(np.asarray([[0.1, 0.4], [0.2, 0.5]]))
    assert final_scores(curves, "gaze", ["a"]) is None
    steps, scores = evaluation_scores(curves, ["a", "b"])
    assert steps.tolist() == [1000, 2000, 3000] and scores["ppo"].shape == (2, 2, 3)
    assert scores["ppo"][1, 1].tolist() == pytest.approx([0.5 / 3, 1.0 / 3, 0.5])


def test_without_rliable_the_report_says_so_and_keeps_the_rest(tmp_path, monkeypatch):
    _experiment(tmp_path, {("fovea", "ppo"): [0.1, 0.2], ("fovea", "gaze"): [0.3, 0.4]})
    assert aggregate.unavailable() is None   # here it imports
    # as on a machine whose pandas breaks rliable's arch at import
    monkeypatch.setattr(aggregate, "unavailable", lambda: "TypeError: deprecate_kwarg() missing 1 argument")
    markdown = write_report(str(tmp_path), reps=REPS)
    assert "rliable does not import here (TypeError: deprecate_kwarg()" in markdown and "pandas < 3" in markdown
    assert "| gaze | 2 | 3,000 |" in markdown and "Final success by rliable" not in markdown
    assert not (tmp_path / "profiles.png").exists() and (tmp_path / "success_fovea.png").exists()
